"""Per-request logits transforms, batched: penalties, logit_bias, allowed ids, bans (engine core).

The host side (`build_logits_inputs`) touches only the rows that use a feature, so a greedy-only
batch pays nothing; the device side (`apply_logits_processors`) is a handful of batched ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fornax.runtime.sampling_params import SamplingParams


@dataclass
class PenaltyInputs:
    prompt_ids: torch.Tensor  # [B, P] int64, padded with vocab_size
    output_ids: torch.Tensor  # [B, O] int64, padded with vocab_size
    repetition: torch.Tensor  # [B] float32 (1.0 = off)
    frequency: torch.Tensor  # [B] float32
    presence: torch.Tensor  # [B] float32


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


def _pad(seqs: list[np.ndarray], pad: int) -> np.ndarray:
    width = max((len(s) for s in seqs), default=0) or 1
    out = np.full((len(seqs), width), pad, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


def build_logits_inputs(params: list[SamplingParams], prompts: list[np.ndarray],
                        outputs: list[np.ndarray], eos_token_ids: frozenset[int],
                        vocab_size: int, device: torch.device) -> LogitsInputs:
    """Host-side assembly for the rows being sampled; `prompts`/`outputs` hold token ids."""
    result = LogitsInputs()
    num = len(params)
    if any(p.uses_penalties for p in params):
        empty = np.zeros(0, dtype=np.int64)
        use = [p.uses_penalties for p in params]
        prompt_ids = _pad([prompts[i] if use[i] else empty for i in range(num)], vocab_size)
        output_ids = _pad([outputs[i] if use[i] else empty for i in range(num)], vocab_size)
        as_t = lambda a, dt=torch.float32: torch.tensor(a, dtype=dt, device=device)  # noqa: E731
        result.penalties = PenaltyInputs(
            torch.from_numpy(prompt_ids).to(device), torch.from_numpy(output_ids).to(device),
            as_t([p.repetition_penalty for p in params]),
            as_t([p.frequency_penalty for p in params]),
            as_t([p.presence_penalty for p in params]))
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
        if p.allowed_token_ids is not None:
            if allowed is None:
                allowed = np.ones((num, vocab_size), dtype=bool)
            allowed[i] = False
            allowed[i, p.allowed_token_ids] = True
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


def apply_penalties(logits: torch.Tensor, pen: PenaltyInputs) -> torch.Tensor:
    """vLLM/OpenAI semantics: repetition over prompt+output; frequency/presence over output."""
    num, vocab = logits.shape
    output_counts = torch.zeros(num, vocab + 1, dtype=logits.dtype, device=logits.device)
    output_counts.scatter_add_(1, pen.output_ids, torch.ones_like(pen.output_ids,
                                                                  dtype=logits.dtype))
    output_counts = output_counts[:, :vocab]
    prompt_seen = torch.zeros(num, vocab + 1, dtype=torch.bool, device=logits.device)
    prompt_seen.scatter_(1, pen.prompt_ids, True)
    seen = prompt_seen[:, :vocab] | (output_counts > 0)
    rep = pen.repetition.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - pen.frequency.unsqueeze(1) * output_counts
    return logits - pen.presence.unsqueeze(1) * (output_counts > 0).to(logits.dtype)


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
