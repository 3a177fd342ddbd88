"""Sampler transforms vs float64 references, and sampled frequencies vs the target distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fornax.runtime.sampling.logits_processors import apply_logits_processors, build_logits_inputs
from fornax.runtime.sampling.params import SamplingParams
from fornax.runtime.sampling.sampler import Sampler, SamplingMetadata

VOCAB = 12
LOGITS = np.array([2.0, 1.5, 1.2, 0.9, 0.5, 0.2, -0.1, -0.5, -1.0, -1.5, -2.5, -4.0])


def meta(num: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
         min_p: float = 0.0, **extra) -> SamplingMetadata:
    full = lambda v, dt=torch.float32: torch.full((num,), v, dtype=dt)  # noqa: E731
    return SamplingMetadata(
        temperature=full(temperature), top_p=full(top_p) if top_p < 1 else None,
        top_k=full(top_k, torch.int64) if top_k > 0 else None,
        min_p=full(min_p) if min_p > 0 else None, all_greedy=False, all_random=True,
        generators={}, max_num_logprobs=-1, **extra)


def reference_probs(logits: np.ndarray, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Straight float64 transcription of the documented semantics."""
    x = logits.astype(np.float64) / temperature
    if top_k > 0:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(-x)
        p = np.exp(x[order] - x[order].max())
        p /= p.sum()
        keep = np.cumsum(p) - p < top_p  # smallest set whose mass reaches top_p
        drop = order[~keep]
        x[drop] = -np.inf
    p = np.exp(x - x[np.isfinite(x)].max())
    p /= p.sum()
    if min_p > 0:
        p = np.where(p < min_p * p.max(), 0.0, p)
        p /= p.sum()
    return p


CASES = [dict(temperature=0.7), dict(temperature=1.3, top_k=4), dict(top_p=0.8),
         dict(temperature=0.9, top_p=0.6, top_k=6), dict(min_p=0.2), dict(temperature=2.0,
                                                                           min_p=0.05)]


@pytest.mark.parametrize("case", CASES)
def test_transforms_match_float64_reference(case) -> None:
    got = Sampler().probabilities(torch.tensor(LOGITS, dtype=torch.float32)[None], meta(1, **case))
    got = (got / got.sum()).double().numpy()[0]
    np.testing.assert_allclose(got, reference_probs(LOGITS, **case), atol=1e-6)


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    support = probs > 0
    assert counts[~support].sum() == 0, "sampled a token outside the allowed set"
    expected = probs[support] * counts.sum()
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    if dof == 0:
        return 1.0
    cdf = torch.special.gammainc(torch.tensor(dof / 2, dtype=torch.float64),
                                 torch.tensor(stat / 2, dtype=torch.float64))
    return float(1 - cdf)


@pytest.mark.parametrize("num_candidates", [1024, 5], ids=["whole-vocab", "candidates"])
@pytest.mark.parametrize("case", CASES)
def test_sampled_frequencies_match_distribution(case, num_candidates) -> None:
    """With 5 candidates, top-k 4 and top-p 0.6 take the candidate path, the rest fall back."""
    draws = 5000
    torch.manual_seed(1234)
    logits = torch.tensor(LOGITS, dtype=torch.float32).repeat(draws, 1)
    out = Sampler(num_candidates)(logits, meta(draws, **case))
    counts = np.bincount(out.sampled.numpy(), minlength=VOCAB)
    p = chi_square_p_value(counts, reference_probs(LOGITS, **case))
    assert p > 1e-3, f"chi-square p={p:.2e} for {case}: {counts}"


def test_seeded_rows_reproduce_whatever_their_batch_mates() -> None:
    def draw(batch: int, row: int) -> list[int]:
        gen = torch.Generator().manual_seed(7)
        m = meta(batch, temperature=1.0, top_k=6)
        m.generators = {row: gen}
        logits = torch.tensor(LOGITS, dtype=torch.float32).repeat(batch, 1)
        return [int(Sampler()(logits, m).sampled[row]) for _ in range(20)]

    assert draw(1, 0) == draw(5, 3) == draw(9, 8)


def _ref_penalized(logits, prompt, output, rep, freq, pres):
    x = logits.astype(np.float64).copy()
    counts = np.bincount(output, minlength=len(x)).astype(np.float64)
    seen = counts > 0
    seen[prompt] = True
    x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
    return x - freq * counts - pres * (counts > 0)


def test_penalties_bias_allowed_and_bans_match_reference() -> None:
    prompt, output = np.array([0, 3, 3]), np.array([1, 1, 5, 0])
    rows = [
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.7),
        SamplingParams(logit_bias={2: 5.0, 11: -100.0}),
        SamplingParams(allowed_token_ids=[4, 7, 9]),
        SamplingParams(min_tokens=10, stop_token_ids=[6]),  # 4 outputs so far: EOS and 6 banned
        SamplingParams(bad_words_token_ids=[[8], [0, 9], [1, 7]]),  # ends with 0: 9 banned, 7 not
        SamplingParams(),
    ]
    logits = torch.tensor(LOGITS, dtype=torch.float32).repeat(len(rows), 1)
    inputs = build_logits_inputs(rows, [prompt] * len(rows), [output] * len(rows),
                                 frozenset({10}), VOCAB, torch.device("cpu"))
    got = apply_logits_processors(logits, inputs).double().numpy()
    np.testing.assert_allclose(got[0], _ref_penalized(LOGITS, prompt, output, 1.3, 0.4, 0.7),
                               rtol=1e-6)
    exp = LOGITS.copy()
    exp[2] += 5.0
    exp[11] -= 100.0
    np.testing.assert_allclose(got[1], exp, rtol=1e-6)
    assert np.isfinite(got[2]).nonzero()[0].tolist() == [4, 7, 9]
    assert np.isneginf(got[3]).nonzero()[0].tolist() == [6, 10]
    assert np.isneginf(got[4]).nonzero()[0].tolist() == [8, 9]
    np.testing.assert_array_equal(got[5], LOGITS.astype(np.float32))


def test_greedy_only_batches_skip_logits_processing() -> None:
    inputs = build_logits_inputs([SamplingParams(temperature=0)] * 3, [np.array([1])] * 3,
                                 [np.array([2])] * 3, frozenset({2}), VOCAB,
                                 torch.device("cpu"))
    assert inputs.empty
