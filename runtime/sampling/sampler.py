"""Batched sampler on the model's device: greedy, temperature, top-k/p, min-p, seeds, logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fornax.runtime.kernels.fused_ops import fast_argmax
from fornax.runtime.sampling.logits_processors import LogitsInputs, apply_logits_processors

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

    def __init__(self, num_candidates: int = 1024) -> None:
        self.num_candidates = num_candidates

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        logits = logits.to(torch.float32)
        raw_logprobs = (torch.log_softmax(logits, dim=-1)
                        if meta.max_num_logprobs >= 0 else None)
        if meta.logits_inputs is not None:
            logits = apply_logits_processors(logits, meta.logits_inputs)
        greedy = fast_argmax(logits)
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
        """Rows whose top-k / top-p nucleus lies within the `num_candidates` most likely tokens
        sample among those (no full-vocabulary sort or noise); the others take the full path.
        Which path a row takes depends on that row alone, so seeded rows stay reproducible."""
        num_rows, vocab = logits.shape
        cand = min(self.num_candidates, vocab)
        temp = torch.where(meta.temperature < _GREEDY_EPS, torch.ones_like(meta.temperature),
                           meta.temperature)
        scaled = logits / temp.unsqueeze(1)
        out = torch.empty(num_rows, dtype=torch.long, device=logits.device)
        eligible = torch.zeros(num_rows, dtype=torch.bool, device=logits.device)
        if meta.top_k is not None or meta.top_p is not None:
            eligible = self._sample_candidates(scaled, meta, cand, out)
        rest = (~eligible).nonzero().squeeze(1)
        if rest.numel():
            out[rest] = self._sample_full(scaled[rest], meta, rest)
        return out

    def _sample_candidates(self, scaled: torch.Tensor, meta: SamplingMetadata, cand: int,
                           out: torch.Tensor) -> torch.Tensor:
        """Fill `out` for the rows that can be sampled from their top `cand` tokens."""
        num_rows = scaled.shape[0]
        vals, idx = scaled.topk(cand, dim=-1)  # [R, C], descending
        pos = torch.arange(cand, device=scaled.device).unsqueeze(0)
        top_k = meta.top_k if meta.top_k is not None else torch.zeros(
            num_rows, dtype=torch.long, device=scaled.device)
        k_on = (top_k > 0) & (top_k <= cand)
        keep = ~k_on.unsqueeze(1) | (pos < top_k.unsqueeze(1))
        vals = vals.masked_fill(~keep, float("-inf"))
        # Probabilities over the top-k set, or over the whole vocabulary when top-k is off.
        norm = torch.where(k_on, torch.logsumexp(vals, dim=-1), torch.logsumexp(scaled, dim=-1))
        probs = torch.exp(vals - norm.unsqueeze(1))
        eligible = k_on.clone()
        if meta.top_p is not None:
            exclusive = probs.cumsum(dim=-1) - probs
            probs = probs.masked_fill(exclusive >= meta.top_p.unsqueeze(1), 0.0)
            nucleus_fits = probs.sum(dim=-1) + 1e-6 >= torch.where(
                k_on, torch.zeros_like(meta.top_p), meta.top_p)
            p_on = meta.top_p < 1.0
            eligible = (k_on | p_on) & nucleus_fits & ((top_k <= 0) | k_on)
        if meta.min_p is not None:
            probs = probs.masked_fill(probs < probs[:, :1] * meta.min_p.unsqueeze(1), 0.0)
        noise = torch.empty_like(probs).exponential_()
        for row, gen in meta.generators.items():
            noise[row].exponential_(generator=gen)
        choice = (probs / noise).argmax(dim=-1, keepdim=True)
        out.copy_(torch.where(eligible, idx.gather(1, choice).squeeze(1), out))
        return eligible

    def _sample_full(self, scaled: torch.Tensor, meta: SamplingMetadata,
                     rows: torch.Tensor) -> torch.Tensor:
        """Exponential race over the whole vocabulary for the given rows."""
        top_k = meta.top_k[rows] if meta.top_k is not None else None
        top_p = meta.top_p[rows] if meta.top_p is not None else None
        if top_k is not None or top_p is not None:
            scaled = apply_top_k_top_p(scaled, top_k, top_p)
        probs = torch.softmax(scaled, dim=-1)
        if meta.min_p is not None:
            threshold = probs.amax(dim=-1, keepdim=True) * meta.min_p[rows].unsqueeze(1)
            probs = probs.masked_fill(probs < threshold, 0.0)
        noise = torch.empty_like(probs).exponential_()
        if meta.generators:
            for j, row in enumerate(rows.tolist()):
                gen = meta.generators.get(row)
                if gen is not None:
                    noise[j].exponential_(generator=gen)
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
