"""The realtime transcriber without a server: the stable-text rule, partial and final decodes of
an utterance (the file-path final, previous-text conditioning) and the energy detector."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fornax.audio.streaming import is_break, stable_prefix
from fornax.audio.vad import EnergyVad, VadConfig

# ---- unit tests: stable text and voice activity ---------------------------------------------
PIECES = {1: " The", 2: " quick", 3: " brown", 4: " bro", 5: "wn", 6: ".", 7: " fox", 8: ","}


def test_stable_prefix_needs_agreement_and_a_whole_word():
    piece = PIECES.__getitem__
    # both decodes agree on "The quick brown" and go on with a new word: all three are stable
    assert stable_prefix([1, 2, 3, 7], [1, 2, 3, 6], 0, piece) == 3
    # the last shared word may be cut ("bro" + "wn" vs "brown"): only what precedes it
    assert stable_prefix([1, 2, 4, 5], [1, 2, 3, 7], 0, piece) == 2
    # agreement up to the end of a decode proves nothing about its last word
    assert stable_prefix([1, 2, 3], [1, 2, 3, 7], 0, piece) == 2
    # punctuation after a word closes it; never below what is already committed
    assert stable_prefix([1, 2, 8, 7], [1, 2, 6], 0, piece) == 2
    assert stable_prefix([1, 7], [1, 2, 3, 7], 2, piece) == 2
    assert stable_prefix([], [1, 2], 0, piece) == 0
    assert is_break(" word") and is_break("!") and not is_break("wn") and not is_break("'s")


WORDS = (" The", " cat", " sat", " on", " the", " mat", ".", " hat")


class _Tokenizer:
    """Whisper-like ids: 0.. are words (with their leading space), 100+ special."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(WORDS[i] for i in ids if i < len(WORDS))

    def encode(self, text, add_special_tokens=False):
        return SimpleNamespace(ids=[WORDS.index(" " + w) for w in text.split()])


def _transcriber(**kwargs):
    from fornax.audio.streaming import StreamConfig, StreamingTranscriber
    from fornax.audio.transcribe import WhisperInfo

    ids = {"sot": 101, "sot_prev": 102, "transcribe": 103, "translate": 104,
           "no_timestamps": 105, "eot": 100, "timestamp_begin": 106}
    info = WhisperInfo(ids, {}, False, 80, 448)
    return StreamingTranscriber(info, _Tokenizer(), config=StreamConfig(step_s=0.5,
                                                                        agree_gap_s=1.0),
                                **kwargs)


