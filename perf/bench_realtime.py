"""`fornax bench realtime`: WS /v1/realtime latency and capacity under concurrent real-time sessions.

Starts `fornax serve MODEL` (or uses `--base-url`), then for each concurrency level N runs N
sessions at once (vLLM's protocol), each streaming `--utterances` espeak-ng sentences from the
committed fixtures in 100 ms PCM16 chunks at real-time pace, committing (`final: true`) right
after each sentence's last chunk. Per utterance: final latency = last chunk sent -> its
`transcription.done` (the end of speech to the final text); first-delta delay = the moment the
speech starts in the stream (its first loud 20 ms frame) -> the first `transcription.delta`; WER
against the spoken sentence and against `/v1/audio/transcriptions` of the same samples (the file
transcript: realtime finals should match it). `--audio recordings` streams the 20-60 s realtime
parity recordings instead (several utterances and voices each, committed once at the end). Real-
time capacity = the largest N whose p90 final latency stays under `--slo-ms`. The server, and so
the engine, runs with the caller's OMP_NUM_THREADS. CPU utilisation per level = CPU time of the
server's processes (fornax serve, its engine core and API workers, from /proc) over the level's
wall time and the machine's cores (only for a server the bench starts).

`--modes simultaneous` (the default, the harder case): all N sessions start at the same instant
(session i streams sentences 3i, 3i+1, ... of 4.7-6.6 s), so their first finals come within
about 2 s of each other and bunch up again later. `staggered`: session i starts i/N of a mean
sentence later, so finals spread out as with independent speakers. Each level is reported per
mode, labelled.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fornax.perf.common import check_threads, make_record, percentile, print_table, write_json
from fornax.perf.wer import word_error_rate
from fornax.runtime import env

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
AUDIO_DIR = REPO_ROOT / "tests" / "fixtures" / "audio"
RATE = 16000
CHUNK = RATE // 10  # 100 ms
LEAD_S = 0.3  # silence before each sentence
HEADLINE = ("final_latency_p50_ms", "final_latency_p90_ms", "first_delta_p50_ms",
            "max_realtime_sessions")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("realtime", help="WS /v1/realtime latency and real-time capacity",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", default="whisper-tiny.en", help="what `fornax serve` serves")
    p.add_argument("--base-url", default=None,
                   help="an already running server (http://host:port); default: start one")
    p.add_argument("--api-key", default=None)
    p.add_argument("--concurrency", default="1,2,4,8,16",
                   help="comma list of concurrent session counts (default 1,2,4,8,16)")
    p.add_argument("--utterances", type=int, default=3, help="sentences per session")
    p.add_argument("--audio", choices=["sentences", "recordings"], default="sentences",
                   help="what each session streams: short sentences (default) or the 20-60 s "
                   "realtime parity recordings")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up sentences (default 1)")
    p.add_argument("--modes", default="simultaneous", type=_modes,
                   help="comma list: simultaneous (all sessions start at once: finals coincide; "
                   "the default) and/or staggered (session i starts i/N of a sentence later)")
    p.add_argument("--slo-ms", type=float, default=1000.0,
                   help="p90 final latency bound for the capacity figure (default 1000)")
    p.add_argument("--output", type=Path, default=None, help="write the JSON record here")
    p.set_defaults(func=run)
    return p


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("simultaneous", "staggered")]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"--modes takes simultaneous and/or staggered, not "
                                         f"{text!r}")
    return modes


# ---- the workload -----------------------------------------------------------------------------
def load_sentences(kind: str = "sentences") -> list[tuple[str, np.ndarray, float]]:
    """(reference text, 16 kHz audio with LEAD_S of silence before, speech onset in seconds)."""
    from fornax.audio.decode import decode_audio

    manifest = json.loads((AUDIO_DIR / "manifest.json").read_text(encoding="utf-8"))
    out = []
    for name, text in manifest["short" if kind == "sentences" else "realtime"].items():
        audio = decode_audio((AUDIO_DIR / name).read_bytes())
        audio = np.concatenate([np.zeros(int(LEAD_S * RATE), np.float32), audio])
        out.append((text, audio, onset_seconds(audio)))
    return out


def wav_bytes(audio: np.ndarray) -> bytes:
    """16-bit PCM WAV of the samples a session streams (the file path gets the same ones)."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, (np.clip(audio, -1, 1) * 32767).astype("<i2"), RATE, format="WAV",
             subtype="PCM_16")
    return buf.getvalue()


def file_transcripts(url: str, headers: dict[str, str] | None, model: str,
                     sentences: list[tuple[str, np.ndarray, float]]) -> dict[str, str]:
    """Reference text -> what /v1/audio/transcriptions returns for the same audio."""
    import httpx

    out = {}
    for text, audio, _ in sentences:
        resp = httpx.post(url + "/v1/audio/transcriptions", headers=headers, timeout=300,
                          files={"file": ("audio.wav", wav_bytes(audio), "audio/wav")},
                          data={"model": model})
        resp.raise_for_status()
        out[text] = resp.json()["text"]
    return out


