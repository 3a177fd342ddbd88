"""Per-request logits transforms, batched: penalties, logit_bias, allowed ids, bans (engine core).

The host side (`build_logits_inputs`) touches only the rows that use a feature, so a greedy-only
batch pays nothing; the device side (`apply_logits_processors`) is a handful of batched ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fornax.runtime.sampling.params import SamplingParams


@dataclass
class PenaltyInputs:
    """Sparse (row, token) pairs: O(tokens seen), never a dense [B, V] count table."""

    seen_rows: torch.Tensor  # [S] rows of tokens in the prompt or output
    seen_cols: torch.Tensor  # [S] those token ids (unique per row)
    seen_repetition: torch.Tensor  # [S] the row's repetition penalty
    out_rows: torch.Tensor  # [O] rows of tokens in the output
    out_cols: torch.Tensor  # [O] those token ids (unique per row)
    out_amount: torch.Tensor  # [O] frequency * count + presence, subtracted from the logit


@dataclass
class LogitsInputs:
    penalties: PenaltyInputs | None = None
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # rows, cols, values
    allowed_mask: torch.Tensor | None = None  # [B, V] bool, True = may be sampled
    banned: tuple[torch.Tensor, torch.Tensor] | None = None  # rows, cols set to -inf

    @property
    def empty(self) -> bool:
        return (self.penalties is None and self.bias is None and self.allowed_mask is None
                and self.banned is None)


def build_logits_inputs(params: list[SamplingParams], prompts: list[np.ndarray],
                        outputs: list[np.ndarray], eos_token_ids: frozenset[int],
                        vocab_size: int, device: torch.device) -> LogitsInputs:
    """Host-side assembly for the rows being sampled; `prompts`/`outputs` hold token ids."""
    result = LogitsInputs()
    num = len(params)
    if any(p.uses_penalties for p in params):
        result.penalties = _penalty_inputs(params, prompts, outputs, device)
    b_rows: list[int] = []
    b_cols: list[int] = []
    b_vals: list[float] = []
    ban_rows: list[int] = []
    ban_cols: list[int] = []
    allowed = None
    for i, p in enumerate(params):
        if p.logit_bias:
            for tid, val in p.logit_bias.items():
                b_rows.append(i)
                b_cols.append(tid)
                b_vals.append(val)
        forced = thinking_forced_token(p, outputs[i]) \
            if p.thinking_token_budget is not None else None
        if p.allowed_token_ids is not None or forced is not None:
            if allowed is None:
                allowed = np.ones((num, vocab_size), dtype=bool)
            allowed[i] = False
            allowed[i, p.allowed_token_ids if forced is None else forced] = True
        num_out = len(outputs[i])
        if num_out < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            for tid in stops:
                ban_rows.append(i)
                ban_cols.append(tid)
        for word in p.bad_words_token_ids or ():
            prefix = word[:-1]
            if not prefix or (num_out >= len(prefix)
                              and outputs[i][num_out - len(prefix):].tolist() == prefix):
                ban_rows.append(i)
                ban_cols.append(word[-1])
    if b_rows:
        result.bias = (torch.tensor(b_rows, device=device), torch.tensor(b_cols, device=device),
                       torch.tensor(b_vals, dtype=torch.float32, device=device))
    if allowed is not None:
        result.allowed_mask = torch.from_numpy(allowed).to(device)
    if ban_rows:
        result.banned = (torch.tensor(ban_rows, device=device),
                         torch.tensor(ban_cols, device=device))
    return result


def _find(seq: list[int], part: list[int]) -> int:
    """Index of the first occurrence of `part` in `seq`, -1 if none."""
    n = len(part)
    for j in range(len(seq) - n + 1):
        if seq[j:j + n] == part:
            return j
    return -1


def thinking_forced_token(p: SamplingParams, output: np.ndarray) -> int | None:
    """thinking_token_budget: the next token of the end-of-thinking marker once the output has
    thought for the budget's worth of tokens without closing the thinking, else None."""
    end = p.thinking_end_ids or []
    if not end or p.thinking_token_budget is None:
        return None
    out = output.tolist()
    begin = 0
    if p.thinking_start_ids:
        at = _find(out, p.thinking_start_ids)
        if at < 0:
            return None  # not thinking (yet)
        begin = at + len(p.thinking_start_ids)
    seg = out[begin:]
    if _find(seg, end) >= 0:
        return None  # the thinking is over
    partial = next((k for k in range(len(end) - 1, 0, -1) if seg[-k:] == end[:k]), 0)
    if len(seg) - partial < p.thinking_token_budget:
        return None
    return end[partial]


def _penalty_inputs(params: list[SamplingParams], prompts: list[np.ndarray],
                    outputs: list[np.ndarray], device: torch.device) -> PenaltyInputs:
    seen_r, seen_c, seen_rep, out_r, out_c, out_amt = [], [], [], [], [], []
    for i, p in enumerate(params):
        if not p.uses_penalties:
            continue
        if p.repetition_penalty != 1.0:
            seen = np.unique(np.concatenate([prompts[i], outputs[i]]))
            seen_r.append(np.full(len(seen), i))
            seen_c.append(seen)
            seen_rep.append(np.full(len(seen), p.repetition_penalty, dtype=np.float32))
        if (p.frequency_penalty or p.presence_penalty) and len(outputs[i]):
            tokens, counts = np.unique(outputs[i], return_counts=True)
            out_r.append(np.full(len(tokens), i))
            out_c.append(tokens)
            out_amt.append((p.frequency_penalty * counts + p.presence_penalty).astype(np.float32))

    def cat(parts: list[np.ndarray], dtype: type) -> torch.Tensor:
        arr: np.ndarray = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
        return torch.from_numpy(arr).to(device)

    return PenaltyInputs(cat(seen_r, np.int64), cat(seen_c, np.int64),
                         cat(seen_rep, np.float32), cat(out_r, np.int64), cat(out_c, np.int64),
                         cat(out_amt, np.float32))


def apply_penalties(logits: torch.Tensor, pen: PenaltyInputs) -> torch.Tensor:
    """vLLM/OpenAI semantics: repetition over prompt+output; frequency/presence over output."""
    if pen.seen_rows.numel():
        vals = logits[pen.seen_rows, pen.seen_cols]
        rep = pen.seen_repetition.to(vals.dtype)
        logits[pen.seen_rows, pen.seen_cols] = torch.where(vals > 0, vals / rep, vals * rep)
    if pen.out_rows.numel():
        logits.index_put_((pen.out_rows, pen.out_cols), -pen.out_amount.to(logits.dtype),
                          accumulate=True)
    return logits


def apply_logits_processors(logits: torch.Tensor, inputs: LogitsInputs) -> torch.Tensor:
    """All transforms in vLLM's order: allowed ids, bias, bans, then penalties."""
    if inputs.empty:
        return logits
    logits = logits.clone()
    if inputs.allowed_mask is not None:
        logits = logits.masked_fill(~inputs.allowed_mask, float("-inf"))
    if inputs.bias is not None:
        rows, cols, vals = inputs.bias
        logits.index_put_((rows, cols), vals, accumulate=True)
    if inputs.banned is not None:
        logits[inputs.banned] = float("-inf")
    if inputs.penalties is not None:
        logits = apply_penalties(logits, inputs.penalties)
    return logits
