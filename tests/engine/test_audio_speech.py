"""Real speech through the packaged tiny.en (espeak-ng fixtures): word error rate, and a long
recording across window seams (German with whisper-base runs over HTTP in test_api_audio.py)."""

from __future__ import annotations

import pytest

from helpers.whisper_fixtures import (
    AUDIO_DIR,
    edit_distance,
    manifest,
    normalize_words,
    one_thread,  # noqa: F401 - module fixture, used below
    packaged_whisper,
    word_error_rate,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def tiny_en():
    from fornax.runtime.offline.speech import SpeechToText

    return SpeechToText(str(packaged_whisper("whisper-tiny.en")), dtype="float32", device="cpu")


def test_tiny_en_word_error_rate_on_spoken_sentences(tiny_en):
    short = manifest()["short"]
    files = [AUDIO_DIR / name for name in short]
    outs = tiny_en.transcribe(files, timestamps=False)  # all files share the engine's batches
    wer = word_error_rate(list(short.values()), [o.text for o in outs])
    assert wer <= 0.15, [o.text for o in outs]
    assert all(o.language == "english" for o in outs)


def _best_window_errors(sentence: list[str], hyp: list[str]) -> float:
    n = len(sentence)
    best = n
    for size in range(max(1, n - 3), n + 4):
        for start in range(max(1, len(hyp) - size + 1)):
            best = min(best, edit_distance(sentence, hyp[start:start + size]))
    return best / n


def test_long_recording_keeps_every_sentence_across_windows(tiny_en):
    (name, sentences), = manifest()["long"].items()
    out = tiny_en.transcribe(AUDIO_DIR / name)[0]
    assert out.duration > 75
    hyp = normalize_words(out.text)
    for sentence in sentences:
        assert _best_window_errors(normalize_words(sentence), hyp) <= 0.35, (sentence, out.text)
    assert word_error_rate([" ".join(sentences)], [out.text]) <= 0.15
    starts = [s.start for s in out.segments]
    assert starts == sorted(starts) and all(s.end >= s.start for s in out.segments)
    assert out.segments[-1].end > 70  # the third window was decoded too


def test_default_dtype_follows_the_cpu_rule_packs_linears_and_keeps_accuracy(tiny_en):
    """dtype auto is the chat engine's rule (bf16 where the CPU has native bf16); in bf16 every
    linear, the vocabulary projection included, runs from a pre-packed weight, and the long
    recording's word error rate stays that of float32."""
    import torch

    from fornax.runtime.loaders.weights import resolve_dtype
    from fornax.runtime.models.layers import ColumnParallelLinear
    from fornax.runtime.offline.speech import SpeechToText

    stt = SpeechToText(str(packaged_whisper("whisper-tiny.en")), device="cpu")
    runner = stt.engine.runner
    assert runner.dtype == resolve_dtype("auto", {}, torch.device("cpu"))
    if runner.dtype == torch.bfloat16:
        linears = [m for m in runner.model.modules() if isinstance(m, ColumnParallelLinear)]
        assert linears and all(m.packed_weight is not None for m in linears)
        assert runner.model.proj_out.packed_weight is not None
    (name, sentences), = manifest()["long"].items()
    ref = [" ".join(sentences)]
    ours = stt.transcribe(AUDIO_DIR / name)[0].text
    fp32 = tiny_en.transcribe(AUDIO_DIR / name)[0].text
    assert word_error_rate(ref, [ours]) <= word_error_rate(ref, [fp32]) + 0.02, (ours, fp32)