def test_transcriber_sends_agreed_words_once_and_the_rest_at_the_end():
    tr = _transcriber(vad=None)  # manual segments
    # each decode's continuation after the stable tokens in its prompt; "hat" misheard early
    hyps = iter([[0, 7], [0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 4]])
    sent, prompts = [], []
    for _ in range(20):  # 2 s of audio in 100 ms chunks
        tr.append(_tone(0.1, 0.3))
        job = tr.next_job()
        if job is not None:
            prompts.append(job.prompt)
            window = tr.window(job)
            assert window.features.shape == (80, -(-(len(job.segment.audio()[:job.num_samples])
                                                    // 160 + 100) // 100) * 100)
            out = tr.feed(job, next(hyps) + [100])
            sent.append(out.delta)
    # decodes at 0.5, 1.0, 1.5, 2.0 s; agreement needs a decode of 1 s less audio, and a
    # word that ends one of the two decodes may be cut: "sat" waits
    assert sent == ["", "", "The", " cat"]
    assert prompts[-1] == [101, 105, 0]  # stable tokens ride in the prompt
    assert tr.close() == 0
    # the item's final decode is the file path's: a 30 s window of all its audio, nothing forced
    out, window = _final(tr, [0, 1, 2, 3, 4, 5, 6, 100])
    assert window.prompt_token_ids == [101, 105] and window.features.shape == (80, 3000)
    assert window.content_frames == 200 and window.temperature == 0.0
    assert out.final and out.text == "The cat sat on the mat."
    assert out.delta == " sat on the mat." and out.num_samples == 32000  # it continues them
    assert "".join(sent) + out.delta == out.text and not tr.segments
    tr.append(_tone(0.3, 0.3))  # the next item: a separator before its first words
    assert tr.next_job() is None  # less than a step of audio: no partial decode yet
    tr.close()
    # conditioned on the previous item's text, as the file path conditions a window on the last
    out, window = _final(tr, [0, 7, 100])
    assert window.prompt_token_ids == [102, 0, 1, 2, 3, 4, 5, 6, 101, 105]
    assert out.final and out.delta == " The hat" and out.text == "The hat"
    # partial deltas are provisional: a final text that does not continue them replaces them
    for _ in range(20):
        tr.append(_tone(0.1, 0.3))
        job = tr.next_job()
        if job is not None:
            # partials see the session's previous text too
            assert job.prompt[:12] == [102, 0, 1, 2, 3, 4, 5, 6, 0, 7, 101, 105]
            tr.feed(job, [0, 1, 2, 3, 100])
    tr.close()
    out, _ = _final(tr, [0, 7, 2, 3, 4, 5, 6, 100])
    assert out.text == "The hat sat on the mat." and out.delta == ""


def _final(tr, tokens):
    """Run an ended item's final decode (one window) on `tokens`."""
    from fornax.audio.transcribe import WindowResult

    job = tr.next_job()
    assert job.item_final and job.final
    session = tr.final_session(job)
    window = session.next_request()
    session.feed(WindowResult(tokens))
    assert session.next_request() is None
    return tr.finish_item(job, session), window


def test_transcriber_segments_on_silence_and_decodes_the_item_again_at_its_end():
    """A pause starts the item's final decode early (speculative); it stands when the item ends
    with only silence after it, and is dropped when voice comes back."""
    from fornax.audio.transcribe import WindowResult

    tr = _transcriber()
    silence = np.zeros(1600, np.float32)
    notices = []
    for chunk in [silence] * 3 + [_tone(0.1, 0.3)] * 10:
        notices += tr.append(chunk)
    assert [n.kind for n in notices] == ["start"]
    seg = tr.segments[0]
    assert abs(seg.start_sample / 16000 - 0.0) < 0.05  # the onset minus 300 ms of padding
    for _ in range(3):
        tr.append(silence)
    # a 300 ms pause: the item's final decode starts now, over the audio so far (file path)
    job = tr.next_job()
    assert job is not None and job.item_final and job.speculative
    spoken = job.num_samples
    session = tr.final_session(job)
    window = session.next_request()
    session.feed(WindowResult([0, 1, 100]))
    tr.speculation_done(job, session)
    assert window.features.shape == (80, 3000) and window.content_frames == spoken // 160
    assert tr.next_job() is None  # its result stands while only silence comes
    for _ in range(3):
        notices += tr.append(silence)
    assert [n.kind for n in notices] == ["start", "stop"] and seg.closed
    # the item ended with no voice since the pause: the speculative decode is its final one
    job = tr.next_job()
    assert job.item_final and job.ready is session and job.num_samples == spoken
    out = tr.finish_item(job, job.ready)
    assert out.final and out.delta == "The cat" and out.text == "The cat" and not tr.segments
    assert out.num_samples == seg.num_samples > spoken  # the item's audio, silence included
    # voice after the pause makes the speculative decode stale: the item's end decodes again
    for chunk in [_tone(0.1, 0.3)] * 10 + [silence] * 3:
        notices += tr.append(chunk)
    job = tr.next_job()
    assert job.speculative
    session = tr.final_session(job)
    session.next_request()
    session.feed(WindowResult([0, 100]))
    tr.speculation_done(job, session)
    for chunk in [_tone(0.1, 0.3)] * 5 + [silence] * 6:
        tr.append(chunk)
    out, window = _final(tr, [0, 1, 100])
    assert out.final and out.text == "The cat" and window.content_frames > job.num_samples // 160


def _tone(seconds: float, level: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (level * np.sin(2 * np.pi * 220 * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(
        np.float32)


def test_vad_finds_speech_with_padding_and_ends_it_after_the_silence():
    rng = np.random.default_rng(0)

    def noise(seconds: float) -> np.ndarray:
        return rng.normal(0, 0.002, int(seconds * 16000)).astype(np.float32)

    audio = np.concatenate([noise(1.0), _tone(1.0, 0.3), noise(0.3), _tone(0.5, 0.3),
                            noise(1.0), _tone(0.4, 0.3), noise(0.2)])
    vad = EnergyVad(VadConfig(silence_duration_ms=500, prefix_padding_ms=300))
    events = []
    for i in range(0, len(audio), 1600):  # 100 ms chunks, like a client
        events += vad.feed(audio[i:i + 1600])
    kinds = [e.kind for e in events]
    assert kinds == ["start", "stop", "start"]  # a 300 ms pause does not end the utterance
    assert abs(events[0].sample / 16000 - (1.0 - 0.3)) < 0.1  # onset minus the padding
    assert abs(events[1].sample / 16000 - 2.8) < 0.1  # where the voice stopped
    assert events[1].at - events[1].sample == pytest.approx(8000, abs=320)  # after 500 ms
    assert vad.speaking


def test_vad_learns_steady_noise_and_ignores_digital_silence():
    rng = np.random.default_rng(1)
    hum = (0.05 * rng.normal(0, 1, 16000 * 6)).astype(np.float32)  # loud steady noise
    vad = EnergyVad()
    events = vad.feed(hum)
    assert [e.kind for e in events] in ([], ["start", "stop"])  # learned within about a second
    speech = hum[:16000].copy() + _tone(1.0, 0.5)
    assert [e.kind for e in vad.feed(speech)] == ["start"]
    quiet = EnergyVad()
    assert quiet.feed(np.zeros(16000 * 3, np.float32)) == []


class _ScriptedVad:
    """A turn detector whose per-frame decisions are scripted: 'v' voiced, 's' silent, 'n'
    neither (silero's hysteresis band: soft speech that keeps the utterance open)."""

    def __init__(self, script: str) -> None:
        from fornax.audio.vad import TurnDetector

        class _Vad(TurnDetector):
            def feed(inner, samples):  # noqa: N805
                events = []
                for _ in range(len(inner._frames(samples))):
                    kind = script[inner._frame] if inner._frame < len(script) else "s"
                    if (event := inner._step(kind == "v", kind == "s")) is not None:
                        events.append(event)
                return events

        self.vad = _Vad(VadConfig())


def test_speculative_final_is_stale_after_soft_speech_that_kept_the_item_open():
    """Frames in the detector's hysteresis band after the pause (neither voiced nor silent:
    they reset the silence, the utterance goes on) make the pause's final decode stale: its
    audio lacks them, so the item's end decodes again over all of it."""
    from fornax.audio.transcribe import WindowResult

    tr = _transcriber()
    # 20 ms frames: 0.5 s voiced, 0.4 s silent (a pause), 0.3 s soft speech, then silence
    tr._vad = _ScriptedVad("v" * 25 + "s" * 20 + "n" * 15).vad
    frame = np.zeros(320, np.float32)
    for _ in range(45):
        tr.append(frame)
    job = tr.next_job()
    assert job is not None and job.speculative
    session = tr.final_session(job)
    session.next_request()
    session.feed(WindowResult([0, 1, 100]))
    tr.speculation_done(job, session)
    notices = []
    for _ in range(15 + 30):  # the soft speech, then silence until the detector's stop
        notices += tr.append(frame)
    assert [n.kind for n in notices] == ["stop"]
    job = tr.next_job()
    assert job.item_final and job.ready is None  # decoded again, not the pause's result
    assert job.num_samples > 60 * 320  # over the soft speech too


def test_a_speculative_final_in_flight_gives_way_when_voice_comes_back():
    """The session's decode worker aborts a pause's final decode once voice resumes (its result
    could not stand), instead of holding the session, and the gate's final slot, until it ends."""
    import asyncio

    from fornax.api.realtime.gate import DecodeGate
    from fornax.api.realtime.worker import DecodeWorker

    class _Group:
        async def next(self):
            await asyncio.Event().wait()  # the engine never answers: only an abort ends it

    added: list[_Group] = []
    released: list[_Group] = []

    class _Engine:
        dead = False

        async def add(self, requests):
            added.append(_Group())
            return added[-1]

        async def release(self, group):
            released.append(group)

        async def abort(self, rids):
            pass

    async def run() -> None:
        tr = _transcriber()
        tr._vad = _ScriptedVad("v" * 25 + "s" * 20 + "v" * 60).vad
        frame = np.zeros(320, np.float32)
        for _ in range(45):
            tr.append(frame)
        gate = DecodeGate()
        state = SimpleNamespace(engine=_Engine(), metrics=None)

        async def ignore(*_):
            pass

        worker = DecodeWorker(state, tr, "s", ignore, ignore, gate=gate)
        worker.enabled = True
        worker.start()
        worker.poke()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if added:
                break
        assert worker._job.speculative and gate.finals == 1 and not released
        for _ in range(10):  # voice again
            tr.append(frame)
            worker.poke()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if released:
                break
        assert released[:1] == added[:1] and gate.finals == 0  # aborted: the final slot is free
        await worker.close()

    asyncio.run(run())
