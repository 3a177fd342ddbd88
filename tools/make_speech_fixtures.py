"""Speak the test sentences with espeak-ng into small committed fixtures (run once; tests need no apt).

    python tools/make_speech_fixtures.py [--out tests/fixtures/audio]

Writes 16 kHz mono FLAC files (English sentences, one German sentence), one ~75 s OGG/Vorbis
recording of many sentences with pauses, and `manifest.json` with the spoken text of each.
espeak-ng settings (US English, 130 words/min, 40 ms word gaps) were picked for intelligibility.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger("make_speech_fixtures")

SHORT = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "The weather is nice today, so we will walk to the park after lunch.",
    "I would like a cup of coffee with milk and no sugar.",
    "My sister reads a book every week before she goes to sleep.",
    "We need to finish the report before the meeting on Friday.",
    "The children played in the garden until the sun went down.",
    "He opened the window because the room was too warm.",
]
LONG = [
    "Good morning and welcome to the weekly team meeting.",
    "Today we will talk about the new office and the plans for next month.",
    "The building has three floors and a large kitchen for everyone.",
    "Each team will have its own room near the windows.",
    "We will move all the computers on the first weekend of the month.",
    "Please pack your desk into the boxes before Friday afternoon.",
    "The movers will arrive early on Saturday morning.",
    "If you have heavy equipment, tell your manager this week.",
    "The parking garage is under the building and it is free for staff.",
    "There is also a bus stop just across the street.",
    "Lunch will be served in the kitchen every day at noon.",
    "We hope that everyone will enjoy working in the new place.",
    "If you have any questions, please send them to the office manager.",
    "Thank you all for listening, and have a wonderful day.",
]
GERMAN = "Das Wetter ist heute sehr schön, und wir gehen in den Park."
VOICE = ("-v", "en-us", "-s", "130", "-g", "4")
GERMAN_VOICE = ("-v", "de", "-s", "120", "-g", "4")
PAUSE_S = 0.8


def speak(text: str, voice: tuple[str, ...]) -> np.ndarray:
    """espeak-ng's 22.05 kHz output, resampled to 16 kHz float32."""
    import soundfile as sf
    import soxr

    with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
        subprocess.run(["espeak-ng", *voice, "-w", tmp.name, text], check=True)
        audio, rate = sf.read(tmp.name, dtype="float32")
    return soxr.resample(audio, rate, 16000).astype(np.float32)


def main() -> None:
    import soundfile as sf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/audio"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, object] = {"short": {}, "long": {}, "german": {}}
    for i, text in enumerate(SHORT):
        name = f"en_{i:02d}.flac"
        sf.write(out / name, speak(text, VOICE), 16000, format="FLAC")
        manifest["short"][name] = text  # type: ignore[index]
    pause = np.zeros(int(PAUSE_S * 16000), dtype=np.float32)
    parts = []
    for text in LONG:
        parts += [speak(text, VOICE), pause]
    long_audio = np.concatenate(parts)
    sf.write(out / "en_long.ogg", long_audio, 16000, format="OGG", subtype="VORBIS")
    manifest["long"] = {"en_long.ogg": LONG}
    sf.write(out / "de_00.flac", speak(GERMAN, GERMAN_VOICE), 16000, format="FLAC")
    manifest["german"] = {"de_00.flac": GERMAN}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    logger.info("wrote %d files to %s (long recording: %.1f s)", len(SHORT) + 2, out,
                len(long_audio) / 16000)


if __name__ == "__main__":
    main()
