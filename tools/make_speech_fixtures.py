"""Speak the test sentences with espeak-ng into small committed fixtures (run once; tests need no apt).

    python tools/make_speech_fixtures.py [--out tests/fixtures/audio] [--only realtime]

Writes 16 kHz mono FLAC files (English sentences, one German sentence), one ~75 s OGG/Vorbis
recording of many sentences with pauses, and `manifest.json` with the spoken text of each.
espeak-ng settings (US English, 130 words/min, 40 ms word gaps) were picked for intelligibility.
The realtime parity recordings (`rt_*.ogg`, 10-60 s each) use several voices, rates and pause
lengths (espeak-ng's own silence trimmed; 0.15-0.3 s pauses too short to end an utterance: one
utterance of 22 s, one of 39 s, past a 30 s window);
`--only realtime` writes just those and merges their entry into the manifest.
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
# realtime parity recordings: name -> (espeak-ng voice, pause after each sentence in s, text)
REALTIME: dict[str, tuple[tuple[str, ...], float, list[str]]] = {
    "rt_us_f150.ogg": (("-v", "en-us+f3", "-s", "150", "-g", "3"), 0.7, [
        "The library opens at nine in the morning and closes at six.",
        "Students can borrow up to ten books for three weeks.",
        "The reading room on the second floor is always quiet.",
        "Please return your books to the desk near the main door.",
    ]),
    "rt_gb_m175.ogg": (("-v", "en-gb+m3", "-s", "175", "-g", "2"), 0.3, [
        "My grandfather grew tomatoes and beans in a small garden behind the house.",
        "Every summer he gave the extra vegetables to the neighbours.",
        "He said that a garden teaches patience better than any book.",
        "When it rained he sat by the window and listened to the radio.",
        "On Sundays the whole family came for a long dinner.",
        "We still talk about his stories when we meet.",
    ]),
    "rt_us_m120_long.ogg": (("-v", "en-us", "-s", "120", "-g", "3"), 0.15, [
        "The train to the coast leaves every hour from the central station.",
        "Tickets are cheaper if you buy them a few days before you travel.",
        "The journey takes about two hours and passes through green hills and small villages.",
        "There is a cafe on the train where you can buy sandwiches and hot drinks.",
        "When you arrive, the beach is only a short walk from the station.",
        "Many families spend the whole day there and take the last train home.",
    ]),
    "rt_rp_f160_mixed.ogg": (("-v", "en-gb-x-rp+f2", "-s", "160", "-g", "3"), 0.9, [
        "Our company was founded twenty years ago in a small garage.",
        "At first there were only three people and one old computer.",
        "Today we have offices in four countries and more than two hundred employees.",
        "We build software that helps farmers plan their harvest.",
        "The weather forecast is the most important part of the system.",
        "Farmers check it every morning before they go to the fields.",
        "Last year we added a tool that measures the water in the soil.",
        "It sends a message to the phone when the plants need water.",
        "Next spring we will open a new office in the south.",
        "We are looking for engineers who enjoy working outside.",
        "If you are interested, please visit our website and send us a letter.",
    ]),
}


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
    parser.add_argument("--only", choices=["realtime"], default=None,
                        help="write only the realtime parity recordings (merge the manifest)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.only == "realtime":
        path = out / "manifest.json"
        old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        old["realtime"] = write_realtime(out)
        path.write_text(json.dumps(old, indent=1, ensure_ascii=False) + "\n")
        return
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
    manifest["realtime"] = write_realtime(out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    logger.info("wrote %d files to %s (long recording: %.1f s)", len(SHORT) + 2, out,
                len(long_audio) / 16000)


def trim(audio: np.ndarray, level_db: float = -45.0, keep_s: float = 0.05) -> np.ndarray:
    """The audio from `keep_s` before its first 10 ms louder than `level_db` dBFS to `keep_s`
    after its last."""
    n = len(audio) // 160
    frames = audio[: n * 160].reshape(n, 160).astype(np.float64)
    loud = np.nonzero(10 * np.log10(np.maximum((frames * frames).mean(axis=1), 1e-12))
                      > level_db)[0]
    if not len(loud):
        return audio
    keep = int(keep_s * 16000)
    return audio[max(0, loud[0] * 160 - keep):(loud[-1] + 1) * 160 + keep]


def write_realtime(out: Path) -> dict[str, str]:
    """The realtime parity recordings (OGG/Vorbis); returns name -> the text spoken."""
    import soundfile as sf

    texts = {}
    for name, (voice, pause_s, sentences) in REALTIME.items():
        pause = np.zeros(int(pause_s * 16000), dtype=np.float32)
        lead = np.zeros(int(0.3 * 16000), dtype=np.float32)
        parts = [lead]
        for text in sentences:  # espeak-ng's own silence around a sentence trimmed: the
            parts += [trim(speak(text, voice)), pause]  # pause is exactly pause_s
        audio = np.concatenate(parts + [lead])
        sf.write(out / name, audio, 16000, format="OGG", subtype="VORBIS")
        texts[name] = " ".join(sentences)
        logger.info("%s: %.1f s", name, len(audio) / 16000)
    return texts


if __name__ == "__main__":
    main()
