"""The encoder-decoder engine core on a tiny random Whisper: batching, preemption, aborts, refusals,
language detection, timestamp rules and alignment output."""

from __future__ import annotations

import numpy as np
import pytest

from fornax.audio.transcribe import WhisperInfo
from fornax.runtime.config import make_engine_config
from fornax.runtime.encoder_decoder.decoding import MAX_INITIAL_TIMESTAMP_INDEX
from fornax.runtime.engine.factory import make_engine_core
from fornax.runtime.engine.messages import EncoderInput, EngineCoreRequest
from fornax.runtime.errors import RequestError
from fornax.runtime.sampling.params import SamplingParams
from helpers.whisper_fixtures import (
    one_thread,  # noqa: F401 - module fixture, used below
    tiny_whisper_dir,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    path = tiny_whisper_dir()
    return path, WhisperInfo.from_folder(path)


def _engine(path, **kwargs):
    return make_engine_core(make_engine_config(str(path), dtype="float32", device="cpu",
                                               **kwargs))


def _feats(seed: int, frames: int = 300) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.6, (80, frames)).astype(np.float32)


def _req(rid: str, prompt: list[int], seed: int, max_tokens: int = 30, **enc) -> EngineCoreRequest:
    f = _feats(seed)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return EngineCoreRequest(rid, prompt, params,
                             encoder_input=EncoderInput(f.tobytes(), list(f.shape), **enc))


def _drain(engine, abort_after: dict[str, int] | None = None) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        steps += 1
        for rid, at in (abort_after or {}).items():
            if steps == at:
                engine.abort_requests([rid])
    assert engine.kv.num_free_blocks() == engine.kv.pool.num_usable_blocks, "KV blocks leaked"
    return out


def test_concurrent_equals_solo_and_survives_preemption_and_aborts(tiny):
    path, info = tiny
    prompt = [info.ids["sot"], info.ids["no_timestamps"]]
    solo = {}
    engine = _engine(path)
    for i in range(4):
        engine.add_request(_req(f"r{i}", prompt, seed=i))
        solo.update(_drain(engine))
    for i in range(4):
        engine.add_request(_req(f"r{i}", prompt, seed=i))
    assert _drain(engine) == solo
    # 6 usable blocks of 16 tokens for 4 requests of 32 tokens: preemption and recompute
    small = _engine(path, num_gpu_blocks=7, max_num_batched_tokens=64, max_model_len=64)
    for i in range(4):
        small.add_request(_req(f"r{i}", prompt, seed=i))
    assert _drain(small) == solo
    assert small.scheduler.num_preemptions > 0
    # an abort in the middle moves the last row's cross K/V into the freed slot
    for i in range(4):
        engine.add_request(_req(f"r{i}", prompt, seed=i))
    got = _drain(engine, abort_after={"r1": 5})
    assert len(got["r1"]) < 30
    assert {k: v for k, v in got.items() if k != "r1"} == {k: v for k, v in solo.items()
                                                            if k != "r1"}


def test_bad_requests_are_refused_and_the_engine_keeps_working(tiny):
    path, info = tiny
    engine = _engine(path)
    good = [info.ids["sot"], info.ids["no_timestamps"]]
    f = _feats(0)
    nan = f.copy()
    nan[3, 7] = np.nan
    params = SamplingParams(max_tokens=4)
    bad = [
        EngineCoreRequest("a", good, params),  # no audio: a text prompt to a speech model
        EngineCoreRequest("b", good, params, encoder_input=EncoderInput(f.tobytes(), [80, 299])),
        EngineCoreRequest("c", good, params, encoder_input=EncoderInput(f.tobytes()[:-4],
                                                                         [80, 300])),
        EngineCoreRequest("d", good, params, encoder_input=EncoderInput(nan.tobytes(), [80, 300])),
        EngineCoreRequest("e", [10**7], params, encoder_input=EncoderInput(f.tobytes(), [80, 300])),
        EngineCoreRequest("f", [], params, encoder_input=EncoderInput(f.tobytes(), [80, 300])),
        EngineCoreRequest("g", good, SamplingParams(n=2),
                          encoder_input=EncoderInput(f.tobytes(), [80, 300])),
        EngineCoreRequest("h", good, params, encoder_input=EncoderInput(
            f.tobytes(), [80, 300], forced_token_ids=[-3])),
        EngineCoreRequest("i", good, params, encoder_input=EncoderInput(
            (f * 1e30).tobytes(), [80, 300])),
        EngineCoreRequest("j", good, params, encoder_input=EncoderInput(  # longer than a window
            np.zeros((80, 301), np.float32).tobytes(), [80, 301])),
        EngineCoreRequest("k", good, params, encoder_input=EncoderInput(
            f[:79].tobytes(), [79, 300])),
    ]
    for req in bad:
        with pytest.raises(RequestError):
            engine.add_request(req)
    assert not engine.has_unfinished_requests()
    engine.add_request(_req("ok", good, seed=0, max_tokens=5))
    assert len(_drain(engine)["ok"]) == 5


