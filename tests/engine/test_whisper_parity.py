"""Whisper in the engine vs HF transformers' WhisperForConditionalGeneration on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fornax.audio.decode import decode_audio
from fornax.audio.transcribe import WhisperInfo
from fornax.runtime.config import make_engine_config
from fornax.runtime.engine.factory import make_engine_core
from fornax.runtime.engine.messages import EncoderInput, EngineCoreRequest
from fornax.runtime.sampling.params import SamplingParams
from helpers.whisper_fixtures import (
    AUDIO_DIR,
    one_thread,  # noqa: F401 - module fixture, used below
    packaged_whisper,
    tiny_whisper_dir,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _engine(path, **kwargs):
    kwargs.setdefault("dtype", "float32")
    return make_engine_core(make_engine_config(str(path), device="cpu", **kwargs))


def _forbidden(info: WhisperInfo, cfg, vocab: int) -> np.ndarray:
    """OpenAI's suppression for text-only decoding, written out independently of fornax."""
    ids = info.ids
    mask = np.zeros(vocab, dtype=bool)
    mask[list(cfg.suppress_tokens)] = True
    for key in ("sot", "sot_prev", "sot_lm", "translate", "transcribe", "no_timestamps"):
        mask[ids[key]] = True
    mask[list(info.language_ids.values())] = True
    mask[info.timestamp_begin:] = True
    if "no_speech" in ids:
        mask[ids["no_speech"]] = True
    return mask


def _hf_greedy(model, feats: np.ndarray, prompt: list[int], steps: int, forbid: np.ndarray,
               begin: list[int]) -> list[int]:
    tokens = list(prompt)
    with torch.inference_mode():
        enc = model.model.encoder(torch.from_numpy(feats)[None])
        for i in range(steps):
            logits = model(encoder_outputs=enc, decoder_input_ids=torch.tensor([tokens])
                           ).logits[0, -1].clone()
            logits[torch.from_numpy(forbid)] = -float("inf")
            if i == 0:
                logits[begin] = -float("inf")
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


def _run(engine, requests: list[EngineCoreRequest], stagger: int = 0,
         no_speech: dict[str, float] | None = None) -> dict[str, list[int]]:
    """Add requests (the later half after `stagger` steps, so prefills meet decodes)."""
    out: dict[str, list[int]] = {r.request_id: [] for r in requests}
    first = requests[: (len(requests) + 1) // 2]
    later = requests[len(first):]
    for r in first:
        engine.add_request(r)
    steps = 0
    while engine.has_unfinished_requests() or later:
        if steps == stagger and later:
            for r in later:
                engine.add_request(r)
            later = []
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
            if o.no_speech_prob is not None and no_speech is not None:
                no_speech[o.request_id] = o.no_speech_prob
        steps += 1
    return out


def test_tiny_random_whisper_greedy_matches_hf_in_a_mixed_batch():
    from transformers import WhisperForConditionalGeneration

    path = tiny_whisper_dir()
    hf = WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    info = WhisperInfo.from_folder(path)
    ids = info.ids
    engine = _engine(path)
    rng = np.random.default_rng(0)
    prompts = [
        [ids["sot"], ids["no_timestamps"]],
        [ids["sot_prev"], 464, 2068, 7586, ids["sot"], ids["no_timestamps"]],
        [ids["sot"], ids["no_timestamps"], 383],
        [ids["sot_prev"]] + list(range(1000, 1040)) + [ids["sot"], ids["no_timestamps"]],
        [ids["sot"], ids["no_timestamps"]],
    ]
    frames = 2 * hf.config.max_source_positions
    feats = [rng.normal(0, 0.6, (80, frames)).astype(np.float32) for _ in prompts]
    steps = 12
    requests = [EngineCoreRequest(
        f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True),
        encoder_input=EncoderInput(f.tobytes(), [80, frames]))
        for i, (p, f) in enumerate(zip(prompts, feats))]
    no_speech: dict[str, float] = {}
    got = _run(engine, requests, stagger=3, no_speech=no_speech)
    forbid = _forbidden(info, hf.config, hf.config.vocab_size)
    begin = list(hf.config.begin_suppress_tokens)
    for i, (p, f) in enumerate(zip(prompts, feats)):
        assert got[f"r{i}"] == _hf_greedy(hf, f, p, steps, forbid, begin), f"request {i}"
        sot = p.index(ids["sot"])  # P(no speech) is read at the start-of-transcript position
        with torch.inference_mode():
            logits = hf(input_features=torch.from_numpy(f)[None],
                        decoder_input_ids=torch.tensor([p[: sot + 1]])).logits[0, -1]
        want = float(logits.softmax(-1)[ids["no_speech"]])
        assert no_speech[f"r{i}"] == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert engine.kv.num_free_blocks() == engine.kv.pool.num_usable_blocks


@pytest.fixture(scope="module")
def tiny_en():
    """The packaged tiny.en as HF's model and feature extractor and as fornax's SpeechToText
    (loaded once for both cases below)."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from fornax.runtime.offline.speech import SpeechToText

    path = packaged_whisper("whisper-tiny.en")
    hf = WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    fe = WhisperFeatureExtractor.from_pretrained(path)
    stt = SpeechToText(str(path), dtype="float32")
    return hf, fe, stt, WhisperInfo.from_folder(path)


@pytest.mark.slow
@pytest.mark.parametrize(("timestamps", "files"), [(False, ("en_02.flac", "en_05.flac")),
                                                  (True, ("en_05.flac",))])
def test_tiny_en_matches_hf_generate_on_speech(tiny_en, timestamps: bool,
                                               files: tuple[str, ...]):
    """Real tiny.en weights (converted from CTranslate2): HF's own generate() vs the engine."""
    hf, fe, stt, info = tiny_en
    audios = [decode_audio((AUDIO_DIR / f).read_bytes()) for f in files]
    feats = fe(audios, sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        ref = hf.generate(feats, return_timestamps=timestamps).tolist()
    ours = stt.transcribe(audios, timestamps=timestamps)
    for r, o in zip(ref, ours):
        want = [t for t in r if t < info.eot or (timestamps and t >= info.timestamp_begin)]
        got = [t for s in o.segments for t in s.tokens]
        assert got == want
