"""Seeded benchmark workloads: random token prompts and synthetic chat conversations (CLI process)."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Protocol

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("random", "synthetic-chat")

_WORDS = (  # noqa: SIM905 - one readable paragraph of words
    "the of and to in is was for on that with as by at from his her they this which are have "
    "time people year way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government "
    "number night point home water room mother area money story fact month lot right study book "
    "eye job word business issue side kind head house service friend father power hour game line "
    "end member law car city community name president team minute idea kid body information back "
    "parent face others level office door health person art war history party result change "
    "morning reason research girl guy moment air teacher force education river mountain garden "
    "explain describe compare summarize translate write list suggest plan design improve build "
    "quickly carefully simple short detailed clear important useful interesting difficult new old"
).split()
_SYSTEM = "You are a helpful assistant. Answer clearly and concisely."
_ASKS = ("Explain", "Describe", "Summarize", "Write a short story about", "Give advice on",
         "Compare", "List the main ideas of", "Plan a trip involving")


class Tokenizer(Protocol):
    """What the workloads need from fornax's TokenizerFront (or anything shaped like it)."""

    vocab_size: int
    special_ids: dict[str, int]
    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str: ...

    def chat_prompt_ids(self, text: str) -> list[int]: ...


@dataclass
class BenchRequest:
    """One benchmark request: token ids for the offline engine, text/messages for HTTP servers."""

    prompt_len: int  # tokens (words when no tokenizer was available to count them)
    output_len: int
    prompt_token_ids: list[int] | None = None
    prompt: str | None = None
    messages: list[dict[str, str]] | None = field(default=None)


def parse_len_range(spec: str | int, range_ratio: float) -> tuple[int, int]:
    """"288" with range_ratio 0.5 -> (144, 432); "64:512" (or "64-512") -> (64, 512)."""
    text = str(spec).strip()
    for sep in (":", "-", ","):
        if sep in text:
            lo_s, hi_s = text.split(sep, 1)
            lo, hi = int(lo_s), int(hi_s)
            break
    else:
        if not 0.0 <= range_ratio < 1.0:
            raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
        center = int(text)
        lo, hi = int(center * (1 - range_ratio)), int(center * (1 + range_ratio))
    if lo < 1 or hi < lo:
        raise ValueError(f"bad length range {spec!r}: need 1 <= min <= max, got {lo}..{hi}")
    return lo, hi


def _allowed_ids(tokenizer: Tokenizer | None, vocab_size: int | None) -> tuple[int, set[int]]:
    """(upper bound, ids to avoid): random prompts never contain special or unused ids."""
    if tokenizer is not None:
        return tokenizer.vocab_size, set(tokenizer.special_ids.values())
    if vocab_size is None:
        raise ValueError("random token prompts need a tokenizer or a vocab size")
    return vocab_size, set()


def _random_ids(rng: random.Random, n: int, upper: int, avoid: set[int]) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        tid = rng.randrange(0, upper)
        if tid not in avoid:
            out.append(tid)
    return out


def _random_words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _fit_text(tokenizer: Tokenizer, rng: random.Random, num_tokens: int) -> str:
    """Natural-looking text of about `num_tokens` tokens (cut at the token level, then decoded)."""
    if num_tokens <= 0:
        return ""
    ids: list[int] = []
    while len(ids) < num_tokens:
        ids += tokenizer.encode(" " + _random_words(rng, num_tokens), add_special_tokens=False)
    return tokenizer.decode(ids[:num_tokens]).strip()