def test_language_detection_then_forced_tokens_equals_explicit_prompt(tiny):
    path, info = tiny
    ids = info.ids
    engine = _engine(path)
    forced = [ids["transcribe"], ids["no_timestamps"]]
    engine.add_request(_req("d", [ids["sot"]], seed=3, max_tokens=12, detect_language=True,
                            forced_token_ids=forced))
    out = _drain(engine)["d"]
    assert out[0] in info.language_ids.values() and out[1:3] == forced
    engine.add_request(_req("e", [ids["sot"], out[0], *forced], seed=3, max_tokens=9))
    assert _drain(engine)["e"] == out[3:]


def test_timestamp_rules_hold_and_alignment_covers_every_token(tiny):
    path, info = tiny
    tsb, eot = info.timestamp_begin, info.eot
    engine = _engine(path)
    for i in range(3):
        engine.add_request(_req(f"t{i}", [info.ids["sot"]], seed=10 + i, max_tokens=40,
                                return_alignment=True))
    alignments = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finish_reason:
                alignments[o.request_id] = o.alignment
    engine2 = _engine(path)
    for i in range(3):
        engine2.add_request(_req(f"t{i}", [info.ids["sot"]], seed=10 + i, max_tokens=40))
    outs = _drain(engine2)
    for rid, tokens in outs.items():
        assert tsb <= tokens[0] <= tsb + MAX_INITIAL_TIMESTAMP_INDEX, "starts with a timestamp"
        stamps = [t for t in tokens if t >= tsb]
        assert stamps == sorted(stamps), "timestamps never decrease"
        for a, b, c in zip(tokens, tokens[1:], tokens[2:]):
            assert not (a >= tsb and b >= tsb and c >= tsb), "no three timestamps in a row"
        assert not any(info.ids["sot"] <= t < tsb for t in tokens), "no special tokens"
        align = alignments[rid]
        assert align is not None and len(align) == len(tokens)
        frames = [f for t, f in zip(tokens, align) if t <= eot]
        assert all(f >= 0 for f in frames) and frames == sorted(frames)
        assert all(f == -1 for t, f in zip(tokens, align) if t > eot)


def test_a_burst_is_admitted_one_encoder_batch_per_step(tiny):
    from fornax.runtime.encoder_decoder.core import MAX_NEW_PER_STEP

    path, info = tiny
    engine = _engine(path)
    prompt = [info.ids["sot"], info.ids["no_timestamps"]]
    n = MAX_NEW_PER_STEP + 3
    for i in range(n):
        engine.add_request(_req(f"b{i}", prompt, seed=i, max_tokens=6))
    first = engine.step()
    assert engine.scheduler.num_running == MAX_NEW_PER_STEP
    assert engine.scheduler.num_waiting == 3
    second = engine.step()
    assert engine.scheduler.num_running == n
    out = _drain(engine)
    for o in first + second:
        out[o.request_id] = o.new_token_ids + out.get(o.request_id, [])
    assert sorted(out) == sorted(f"b{i}" for i in range(n))
    assert all(len(v) == 6 for v in out.values())


