"""Pooling engine, offline: parity with sentence-transformers and HF, batching, limits, runners."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from fornax.runtime import LLM, SamplingParams
from fornax.runtime.errors import ConfigError, RequestError
from helpers.pooling_fixtures import DOCS, QUERY, minilm_path
from tools.make_tiny_bert import tiny_bert_dir


def varied_sentences(n: int, seed: int = 0) -> list[str]:
    """Short and long, punctuation, digits, accents, CJK, emoji, code: all under 256 tokens."""
    rng = random.Random(seed)
    words = ("the a quick brown fox jumps over lazy dog server batch token cache latency memory "
             "paris berlin café naïve résumé 東京 北京 🙂 🚀 3.14 2024-06-01 x != y def return "
             "SELECT * FROM users; https://example.com/a?q=1 Hello! WORLD? it's don't").split()
    out = []
    for i in range(n):
        length = rng.choice((1, 2, 3, 4, 6, 8, 12, 16, 24, 60))
        text = " ".join(rng.choice(words) for _ in range(length))
        out.append(text[0].upper() + text[1:] + rng.choice((".", "!", "?", "", " ...")) if i % 7
                   else text)
    return out


@pytest.fixture(scope="module")
def minilm() -> LLM:
    return LLM(str(minilm_path()), dtype="float32")  # parity with float32 references


def _sentence_transformers_reference(path: Path, sentences: list[str]) -> np.ndarray:
    """What sentence-transformers computes for this folder (Transformer -> mean Pooling ->
    Normalize, per modules.json), with HF transformers directly: importing sentence-transformers
    itself costs ~10 s. Sorted batches of 32, as its `encode` does."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = np.zeros((len(sentences), model.config.hidden_size), dtype=np.float32)
    for start in range(0, len(order), 32):
        idx = order[start:start + 32]
        batch = tok([sentences[i] for i in idx], padding=True, truncation=True, max_length=256,
                    return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out[idx] = torch.nn.functional.normalize(mean, p=2, dim=1).numpy()
    return out


@pytest.mark.slow
def test_minilm_matches_sentence_transformers_on_200_sentences(minilm: LLM) -> None:
    sentences = varied_sentences(200)
    ours = np.array([o.outputs.embedding for o in minilm.embed(sentences)])
    ref = _sentence_transformers_reference(minilm_path(), sentences)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert ours.shape == (200, 384)
    assert cos.min() >= 0.9999, f"worst cosine {cos.min()} at {sentences[int(cos.argmin())]!r}"
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # 2_Normalize honoured
    info = minilm.engine.pooling_info
    assert (info.pooling_type, info.normalize, info.max_model_len) == ("MEAN", True, 256)


@pytest.mark.slow
def test_many_small_requests_fill_one_forward_and_keep_their_order(minilm: LLM) -> None:
    sentences = varied_sentences(40, seed=1)
    steps = minilm.engine.num_steps
    together = [o.outputs.embedding for o in minilm.embed(sentences)]
    assert minilm.engine.num_steps == steps + 1  # 40 requests, one forward
    alone = [minilm.embed(s)[0].outputs.embedding for s in sentences[:5]]
    assert np.allclose(together[:5], alone, atol=1e-5)


@pytest.mark.slow
def test_score_by_cosine_and_truncation_limits(minilm: LLM) -> None:
    scores = [o.outputs.score for o in minilm.score(QUERY, DOCS)]
    embs = np.array([o.outputs.embedding for o in minilm.embed([QUERY, *DOCS])])
    assert np.allclose(scores, embs[1:] @ embs[0], atol=1e-5)
    assert int(np.argmax(scores)) == 0  # Paris
    long = "word " * 400
    with pytest.raises(RequestError, match="maximum context length is 256"):
        minilm.embed(long)
    out = minilm.embed(long, truncate_prompt_tokens=10)[0]
    assert len(out.prompt_token_ids) == 10
    assert out.prompt_token_ids[0] == 101 and out.prompt_token_ids[-1] == 102  # [CLS] ... [SEP]
    with pytest.raises(RequestError, match="truncate_prompt_tokens"):
        minilm.embed("x", truncate_prompt_tokens=1000)
    with pytest.raises(RequestError, match="Matryoshka"):
        minilm.embed("x", dimensions=8)


@pytest.mark.slow
def test_generation_calls_on_a_pooling_model_are_refused(minilm: LLM) -> None:
    with pytest.raises(RequestError, match="pooling model"):
        minilm.generate("hello", SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="cannot score|classify"):
        minilm.classify("hello")
    assert not minilm.engine.has_unfinished_requests()


def _hf_seq_cls(path: Path):
    import transformers

    return transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()


@pytest.mark.parametrize("arch", ["bert-cross", "roberta-cross"])
def test_cross_encoder_matches_hf(arch: str) -> None:
    path = tiny_bert_dir(arch)
    llm = LLM(str(path), dtype="float32")
    ours = [o.outputs.score for o in llm.score(QUERY, DOCS)]
    hf, tok = _hf_seq_cls(path), llm.tokenizer.tokenizer
    ref = []
    for doc in DOCS:
        enc = tok.encode(QUERY, doc)
        kwargs = {"input_ids": torch.tensor([enc.ids])}
        if arch.startswith("bert"):
            kwargs["token_type_ids"] = torch.tensor([enc.type_ids])
        with torch.no_grad():
            ref.append(torch.sigmoid(hf(**kwargs).logits)[0, 0].item())
    assert np.allclose(ours, ref, atol=1e-5)
    assert len(set(np.round(ours, 5))) == len(DOCS)  # the head really tells documents apart
    many = llm.score([QUERY, "fox"], [DOCS[0], DOCS[1]])  # many-to-many: zipped pairs
    assert np.isclose(many[0].outputs.score, ours[0], atol=1e-5)
    with pytest.raises(RequestError, match="give one"):
        llm.score([QUERY, "a", "b"], DOCS[:2])


def test_classifier_matches_hf_with_labels_from_id2label() -> None:
    path = tiny_bert_dir("bert-classify")
    llm = LLM(str(path), dtype="float32")
    assert llm.labels == ["negative", "neutral", "positive"]
    outs = llm.classify(DOCS)
    hf, tok = _hf_seq_cls(path), llm.tokenizer.tokenizer
    for out, doc in zip(outs, DOCS):
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([tok.encode(doc).ids])).logits[0]
        assert np.allclose(out.outputs.probs, torch.softmax(logits, -1).numpy(), atol=1e-5)
    raw = llm.classify(DOCS[0], activation=False)[0].outputs.probs
    assert not np.isclose(sum(raw), 1.0)
    with pytest.raises(RequestError, match="cannot score"):
        llm.score(QUERY, DOCS)