def random_requests(n: int, input_range: tuple[int, int], output_range: tuple[int, int], *,
                    seed: int, prefix_len: int = 0, tokenizer: Tokenizer | None = None,
                    vocab_size: int | None = None, need_text: bool = False) -> list[BenchRequest]:
    """Prompts of uniformly random token ids (plus a shared random prefix of `prefix_len` ids).

    Without a tokenizer and with `need_text`, prompts are random words (lengths then in words).
    """
    rng = random.Random(seed)
    if tokenizer is None and need_text:
        prefix = _random_words(rng, prefix_len) if prefix_len else ""
        out = []
        for _ in range(n):
            in_len, out_len = rng.randint(*input_range), rng.randint(*output_range)
            text = (prefix + " " if prefix else "") + _random_words(rng, in_len)
            out.append(BenchRequest(prompt_len=prefix_len + in_len, output_len=out_len,
                                    prompt=text))
        return out
    upper, avoid = _allowed_ids(tokenizer, vocab_size)
    prefix_ids = _random_ids(rng, prefix_len, upper, avoid)
    out = []
    for _ in range(n):
        in_len, out_len = rng.randint(*input_range), rng.randint(*output_range)
        ids = prefix_ids + _random_ids(rng, in_len, upper, avoid)
        text = tokenizer.decode(ids) if (tokenizer is not None and need_text) else None
        out.append(BenchRequest(prompt_len=len(ids), output_len=out_len, prompt_token_ids=ids,
                                prompt=text))
    return out


def chat_requests(n: int, input_range: tuple[int, int], output_range: tuple[int, int], *,
                  seed: int, prefix_len: int = 0,
                  tokenizer: Tokenizer | None = None) -> list[BenchRequest]:
    """Synthetic conversations: a system prompt (padded to `prefix_len` tokens, shared by all) and a
    user turn of about the sampled input length. Token ids only when the tokenizer can template."""
    rng = random.Random(seed)
    system = _SYSTEM
    if prefix_len and tokenizer is not None:
        system = _SYSTEM + " " + _fit_text(tokenizer, random.Random(seed ^ 0x5EED), prefix_len)
    elif prefix_len:
        system = _SYSTEM + " " + _random_words(random.Random(seed ^ 0x5EED), prefix_len)
    can_template = tokenizer is not None and bool(tokenizer.chat_template)
    out = []
    for _ in range(n):
        in_len, out_len = rng.randint(*input_range), rng.randint(*output_range)
        ask = rng.choice(_ASKS)
        if tokenizer is not None:
            body = _fit_text(tokenizer, rng, max(in_len - len(tokenizer.encode(ask)), 1))
        else:
            body = _random_words(rng, in_len)
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": f"{ask} {body}"}]
        if can_template:
            assert tokenizer is not None
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            ids = tokenizer.chat_prompt_ids(text)
            out.append(BenchRequest(prompt_len=len(ids), output_len=out_len,
                                    prompt_token_ids=ids, prompt=text, messages=messages))
        else:
            text = f"{system}\n\nUser: {ask} {body}\nAssistant:"
            ids = tokenizer.encode(text) if tokenizer is not None else None
            out.append(BenchRequest(prompt_len=len(ids) if ids else prefix_len + in_len,
                                    output_len=out_len, prompt_token_ids=ids, prompt=text,
                                    messages=messages))
    return out


def build_requests(dataset: str, n: int, input_range: tuple[int, int],
                   output_range: tuple[int, int], *, seed: int, prefix_len: int = 0,
                   tokenizer: Tokenizer | None = None, vocab_size: int | None = None,
                   need_text: bool = False) -> list[BenchRequest]:
    """The `--dataset` switch; every generator is deterministic in `seed`."""
    if n < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {n}")
    if prefix_len < 0:
        raise ValueError(f"--prefix-len must be >= 0, got {prefix_len}")
    if dataset == "random":
        return random_requests(n, input_range, output_range, seed=seed, prefix_len=prefix_len,
                               tokenizer=tokenizer, vocab_size=vocab_size, need_text=need_text)
    if dataset == "synthetic-chat":
        return chat_requests(n, input_range, output_range, seed=seed, prefix_len=prefix_len,
                             tokenizer=tokenizer)
    raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")


def workload_summary(requests: list[BenchRequest]) -> dict[str, Any]:
    """Totals and ranges of the workload, stored in the JSON next to the results."""
    ins = [r.prompt_len for r in requests]
    outs = [r.output_len for r in requests]
    return {"num_prompts": len(requests), "total_input_tokens": sum(ins),
            "total_output_tokens": sum(outs), "min_input_len": min(ins), "max_input_len": max(ins),
            "min_output_len": min(outs), "max_output_len": max(outs)}