def test_urgent_requests_are_admitted_first_and_alone(tiny):
    """Realtime finals (priority 0) go before partials (1) that arrived earlier, in a step of
    their own, whatever the scheduling policy."""
    path, info = tiny
    engine = _engine(path)
    prompt = [info.ids["sot"], info.ids["no_timestamps"]]
    for i in range(3):
        req = _req(f"partial{i}", prompt, seed=i, max_tokens=4)
        req.priority = 1
        engine.add_request(req)
    for i in range(2):
        engine.add_request(_req(f"final{i}", prompt, seed=10 + i, max_tokens=4))
    engine.step()
    assert sorted(r.request_id for r in engine.scheduler.running) == ["final0", "final1"]
    engine.step()
    assert engine.scheduler.num_running == 5 and engine.scheduler.num_waiting == 0
    assert all(len(v) >= 2 for v in _drain(engine).values())


def test_short_windows_batch_with_full_ones_and_match_their_solo_run(tiny):
    """Realtime partials send fewer frames than a window: encoded at their length (nearby
    lengths padded with silence into one forward), then continued by the encoder states of
    silence; the tokens equal each window's own run."""
    path, info = tiny
    prompt = [info.ids["sot"], info.ids["no_timestamps"]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def req(rid, frames, seed):
        f = np.ascontiguousarray(_feats(seed)[:, :frames])
        return EngineCoreRequest(rid, prompt, params,
                                 encoder_input=EncoderInput(f.tobytes(), list(f.shape)))

    sizes = {"s100": 100, "s100b": 100, "s200": 200, "full": 300}
    solo = {}
    for i, (rid, frames) in enumerate(sizes.items()):
        engine = _engine(path)
        engine.add_request(req(rid, frames, i))
        solo.update(_drain(engine))
    engine = _engine(path)
    for i, (rid, frames) in enumerate(sizes.items()):
        engine.add_request(req(rid, frames, i))
    together = _drain(engine)
    assert together == solo and all(len(t) == 6 for t in together.values())


def test_small_steps_on_one_thread_give_the_same_tokens_and_restore_the_thread_count(tiny):
    """With two torch threads, a decode step of a few tokens runs its layers and rules on one
    thread and the vocabulary projection on both (runner.SMALL_STEP_TOKENS); the tokens equal a
    one-thread run's and the process's thread count is what it was after every step."""
    import torch

    path, info = tiny
    prompt = [info.ids["sot"], info.ids["no_timestamps"]]
    engine = _engine(path)
    engine.add_request(_req("one", prompt, seed=7))
    expected = _drain(engine)["one"]
    torch.set_num_threads(2)
    try:
        engine.add_request(_req("two", prompt, seed=7))
        got: list[int] = []
        while engine.has_unfinished_requests():
            for o in engine.step():
                got.extend(o.new_token_ids)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert got == expected and len(got) == 30


def test_encoder_batches_across_sessions_equal_each_window_alone(tiny):
    """One encoder forward for several sessions' windows: full windows together and short ones
    within SHORT_PAD_FRAMES of each other padded with silence to the longest. Each row's cross
    keys/values equal those of its window encoded alone (the short one: its silence-padded
    window) within 1e-4 (float32; the batch only changes the order of the matmul sums)."""
    import torch

    from fornax.runtime.encoder_decoder.runner import SILENCE_LOG_MEL, batch_groups

    path, _ = tiny
    runner = _engine(path).runner
    full = runner.spec.num_frames
    windows = [_feats(1, full), _feats(2, full), _feats(3, 100), _feats(4, 160), _feats(5, 40)]
    pending = list(enumerate(windows))
    groups = batch_groups(pending, full)
    assert [(frames, [r for r, _ in chunk]) for frames, chunk in groups] == \
        [(full, [0, 1]), (160, [4, 2, 3])]
    assert len(groups) < len(windows)  # fewer forwards than windows

    def cross(rows: list[int]) -> list[torch.Tensor]:
        return [store[rows].clone() for store in runner.cross_stores]

    with torch.inference_mode():
        runner._encode(pending)
        batched = cross(list(range(len(windows))))
        for row, feats in pending:
            if feats.shape[1] < full and feats.shape[1] != 160:  # alone, as padded in its batch
                feats = np.pad(feats, ((0, 0), (0, 160 - feats.shape[1])),
                               constant_values=SILENCE_LOG_MEL)
            runner._encode([(row, feats)])
        alone = cross(list(range(len(windows))))
    for b, a in zip(batched, alone):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    # and padding is silence: the 100-frame window's states differ from the 160-frame one's
    assert not torch.allclose(batched[0][2], batched[0][3])
