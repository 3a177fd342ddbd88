"""Live captions from fornax's WS /v1/realtime: stream a WAV file (or the microphone) in real time.

    python tools/realtime_captions.py speech.wav                     # vLLM's protocol, 16 kHz
    python tools/realtime_captions.py speech.flac --protocol openai  # OpenAI's, 24 kHz
    python tools/realtime_captions.py --mic                          # needs `sounddevice`

Audio goes out in 100 ms chunks at real-time pace (`--speed 2` sends twice as fast). On a
terminal, the server's deltas show as a dimmed live line, rewritten in place as they arrive; the
final text (OpenAI's `...transcription.completed` per utterance, vLLM's `transcription.done` per
task) then replaces that line, so a word the partials heard wrongly is corrected on screen. Each
final line starts with the time since the start at which its first delta came; piped output gets
only the final lines. `--api-key` (or FORNAX_API_KEY) is sent as `Authorization: Bearer`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator

import numpy as np

CHUNK_S = 0.1


def load_audio(path: str, rate: int) -> np.ndarray:
    """Mono float32 samples of any file soundfile (or librosa) reads, at `rate` Hz."""
    import soundfile as sf

    try:
        audio, sr = sf.read(path, dtype="float32", always_2d=True)
        audio = audio.mean(axis=1)
    except RuntimeError:
        import librosa

        audio, sr = librosa.load(path, sr=None, mono=True)
    if sr != rate:
        import soxr

        audio = soxr.resample(audio, sr, rate)
    return np.asarray(audio, dtype=np.float32)


def pcm16_b64(samples: np.ndarray) -> str:
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    return base64.b64encode(pcm.tobytes()).decode()


async def file_chunks(path: str, rate: int, speed: float) -> AsyncIterator[np.ndarray]:
    audio = load_audio(path, rate)
    audio = np.concatenate([audio, np.zeros(int(rate * 0.6), np.float32)])  # let VAD see the end
    step = int(rate * CHUNK_S)
    start = time.monotonic()
    for i, pos in enumerate(range(0, len(audio), step)):
        yield audio[pos:pos + step]
        delay = start + (i + 1) * CHUNK_S / speed - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def mic_chunks(rate: int) -> AsyncIterator[np.ndarray]:
    import sounddevice  # optional: only for --mic

    queue: asyncio.Queue[np.ndarray] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def callback(data, frames, when, status):
        loop.call_soon_threadsafe(queue.put_nowait, data[:, 0].copy())

    with sounddevice.InputStream(samplerate=rate, channels=1, dtype="float32",
                                 blocksize=int(rate * CHUNK_S), callback=callback):
        print("listening (Ctrl-C to stop)", file=sys.stderr)
        while True:
            yield await queue.get()


class Captions:
    """Provisional text per open utterance, drawn as one dimmed live line on a terminal; an
    utterance's final text replaces it and stays as a line of its own."""

    def __init__(self, out=sys.stdout) -> None:
        self.out = out
        self.start = time.monotonic()
        self.tty = out.isatty()
        self.partials: dict[str, str] = {}  # utterance -> its deltas so far
        self.since: dict[str, float] = {}  # utterance -> when its first delta came

    def _now(self) -> float:
        return time.monotonic() - self.start

    def delta(self, key: str, text: str) -> None:
        self.since.setdefault(key, self._now())
        self.partials[key] = self.partials.get(key, "") + text
        self._draw()

    def final(self, key: str, text: str) -> None:
        """The utterance's final text: it replaces the live line's partial text."""
        since = self.since.pop(key, self._now())
        self.partials.pop(key, None)
        self._clear()
        if text.strip():
            self.out.write(f"[{since:6.2f}s] {text.strip()}\n")
        self._draw()

    def _clear(self) -> None:
        if self.tty:
            self.out.write("\r\033[K")

    def _draw(self) -> None:
        if self.tty:
            text = " ".join(t.strip() for t in self.partials.values() if t.strip())
            since = min(self.since.values(), default=self._now())
            prefix = f"[{since:6.2f}s] "
            room = max(10, shutil.get_terminal_size().columns - len(prefix) - 1)
            if len(text) > room:
                text = "..." + text[-(room - 3):]
            self.out.write(f"\r\033[K{prefix}\033[2m{text}\033[0m" if text else "\r\033[K")
        self.out.flush()

    def end(self) -> None:
        self._clear()
        self.out.flush()


async def run(args: argparse.Namespace) -> int:
    import websockets

    openai = args.protocol == "openai"
    rate = 24000 if openai else 16000
    url = args.url.rstrip("/") + "/v1/realtime" + ("?intent=transcription" if openai else "")
    key = args.api_key or os.environ.get("FORNAX_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else None
    chunks = mic_chunks(rate) if args.mic else file_chunks(args.audio, rate, args.speed)
    captions = Captions()
    async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:
        first = json.loads(await ws.recv())
        if first["type"] == "error":
            print(f"error: {first}", file=sys.stderr)
            return 1
        if openai:
            await ws.send(json.dumps({"type": "transcription_session.update", "session": {
                "input_audio_format": "pcm16",
                "input_audio_transcription": {"model": args.model} if args.model else {},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}))
        else:
            await ws.send(json.dumps({"type": "session.update", "model": args.model}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))

        async def sender() -> None:
            async for chunk in chunks:
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": pcm16_b64(chunk)}))
            if not openai:
                await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
            else:
                await asyncio.sleep(args.linger)
                await ws.close()

        task = asyncio.create_task(sender())
        try:
            async for message in ws:
                event = json.loads(message)
                kind = event["type"]
                if kind == "transcription.delta":
                    captions.delta("task", event["delta"])
                elif kind == "conversation.item.input_audio_transcription.delta":
                    captions.delta(event["item_id"], event["delta"])
                elif kind == "conversation.item.input_audio_transcription.completed":
                    captions.final(event["item_id"], event["transcript"])
                elif kind == "transcription.done":
                    captions.final("task", event["text"])
                    break
                elif kind == "error":
                    captions.end()
                    print(f"error: {event['error']}", file=sys.stderr)
        except websockets.ConnectionClosed:
            pass
        finally:
            task.cancel()
    captions.end()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("audio", nargs="?", help="an audio file (WAV, FLAC, OGG, ...)")
    p.add_argument("--mic", action="store_true", help="stream the microphone (needs sounddevice)")
    p.add_argument("--url", default="ws://127.0.0.1:8000", help="the server (ws:// or wss://)")
    p.add_argument("--protocol", choices=("vllm", "openai"), default="vllm")
    p.add_argument("--model", default=None, help="model name (default: the server's)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--speed", type=float, default=1.0, help="send faster than real time")
    p.add_argument("--linger", type=float, default=3.0,
                   help="openai: seconds to wait for the last captions after the audio")
    args = p.parse_args(argv)
    if not args.mic and not args.audio:
        p.error("give an audio file or --mic")
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
