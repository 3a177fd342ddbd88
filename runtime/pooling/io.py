"""Pooling request front end: tokenize with truncation, pairs, decode, cosine (torch-free).

Used by the offline `LLM` (in-process) and the API workers alike, so both agree on how inputs become
token ids and how results become numbers.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence

from fornax.runtime.engine.messages import PoolingOutput
from fornax.runtime.errors import RequestError
from fornax.runtime.text.tokenizer import TokenizerFront


def resolve_truncation(truncate_prompt_tokens: int | None, max_model_len: int) -> int | None:
    """The token limit a request asked for: None (no truncation), k, or -1 = max_model_len."""
    if truncate_prompt_tokens is None:
        return None
    k = truncate_prompt_tokens
    if isinstance(k, bool) or not isinstance(k, int) or (k < 1 and k != -1):
        raise RequestError("truncate_prompt_tokens must be a positive integer or -1, "
                           f"got {k!r}", "truncate_prompt_tokens")
    if k > max_model_len:
        raise RequestError(f"truncate_prompt_tokens ({k}) is larger than the model's maximum "
                           f"context length ({max_model_len})", "truncate_prompt_tokens")
    return max_model_len if k == -1 else k


def check_length(num_tokens: int, max_model_len: int, param: str) -> None:
    if num_tokens > max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens, but the input has "
            f"{num_tokens} tokens; shorten it or set truncate_prompt_tokens", param)
    if num_tokens == 0:
        raise RequestError("the input must contain at least one token", param)


def _cut(ids: list[int], keep: int, side: str) -> list[int]:
    if len(ids) <= keep:
        return ids
    return ids[len(ids) - keep:] if side == "left" else ids[:keep]


class PoolingTokenizer:
    """Texts, token ids and text pairs -> (token ids, token type ids) within the context."""

    def __init__(self, front: TokenizerFront, max_model_len: int, side: str = "right") -> None:
        self.front = front
        self.tok = front.tokenizer
        self.max_model_len = max_model_len
        self.side = side

    def texts(self, texts: Sequence[str], limit: int | None, param: str = "input",
              add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text; over-long texts are cut to `limit` (keeping special tokens)
        when a limit is given, else refused."""
        encs = self.tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        out = []
        for text, enc in zip(texts, encs):
            ids = enc.ids
            if limit is not None and len(ids) > limit:
                ids = self._truncate_text(text, limit, add_special_tokens)
            check_length(len(ids), self.max_model_len, param)
            out.append(ids)
        return out

    def _truncate_text(self, text: str, limit: int, add_special_tokens: bool) -> list[int]:
        specials = self.tok.num_special_tokens_to_add(False) if add_special_tokens else 0
        enc = self.tok.encode(text, add_special_tokens=False)
        enc.truncate(max(limit - specials, 1), 0, self.side)
        if add_special_tokens:
            enc = self.tok.post_process(enc, None, True)
        return enc.ids[:limit]

    def token_ids(self, ids_list: Sequence[list[int]], limit: int | None,
                  param: str = "input") -> list[list[int]]:
        out = []
        for ids in ids_list:
            ids = _cut(list(ids), limit, self.side) if limit is not None else list(ids)
            check_length(len(ids), self.max_model_len, param)
            out.append(ids)
        return out

    def pairs(self, pairs: Sequence[tuple[str, str]], limit: int | None,
              param: str = "text_2", max_second: int | None = None
              ) -> list[tuple[list[int], list[int]]]:
        """(ids, type ids) of `[CLS] a [SEP] b [SEP]` per pair; longest-first truncation.
        `max_second` caps the second text's tokens first (Cohere's max_tokens_per_doc)."""
        specials = self.tok.num_special_tokens_to_add(True)
        out = []
        for a, b in pairs:
            enc_a = self.tok.encode(a, add_special_tokens=False)
            enc_b = self.tok.encode(b, add_special_tokens=False)
            if max_second is not None and len(enc_b.ids) > max_second:
                enc_b.truncate(max_second, 0, "right")
            total = len(enc_a.ids) + len(enc_b.ids) + specials
            if limit is not None and total > limit:
                len_a, len_b = len(enc_a.ids), len(enc_b.ids)
                budget = max(limit - specials, 2)
                while len_a + len_b > budget:  # longest first, as HF tokenizers do
                    if len_a > len_b:
                        len_a -= 1
                    else:
                        len_b -= 1
                enc_a.truncate(len_a, 0, "right")
                enc_b.truncate(len_b, 0, "right")
            enc = self.tok.post_process(enc_a, enc_b, True)
            check_length(len(enc.ids), self.max_model_len, param)
            out.append((enc.ids, enc.type_ids))
        return out


def output_values(out: PoolingOutput) -> list[float]:
    """The pooled float32 values as Python floats (flattened)."""
    values = array("f")
    values.frombytes(out.data)
    return values.tolist()


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


def pair_indices(num_1: int, num_2: int, param_1: str = "text_1",
                 param_2: str = "text_2") -> list[tuple[int, int]]:
    """vLLM's score pairing: one-to-one, one-to-many (1 x N) or many-to-many (N x N, zipped)."""
    if num_1 == 0 or num_2 == 0:
        raise RequestError(f"{param_1 if num_1 == 0 else param_2} must not be empty",
                           param_1 if num_1 == 0 else param_2)
    if num_1 == 1:
        return [(0, j) for j in range(num_2)]
    if num_1 != num_2:
        raise RequestError(f"{param_1} has {num_1} items and {param_2} {num_2}: give one "
                           f"{param_1} or as many as {param_2}", param_2)
    return [(i, i) for i in range(num_1)]
