"""`fornax bench asr`: speech-to-text real-time factor, fornax vs HF's pipeline or faster-whisper.

Both sides transcribe the same speech with the same Whisper weights and threads, alternating timed
repetitions; warm-ups are untimed. `--audio long` is the committed 86 s espeak-ng recording (one
voice); `--audio mixed` the four realtime recordings back to back (145 s, four voices and rates,
one without pauses past 30 s); `--seconds` keeps the first part. `--peer hf` is HF transformers'
`pipeline(..., batch_size=N)` in process, same dtype; `--peer faster-whisper` is CTranslate2 in a
child process on the CTranslate2 folder fornax's weights come from (`--peer-compute-type`,
default float32; CTranslate2 has no bf16 on CPU), one file at a time. Decoding with faster-whisper
is the same on both sides: greedy (beam 1), OpenAI's temperature fallback (0.0-1.0, thresholds
2.4 / -1.0 / 0.6), conditioned on the previous text, timestamps, no VAD. `--concurrency N` submits
N copies at once (fornax: one engine; HF: one batch). Real-time factor = wall time / audio
seconds of one file (lower is better); audio_s_per_s = all audio seconds / wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from fornax.perf.common import check_threads, make_record, median, print_table, speedup, write_json
from fornax.perf.wer import edit_distance, words
from fornax.runtime import env

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
AUDIO_DIR = REPO_ROOT / "tests" / "fixtures" / "audio"
RECORDINGS = {"long": ("long", ["en_long.ogg"]),
              "mixed": ("realtime", ["rt_us_f150.ogg", "rt_gb_m175.ogg", "rt_us_m120_long.ogg",
                                     "rt_rp_f160_mixed.ogg"])}
HEADLINE = ("elapsed_s", "rtf", "audio_s_per_s")
PEERS = ("hf", "faster-whisper", "none")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("asr", help="speech-to-text real-time factor vs a peer",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="whisper-tiny.en",
                   help="packaged name, CTranslate2 or HF Whisper folder (default whisper-tiny.en)")
    p.add_argument("--audio", choices=sorted(RECORDINGS), default="long",
                   help="committed recording: long (86 s) or mixed (145 s, four voices)")
    p.add_argument("--seconds", type=float, default=None,
                   help="seconds of speech per file (default: the whole recording)")
    p.add_argument("--concurrency", type=int, default=1, help="files submitted at once")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per side")
    p.add_argument("--dtype", default="auto",
                   help="fornax's dtype (default auto: bf16 where the CPU has it); the HF peer "
                   "runs float32 when this is auto")
    p.add_argument("--peer", choices=PEERS, default="hf", help="the side-by-side peer")
    p.add_argument("--peer-compute-type", default="float32",
                   help="faster-whisper's compute_type (float32, int8, ...)")
    p.add_argument("--no-peer", action="store_true", help="same as --peer none")
    p.add_argument("--output", type=Path, default=None, help="write the JSON record here")


def recording(name: str) -> tuple[Any, str]:
    """(16 kHz samples, the spoken text) of a committed recording (several files back to back)."""
    import numpy as np

    from fornax.audio.decode import decode_audio

    section, files = RECORDINGS[name]
    texts = json.loads((AUDIO_DIR / "manifest.json").read_text())[section]
    audio = np.concatenate([decode_audio((AUDIO_DIR / f).read_bytes()) for f in files])
    spoken = [texts[f] if isinstance(texts[f], str) else " ".join(texts[f]) for f in files]
    return audio, " ".join(spoken)


def _wer(ref: str, hyp: str, seconds: float, total: float) -> float:
    """WER against the words spoken in the first `seconds` (by their share of the words); numbers
    count as their spoken words ("9" = "nine"), whichever way a side writes them."""
    r = words(ref, spell_numbers=True)
    r = r[: max(1, round(len(r) * seconds / total))]
    return min(edit_distance(r, words(hyp, spell_numbers=True)) / len(r), 1.0)


def _metrics(times: list[float], seconds: float, n: int, wer: float) -> dict[str, float]:
    elapsed = median(times)
    return {"elapsed_s": elapsed, "rtf": elapsed / seconds, "audio_s_per_s": n * seconds / elapsed,
            "wer": wer, "num_files": n, "audio_seconds": seconds}


class _HFPipeline:
    """HF transformers' ASR pipeline, in this process, long-form with timestamps."""

    def __init__(self, path: Path, dtype: str, audio: Any) -> None:
        import torch
        from transformers import pipeline

        self.audio = audio
        t0 = time.perf_counter()
        self.pipe = pipeline("automatic-speech-recognition", model=str(path),
                             dtype=getattr(torch, dtype), device="cpu")
        self.load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.pipe({"raw": audio[: 16000 * 5], "sampling_rate": 16000})
        self.warmup_s = time.perf_counter() - t0
        self.name = f"transformers {_version('transformers')} pipeline ({dtype})"

    def run(self, n: int) -> dict[str, Any]:
        t0, c0 = time.perf_counter(), time.process_time()
        res = self.pipe([{"raw": self.audio, "sampling_rate": 16000} for _ in range(n)],
                        batch_size=n, return_timestamps=True)
        return {"elapsed_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                "text": res[0]["text"]}

    def close(self) -> None:
        pass


def _make_peer(args: argparse.Namespace, path: Path, audio: Any, fornax_dtype: str) -> Any:
    import torch

    if args.peer == "hf":
        return _HFPipeline(path, "float32" if args.dtype == "auto" else fornax_dtype, audio)
    from fornax.perf import faster_whisper_peer as fw

    if fw.faster_whisper_version() is None:
        raise SystemExit("--peer faster-whisper needs faster-whisper: pip install -c "
                         "constraints.txt faster-whisper (or the fornax[peers] extra)")
    if args.concurrency != 1:
        raise SystemExit("--peer faster-whisper transcribes one file at a time: --concurrency 1")
    return fw.FasterWhisperPeer(fw.ct2_folder(args.model, path), audio, torch.get_num_threads(),
                                args.peer_compute_type)


def run(args: argparse.Namespace) -> int:
    import torch

    check_threads()
    from fornax.runtime.loaders.speech_models import resolve_speech_model
    from fornax.runtime.offline.speech import SpeechToText

    if args.no_peer:
        args.peer = "none"
    path = resolve_speech_model(args.model) or Path(args.model)
    full, spoken = recording(args.audio)
    total = len(full) / 16000
    if args.seconds is not None and args.seconds > total:
        raise SystemExit(f"--audio {args.audio} holds only {total:.0f} s of speech")
    seconds = total if args.seconds is None else args.seconds
    audio = full[: int(seconds * 16000)]
    n = args.concurrency
    record = make_record("asr", args.model, {**vars(args), "prepared_path": str(path)})
    t0 = time.perf_counter()
    stt = SpeechToText(str(path), dtype=args.dtype, device="cpu", max_num_seqs=max(n, 8))
    record["startup"]["load_s"] = time.perf_counter() - t0
    dtype = str(stt.engine.runner.dtype).removeprefix("torch.")
    t0 = time.perf_counter()
    stt.transcribe(audio[: 16000 * 5])
    record["startup"]["warmup_s"] = time.perf_counter() - t0
    peer = None if args.peer == "none" else _make_peer(args, path, audio, dtype)

    ours_t, ours_cpu, ours_text, peer_runs = [], [], "", []
    for rep in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        outs = stt.transcribe([audio] * n)
        ours_t.append(time.perf_counter() - t0)
        ours_cpu.append(time.process_time() - c0)
        ours_text = outs[0].text
        logger.info("fornax run %d: %.2f s", rep + 1, ours_t[-1])
        if peer is not None:
            time.sleep(0.5)  # the other side's idle OpenMP threads stop spinning first
            peer_runs.append(peer.run(n) if args.peer == "hf" else peer.run())
            logger.info("%s run %d: %.2f s", peer.name, rep + 1, peer_runs[-1]["elapsed_s"])
            time.sleep(0.5)
    record["metrics"] = _metrics(ours_t, seconds, n, _wer(spoken, ours_text, seconds, total))
    record["details"] = {"times_s": ours_t, "cpu_s": ours_cpu, "text": ours_text,
                         "dtype": dtype, "reference": spoken,
                         "torch_threads": torch.get_num_threads(),
                         "omp_num_threads": env.OMP_NUM_THREADS.raw()}
    rows = [[f"fornax ({dtype})", *(record["metrics"][k] for k in HEADLINE),
             record["metrics"]["wer"]]]
    if peer is not None:
        peer.close()
        peer_t = [r["elapsed_s"] for r in peer_runs]
        peer_cpu = [r["cpu_s"] for r in peer_runs]
        text = peer_runs[-1]["text"]
        metrics = _metrics(peer_t, seconds, n, _wer(spoken, text, seconds, total))
        details: dict[str, Any] = {"times_s": peer_t, "cpu_s": peer_cpu, "text": text}
        if args.peer == "faster-whisper":
            from fornax.perf.faster_whisper_peer import DECODING

            details["decoding"] = DECODING
            details["compute_type"] = args.peer_compute_type
        record["peer"] = {"name": peer.name, "metrics": metrics,
                          "startup": {"load_s": peer.load_s, "warmup_s": peer.warmup_s},
                          "details": details}
        ours = record["metrics"]
        record["ratios"] = {"elapsed_s": speedup("elapsed_s", ours["elapsed_s"],
                                                 metrics["elapsed_s"]),
                            "rtf": metrics["rtf"] / ours["rtf"],  # > 1: fornax is faster
                            "audio_s_per_s": speedup("audio_s_per_s", ours["audio_s_per_s"],
                                                     metrics["audio_s_per_s"]),
                            "cpu_s": median(peer_cpu) / median(ours_cpu)}
        rows.append([peer.name, *(metrics[k] for k in HEADLINE), metrics["wer"]])
    print_table(rows, ["", *HEADLINE, "wer"])
    if record["ratios"]:
        logger.info("fornax is %.2fx as fast as %s (%d file(s) of %.0f s)",
                    record["ratios"]["elapsed_s"], record["peer"]["name"], n, seconds)
    write_json(record, args.output)
    return 0


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
