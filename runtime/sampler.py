"""Batched sampler on the model's device: greedy, temperature, top-k/p, min-p, seeds, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fornax.runtime.logits_processors import LogitsInputs, apply_logits_processors

_GREEDY_EPS = 1e-5


@dataclass
class SamplingMetadata:
    """Per-row sampling settings for the rows being sampled this step (tensors on device)."""

    temperature: torch.Tensor  # [B] float32
    top_p: torch.Tensor | None  # [B] float32, None when no row uses it
    top_k: torch.Tensor | None  # [B] int64 (0 = off), None when no row uses it
    min_p: torch.Tensor | None  # [B] float32, None when no row uses it
    all_greedy: bool
    all_random: bool
    generators: dict[int, torch.Generator]  # row -> per-request generator (seeded requests)
    max_num_logprobs: int  # -1: no row wants logprobs
    logits_inputs: LogitsInputs | None = None  # penalties, bias, allowed ids, bans


@dataclass
class SamplerOutput:
    sampled: torch.Tensor  # [B] int64
    logprob_token_ids: torch.Tensor | None  # [B, 1 + k]: sampled token then the top k
    logprobs: torch.Tensor | None  # [B, 1 + k] float32
    sampled_ranks: torch.Tensor | None  # [B] int64, 1-based rank of the sampled token


class Sampler:
    """logits [B, V] -> one token per row, in one batched pass with no per-row Python loops
    (except drawing noise for rows that carry their own seeded generator)."""

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        logits = logits.to(torch.float32)
        raw_logprobs = (torch.log_softmax(logits, dim=-1)
                        if meta.max_num_logprobs >= 0 else None)
        if meta.logits_inputs is not None:
            logits = apply_logits_processors(logits, meta.logits_inputs)
        greedy = logits.argmax(dim=-1)
        if meta.all_greedy:
            sampled = greedy
        else:
            random = self._sample_random(logits, meta)
            sampled = random if meta.all_random else torch.where(
                meta.temperature < _GREEDY_EPS, greedy, random)
        if raw_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        return self._gather_logprobs(raw_logprobs, sampled, meta.max_num_logprobs)

    def probabilities(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """The distribution random rows sample from: temperature, top-k/p, then min-p."""
        temp = torch.where(meta.temperature < _GREEDY_EPS, torch.ones_like(meta.temperature),
                           meta.temperature)
        logits = logits / temp.unsqueeze(1)
        if meta.top_k is not None or meta.top_p is not None:
            logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
        probs = torch.softmax(logits, dim=-1)
        if meta.min_p is not None:
            threshold = probs.amax(dim=-1, keepdim=True) * meta.min_p.unsqueeze(1)
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs

    def _sample_random(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        probs = self.probabilities(logits, meta)
        noise = torch.empty_like(probs)
        noise.exponential_()
        for row, gen in meta.generators.items():
            noise[row].exponential_(generator=gen)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _gather_logprobs(logprobs: torch.Tensor, sampled: torch.Tensor, k: int) -> SamplerOutput:
        sampled_lp = logprobs.gather(1, sampled.unsqueeze(1))  # [B, 1]
        ranks = (logprobs > sampled_lp).sum(dim=-1) + 1
        if k > 0:
            top_lp, top_ids = logprobs.topk(k, dim=-1)
            ids = torch.cat([sampled.unsqueeze(1), top_ids], dim=1)
            lps = torch.cat([sampled_lp, top_lp], dim=1)
        else:
            ids, lps = sampled.unsqueeze(1), sampled_lp
        return SamplerOutput(sampled, ids, lps, ranks)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus with -inf (one sort per batch)."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if top_k is not None:
        k = torch.where(top_k <= 0, torch.full_like(top_k, vocab), top_k).clamp(max=vocab)
        kth = sorted_logits.gather(1, (vocab - k).unsqueeze(1))  # [B, 1] smallest kept value
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
        drop = cum <= (1 - top_p.unsqueeze(1))
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