def onset_seconds(audio: np.ndarray, level_db: float = -40.0) -> float:
    """Start of the first 20 ms frame louder than `level_db` dBFS."""
    n = len(audio) // 320
    frames = audio[: n * 320].reshape(n, 320).astype(np.float64)
    db = 10 * np.log10(np.maximum((frames * frames).mean(axis=1), 1e-12))
    loud = np.nonzero(db > level_db)[0]
    return float(loud[0] * 320 / RATE) if len(loud) else 0.0


def _b64(samples: np.ndarray) -> str:
    return base64.b64encode((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()).decode()


async def session(url: str, headers: dict[str, str] | None,
                  sentences: list[tuple[str, np.ndarray, float]],
                  delay_s: float = 0.0) -> list[dict[str, Any]]:
    """One connection streaming its sentences back to back (after `delay_s`); one result per
    sentence."""
    import websockets

    await asyncio.sleep(delay_s)
    results = []
    async with websockets.connect(url, additional_headers=headers, proxy=None, max_size=None,
                                  open_timeout=60) as ws:
        json.loads(await ws.recv())  # session.created
        await ws.send(json.dumps({"type": "session.update", "model": None}))
        for text, audio, onset in sentences:
            res: dict[str, Any] = {"ref": text, "first_delta": None}
            done = asyncio.Event()
            start = time.monotonic()

            async def reader(res: dict[str, Any] = res, done: asyncio.Event = done) -> None:
                deltas = []
                while True:
                    event = json.loads(await ws.recv())
                    now = time.monotonic()
                    if event["type"] == "transcription.delta":
                        if res["first_delta"] is None:
                            res["first_delta"] = now
                        deltas.append(event["delta"])
                    elif event["type"] == "transcription.done":
                        res.update(done_at=now, text=event["text"],
                                   replaced="".join(deltas) != event["text"])
                        done.set()
                        return
                    elif event["type"] == "error":
                        raise RuntimeError(f"error event: {event}")

            task = asyncio.create_task(reader())
            for i, pos in enumerate(range(0, len(audio), CHUNK)):
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": _b64(audio[pos:pos + CHUNK])}))
                await asyncio.sleep(max(0.0, start + (i + 1) * CHUNK / RATE - time.monotonic()))
            end = start + len(audio) / RATE  # the stream's clock: the audio has been spoken
            res["sent_late_ms"] = max(0.0, time.monotonic() - end) * 1000
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
            await asyncio.wait_for(task, 120)
            res["final_ms"] = (res["done_at"] - end) * 1000
            if res["first_delta"] is not None:
                res["first_delta_ms"] = (res["first_delta"] - (start + onset)) * 1000
            results.append(res)
    return results


async def level(url: str, headers: dict[str, str] | None, n: int, utterances: int,
                sentences: list[tuple[str, np.ndarray, float]],
                mode: str = "simultaneous") -> list[dict[str, Any]]:
    plans = [[sentences[(i * utterances + k) % len(sentences)] for k in range(utterances)]
             for i in range(n)]
    mean_s = float(np.mean([len(a) / RATE for _, a, _ in sentences]))
    delays = [i * mean_s / n if mode == "staggered" else 0.0 for i in range(n)]
    runs = await asyncio.gather(*(session(url, headers, plan, d)
                                  for plan, d in zip(plans, delays)))
    return [r for run in runs for r in run]


def process_tree_cpu_s(pid: int) -> float | None:
    """CPU time (user + system, s) of `pid` and its descendants so far, from /proc (None where
    there is no /proc)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu s)
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        stats[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    if pid not in stats:
        return None
    total, frontier = 0.0, [pid]
    while frontier:
        cur = frontier.pop()
        total += stats[cur][1]
        frontier += [p for p, (parent, _) in stats.items() if parent == cur]
    return total


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)


def measured_level(url: str, headers: dict[str, str] | None, n: int, utterances: int,
                   sentences: list[tuple[str, np.ndarray, float]], mode: str,
                   server_pid: int | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One level's results and its load: the server's CPU utilisation over the level (share of
    all cores) and the machine's load averages at its end."""
    cpu0 = process_tree_cpu_s(server_pid) if server_pid else None
    t0 = time.monotonic()
    results = asyncio.run(level(url, headers, n, utterances, sentences, mode))
    wall = time.monotonic() - t0
    cpu1 = process_tree_cpu_s(server_pid) if server_pid else None
    util = (cpu1 - cpu0) / wall / cpu_cores() if cpu0 is not None and cpu1 is not None \
        else None  # a server the bench did not start
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return results, {"mode": mode, "cpu_util": util, "wall_s": wall,
                     "loadavg_1_5_15": list(load)}


def summarize_level(n: int, results: list[dict[str, Any]],
                    files: dict[str, str] | None = None) -> dict[str, Any]:
    finals = [r["final_ms"] for r in results]
    file_side = {}
    if files:
        refs, texts = [r["ref"] for r in results], [r["text"] for r in results]
        file_texts = [files[r] for r in refs]
        file_side = {"file_wer": word_error_rate(refs, file_texts),
                     "wer_vs_file": word_error_rate(file_texts, texts)}
    firsts = [r["first_delta_ms"] for r in results if "first_delta_ms" in r]
    return {
        "sessions": n, "utterances": len(results),
        "final_p50_ms": percentile(finals, 50), "final_p90_ms": percentile(finals, 90),
        "final_max_ms": max(finals),
        "first_delta_p50_ms": percentile(firsts, 50) if firsts else float("nan"),
        "first_delta_p90_ms": percentile(firsts, 90) if firsts else float("nan"),
        "no_delta_before_done": len(results) - len(firsts),
        "wer": word_error_rate([r["ref"] for r in results], [r["text"] for r in results]),
        # utterances whose final text replaced their provisional deltas (did not continue them)
        "deltas_replaced": sum(r["replaced"] for r in results),
        "client_late_ms_max": max(r["sent_late_ms"] for r in results),
        **file_side,
    }


# ---- the server -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_sessions: int) -> tuple[subprocess.Popen[bytes], str, Path,
                                                          float]:
    import httpx

    port = _free_port()
    log = Path(tempfile.mkstemp(prefix="fornax-bench-realtime-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "fornax.api.cli", "serve", model, "--host", "127.0.0.1",
           "--port", str(port), "--max-num-seqs", str(max(8, 2 * max_sessions)),
           "--disable-log-requests"]
    start = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() - start < 300:
        if proc.poll() is not None:
            raise SystemExit(f"fornax serve exited:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url, log, time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("fornax serve did not become healthy in 300 s")


def run(args: argparse.Namespace) -> int:
    check_threads()
    levels = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
    sentences = load_sentences(args.audio)
    record = make_record("realtime", args.model, vars(args))
    proc = None
    if args.base_url:
        url, load_s = args.base_url.rstrip("/"), 0.0
    else:
        proc, url, log, load_s = start_server(args.model, max(levels))
        record["details"]["server_log"] = str(log)
    ws_url = url.replace("http", "ws", 1) + "/v1/realtime"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    try:
        t = time.monotonic()
        if args.warmup > 0:
            asyncio.run(level(ws_url, headers, 1, args.warmup, sentences))  # untimed
        record["startup"] = {"load_s": load_s, "warmup_s": time.monotonic() - t}
        runs, loads = [], []
        modes = _modes(args.modes) if isinstance(args.modes, str) else args.modes
        for mode in modes:
            for n in levels:
                logger.info("realtime: %d concurrent session(s) (%s), %d utterances each", n,
                            mode, args.utterances)
                results, load = measured_level(ws_url, headers, n, args.utterances, sentences,
                                               mode, proc.pid if proc is not None else None)
                runs.append(results)
                loads.append(load)
        used = {r["ref"] for run in runs for r in run}
        files = file_transcripts(url, headers, args.model,
                                 [s for s in sentences if s[0] in used])
        record["details"].update(file_transcripts=files, transcripts={
            r["ref"]: r["text"] for r in runs[0]})
        summaries = []
        for n, results, load in zip(levels * len(modes), runs, loads):
            summaries.append({**summarize_level(n, results, files), **load})
            logger.info("  p50 %.0f ms, p90 %.0f ms final; first delta p50 %.0f ms; WER %.3f "
                        "(vs the file transcript %.3f)", summaries[-1]["final_p50_ms"],
                        summaries[-1]["final_p90_ms"], summaries[-1]["first_delta_p50_ms"],
                        summaries[-1]["wer"], summaries[-1]["wer_vs_file"])
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    one = summaries[0]
    capacity = max((s["sessions"] for s in summaries
                    if s["final_p90_ms"] < args.slo_ms and s["mode"] == modes[0]), default=0)
    record["metrics"] = {
        "final_latency_p50_ms": one["final_p50_ms"], "final_latency_p90_ms": one["final_p90_ms"],
        "first_delta_p50_ms": one["first_delta_p50_ms"],
        "first_delta_p90_ms": one["first_delta_p90_ms"],
        "max_realtime_sessions": capacity, "wer": one["wer"],
        "file_wer": one["file_wer"], "wer_vs_file": one["wer_vs_file"],
        "num_utterances": sum(s["utterances"] for s in summaries),
    }
    record["details"].update(levels=summaries, slo_ms=args.slo_ms,
                             tested_up_to=max(levels),
                             omp_num_threads=env.OMP_NUM_THREADS.raw())
    print_table([[s["mode"], s["sessions"], s["final_p50_ms"], s["final_p90_ms"],
                  s["first_delta_p50_ms"], s["first_delta_p90_ms"], s["wer"], s["file_wer"],
                  s["wer_vs_file"], "-" if s["cpu_util"] is None else f"{100 * s['cpu_util']:.0f}",
                  s["deltas_replaced"]]
                 for s in summaries],
                ["mode", "sessions", "final p50 ms", "final p90 ms", "1st delta p50 ms",
                 "1st delta p90 ms", "WER", "file WER", "WER vs file", "CPU %",
                 "finals replacing deltas"],
                title=f"WS /v1/realtime, {args.model} (capacity at p90 < {args.slo_ms:g} ms, "
                f"{modes[0]}: {capacity} sessions)")
    write_json(record, args.output)
    return 0
