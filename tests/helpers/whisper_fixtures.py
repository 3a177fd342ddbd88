"""Test helpers for speech: fixture audio, packaged Whisper folders, a tiny random HF Whisper, WER."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from fornax.perf.wer import edit_distance, words
from fornax.runtime import env

REPO_ROOT = Path(__file__).resolve().parents[2]
AUDIO_DIR = REPO_ROOT / "tests" / "fixtures" / "audio"
TINY_WHISPER_VERSION = 2
_NUMBERS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five",
            "6": "six", "7": "seven", "8": "eight", "9": "nine", "10": "ten"}


@pytest.fixture(scope="module")
def one_thread():
    """Speech tests run torch on one thread (as the API test servers do): Whisper's small decode
    steps gain nothing from a second thread, and on a shared machine its barriers cost a lot."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def manifest() -> dict:
    return json.loads((AUDIO_DIR / "manifest.json").read_text(encoding="utf-8"))


def packaged_whisper(name: str) -> Path:
    """The prepared HF folder of a packaged Whisper. `make install` installs both packaged
    Whispers, so a missing one fails the test (it is never a reason to skip)."""
    from fornax.runtime.errors import ModelLoadError
    from fornax.runtime.loaders.speech_models import resolve_speech_model

    try:
        path = resolve_speech_model(name)
    except ModelLoadError as exc:
        pytest.fail(f"{exc} (make install)")
    assert path is not None
    return path


def normalize_words(text: str) -> list[str]:
    """fornax.perf.wer's words, with the digits 0-10 spelled out."""
    return [_NUMBERS.get(w, w) for w in words(text)]


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
    errors = sum(edit_distance(normalize_words(r), normalize_words(h)) for r, h in zip(refs, hyps))
    return errors / sum(len(normalize_words(r)) for r in refs)


def tiny_whisper_dir(seed: int = 0) -> Path:
    """A tiny random HF Whisper (d_model 64, 2+2 layers, 3 s windows of 300 frames) with
    tiny.en's tokenizer, built once."""
    tok_src = packaged_whisper("whisper-tiny.en")
    root = env.TEST_CACHE.get() or REPO_ROOT / ".cache" / "tiny-models"
    final = root / f"whisper-seed{seed}-v{TINY_WHISPER_VERSION}"
    if final.is_dir():
        return final
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    src_cfg = json.loads((tok_src / "config.json").read_text())
    cfg = WhisperConfig(
        vocab_size=src_cfg["vocab_size"], num_mel_bins=80, d_model=64, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=150,
        max_target_positions=448, bos_token_id=src_cfg["bos_token_id"],
        eos_token_id=src_cfg["eos_token_id"], pad_token_id=src_cfg["pad_token_id"],
        decoder_start_token_id=src_cfg["decoder_start_token_id"],
        suppress_tokens=src_cfg["suppress_tokens"],
        begin_suppress_tokens=src_cfg["begin_suppress_tokens"])
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger-than-default weights so logits are not flat
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embed_positions" not in name:
                p.normal_(0.0, 0.08)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(tok_src / name, tmp / name)
    tmp.chmod(0o755)
    try:
        os.rename(tmp, final)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return final