def test_matryoshka_dimensions_truncate_then_renormalize() -> None:
    llm = LLM(str(tiny_bert_dir("bert-embed")), dtype="float32")
    full = np.array(llm.embed(DOCS[0])[0].outputs.embedding)
    raw = np.array(llm.embed(DOCS[0], normalize=False)[0].outputs.embedding)
    small = np.array(llm.embed(DOCS[0], dimensions=16)[0].outputs.embedding)
    assert full.shape == (32,) and small.shape == (16,)
    assert np.allclose(full, raw / np.linalg.norm(raw), atol=1e-6)
    assert np.allclose(small, raw[:16] / np.linalg.norm(raw[:16]), atol=1e-6)
    with pytest.raises(RequestError, match="one of"):
        llm.embed(DOCS[0], dimensions=12)


@pytest.mark.parametrize("pooler_config", [{}, {"pooling_type": "MEAN", "normalize": False}])
def test_decoder_as_embedder_matches_hf_hidden_states(tiny_model, pooler_config) -> None:
    import transformers

    path = tiny_model("qwen3")
    llm = LLM(str(path), runner="pooling", pooler_config=pooler_config, dtype="float32")
    outs = llm.embed(DOCS)
    hf = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    for out in outs:
        with torch.no_grad():
            hidden = hf(input_ids=torch.tensor([out.prompt_token_ids])).last_hidden_state[0]
        ref = (torch.nn.functional.normalize(hidden[-1], dim=-1) if not pooler_config
               else hidden.mean(0))
        assert np.allclose(out.outputs.embedding, ref.numpy(), atol=1e-5)


def test_runner_resolution(tiny_model) -> None:
    with pytest.raises(ConfigError, match="cannot generate"):
        LLM(str(tiny_bert_dir("bert-embed")), runner="generate")
    with pytest.raises(ConfigError, match="runner must be"):
        LLM(str(tiny_bert_dir("bert-embed")), runner="embed")
    with pytest.raises(ConfigError, match="pooling_type"):
        LLM(str(tiny_bert_dir("bert-embed")), pooler_config={"pooling_type": "FIRST"})
    llm = LLM(str(tiny_model("llama")), max_model_len=128)  # auto: a causal LM generates
    with pytest.raises(RequestError, match="generation model"):
        llm.embed("hello")
