"""`fornax bench asr`: speech-to-text real-time factor, fornax vs the HF transformers pipeline.

Both sides transcribe the same speech (the first `--seconds` of the committed 86 s espeak-ng
recording) with the same Whisper weights, dtype and threads, one process, alternating timed
repetitions; warm-ups are untimed. `--concurrency N` submits N copies of the file at once: fornax
runs them through one engine (continuous batching), the peer through `pipeline(..., batch_size=N)`.
Both decode long-form (30 s windows, seek by timestamps). Real-time factor = wall time / audio
seconds of one file (lower is better); audio_s_per_s = all audio seconds / wall time.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from fornax.perf.common import check_threads, make_record, median, print_table, speedup, write_json
from fornax.perf.wer import edit_distance, words
from fornax.runtime import env

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEECH = REPO_ROOT / "tests" / "fixtures" / "audio" / "en_long.ogg"
HEADLINE = ("elapsed_s", "rtf", "audio_s_per_s")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("asr", help="speech-to-text real-time factor vs HF's pipeline",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="whisper-tiny.en",
                   help="packaged name, CTranslate2 or HF Whisper folder (default whisper-tiny.en)")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds of speech per file")
    p.add_argument("--concurrency", type=int, default=1, help="files submitted at once")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per side")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-peer", action="store_true", help="skip the HF transformers pipeline")
    p.add_argument("--output", type=Path, default=None, help="write the JSON record here")


def _speech(seconds: float) -> Any:
    from fornax.audio.decode import decode_audio

    audio = decode_audio(SPEECH.read_bytes())
    if seconds > len(audio) / 16000:
        raise SystemExit(f"{SPEECH} holds only {len(audio) / 16000:.0f} s of speech")
    return audio[: int(seconds * 16000)]


def _reference(seconds: float) -> str:
    import json

    manifest = json.loads((SPEECH.parent / "manifest.json").read_text())
    return " ".join(manifest["long"][SPEECH.name])


def _wer(ref: str, hyp: str, seconds: float, total: float) -> float:
    """WER against the sentences spoken in the first `seconds` (by their share of the words)."""
    r = words(ref)
    r = r[: max(1, round(len(r) * seconds / total))]
    return min(edit_distance(r, words(hyp)) / len(r), 1.0)


def _metrics(times: list[float], seconds: float, n: int, wer: float) -> dict[str, float]:
    elapsed = median(times)
    return {"elapsed_s": elapsed, "rtf": elapsed / seconds, "audio_s_per_s": n * seconds / elapsed,
            "wer": wer, "num_files": n, "audio_seconds": seconds}


def run(args: argparse.Namespace) -> int:
    import torch

    check_threads()
    from fornax.runtime.loaders.speech_models import resolve_speech_model
    from fornax.runtime.offline.speech import SpeechToText

    path = resolve_speech_model(args.model) or Path(args.model)
    audio = _speech(args.seconds)
    n = args.concurrency
    record = make_record("asr", args.model, {**vars(args), "prepared_path": str(path)})
    t0 = time.perf_counter()
    stt = SpeechToText(str(path), dtype=args.dtype, device="cpu", max_num_seqs=max(n, 8))
    record["startup"]["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    stt.transcribe(audio[: 16000 * 5])
    record["startup"]["warmup_s"] = time.perf_counter() - t0
    pipe = None
    if not args.no_peer:
        from transformers import pipeline

        t0 = time.perf_counter()
        pipe = pipeline("automatic-speech-recognition", model=str(path),
                        dtype=getattr(torch, args.dtype), device="cpu")
        peer_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe({"raw": audio[: 16000 * 5], "sampling_rate": 16000})
        peer_warm = time.perf_counter() - t0

    ours_t, peer_t, ours_cpu, peer_cpu, ours_text, peer_text = [], [], [], [], "", ""
    for rep in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        outs = stt.transcribe([audio] * n)
        ours_t.append(time.perf_counter() - t0)
        ours_cpu.append(time.process_time() - c0)
        ours_text = outs[0].text
        logger.info("fornax run %d: %.2f s", rep + 1, ours_t[-1])
        if pipe is not None:
            t0, c0 = time.perf_counter(), time.process_time()
            res = pipe([{"raw": audio, "sampling_rate": 16000} for _ in range(n)], batch_size=n,
                       return_timestamps=True)
            peer_t.append(time.perf_counter() - t0)
            peer_cpu.append(time.process_time() - c0)
            peer_text = res[0]["text"]
            logger.info("HF pipeline run %d: %.2f s", rep + 1, peer_t[-1])
    ref, total = _reference(args.seconds), len(_speech_total()) / 16000
    record["metrics"] = _metrics(ours_t, args.seconds, n, _wer(ref, ours_text, args.seconds, total))
    record["details"] = {"times_s": ours_t, "cpu_s": ours_cpu, "text": ours_text,
                         "torch_threads":
                         torch.get_num_threads(), "omp_num_threads":
                         env.OMP_NUM_THREADS.raw()}
    rows = [["fornax", *(record["metrics"][k] for k in HEADLINE), record["metrics"]["wer"]]]
    if pipe is not None:
        peer = _metrics(peer_t, args.seconds, n, _wer(ref, peer_text, args.seconds, total))
        record["peer"] = {"name": f"transformers {_version('transformers')} pipeline",
                          "metrics": peer, "startup": {"load_s": peer_load,
                                                       "warmup_s": peer_warm},
                          "details": {"times_s": peer_t, "cpu_s": peer_cpu, "text": peer_text}}
        ours = record["metrics"]
        record["ratios"] = {"elapsed_s": speedup("elapsed_s", ours["elapsed_s"], peer["elapsed_s"]),
                            "rtf": peer["rtf"] / ours["rtf"],  # > 1: fornax is faster
                            "audio_s_per_s": speedup("audio_s_per_s", ours["audio_s_per_s"],
                                                     peer["audio_s_per_s"]),
                            "cpu_s": median(peer_cpu) / median(ours_cpu)}
        rows.append(["HF pipeline", *(peer[k] for k in HEADLINE), peer["wer"]])
    print_table(rows, ["", *HEADLINE, "wer"])
    if record["ratios"]:
        logger.info("fornax is %.2fx faster than the HF pipeline (%d file(s) of %.0f s)",
                    record["ratios"]["elapsed_s"], n, args.seconds)
    write_json(record, args.output)
    return 0


def _speech_total() -> Any:
    from fornax.audio.decode import decode_audio

    return decode_audio(SPEECH.read_bytes())


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m fornax.perf.bench_asr",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
