"""Prefix-affinity routing policy, pure Python (no ray): prompt blocks, a bounded LRU index of
block-chain hashes to replicas, and the choice with its imbalance fallback (runs in the process
that holds a Ray Serve deployment handle: the ingress replica or a proxy)."""

from __future__ import annotations

import hashlib
import logging
import random
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

logger = logging.getLogger(__name__)

# Separators of the canonical prompt string: a chat message's role, name and tool ids are kept
# apart from its content, so "user: a" and "usera" never render alike.
_FIELD = "\x1f"
_RECORD = "\x1e"
_PART = "\x1d"


@dataclass(frozen=True)
class PrefixPolicyConfig:
    """The policy's knobs (`request_router_kwargs` of the deployment; `from_kwargs` checks them).

    A block is `block_chars` characters of the canonical prompt (about a quarter as many tokens);
    only whole blocks count, at most `max_blocks` of them (the work per request is bounded
    whatever the prompt's size). The index holds at most `max_entries` block hashes (LRU), each
    with at most `max_holders` replicas. A replica holding the longest match is chosen unless
    its queue exceeds the least-loaded replica's by more than `imbalance_threshold` requests
    (raise it where a replica runs dozens of requests at once, as on a GPU)."""

    block_chars: int = 256
    max_blocks: int = 64
    max_entries: int = 100_000
    imbalance_threshold: int = 4
    min_match_blocks: int = 1
    max_holders: int = 4

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any] | None) -> PrefixPolicyConfig:
        """Build from user-given kwargs; ValueError naming the field on an unknown name, a
        non-integer or an out-of-range value."""
        bounds = {"block_chars": (16, 1 << 16), "max_blocks": (1, 4096),
                  "max_entries": (1, 10_000_000), "imbalance_threshold": (0, 1 << 20),
                  "min_match_blocks": (1, 4096), "max_holders": (1, 64)}
        values: dict[str, int] = {}
        for name, value in (kwargs or {}).items():
            if name not in bounds:
                raise ValueError(f"request_router_kwargs.{name}: unknown (known: "
                                 f"{', '.join(sorted(bounds))})")
            lo, hi = bounds[name]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"request_router_kwargs.{name}: must be an integer in "
                                 f"[{lo}, {hi}], got {value!r}")
            values[name] = value
        return cls(**values)

    def as_kwargs(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ---------------------------------------------------------------------------------------------
# The canonical prompt string of a request body


def _content_text(content: object, out: list[str], budget: int) -> int:
    """Append a message content's text (a string, or a list of parts) to `out`; returns the
    characters appended. Non-text parts leave a marker of their kind and a bounded slice of
    their reference (an image URL), so two different images do not render alike."""
    if isinstance(content, str):
        piece = content[:budget]
        out.append(piece)
        return len(piece)
    if not isinstance(content, list):
        return 0
    used = 0
    for part in content:
        if used >= budget:
            break
        if isinstance(part, str):
            piece = part
        elif isinstance(part, Mapping):
            kind = part.get("type")
            text = part.get("text")
            if isinstance(text, str):
                piece = text
            else:
                ref = part.get(kind) if isinstance(kind, str) else None
                url = ref.get("url") if isinstance(ref, Mapping) else None
                piece = f"{_PART}{kind}{_PART}" + (url[:512] if isinstance(url, str) else "")
        else:
            continue
        piece = piece[:budget - used]
        out.append(piece)
        used += len(piece)
    return used


def _tool_calls_text(calls: object) -> str:
    if not isinstance(calls, list):
        return ""
    pieces = []
    for call in calls:
        fn = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(fn, Mapping):
            pieces.append(f"{fn.get('name')}{_PART}{fn.get('arguments')}")
    return _PART.join(pieces)


def _messages_text(messages: list[Any], limit: int) -> str:
    out: list[str] = ["chat", _RECORD]
    used = 0
    for message in messages:
        if used >= limit:
            break
        if not isinstance(message, Mapping):
            continue
        head = _FIELD.join(str(message.get(key) or "") for key in ("role", "name", "tool_call_id"))
        out.append(head + _FIELD)
        used += len(head) + 1
        used += _content_text(message.get("content"), out, max(limit - used, 0))
        calls = _tool_calls_text(message.get("tool_calls"))
        if calls:
            out.append(_FIELD + calls[:max(limit - used, 0)])
            used += len(calls) + 1
        out.append(_RECORD)
        used += 1
    return "".join(out)[:limit]


def _prompt_text(prompt: object, limit: int) -> str | None:
    if isinstance(prompt, str):
        return "prompt" + _RECORD + prompt[:limit]
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int) and not isinstance(first, bool):
            # token ids: each id as a short decimal, a token-ish "character" run
            ids = ",".join(str(t) for t in prompt[:limit // 2] if isinstance(t, int))
            return "ids" + _RECORD + ids[:limit]
        if isinstance(first, (str, list)):  # a batch: route by its first prompt
            return _prompt_text(first, limit)
    return None


def prompt_text(body: object, limit_chars: int) -> str | None:
    """The canonical prompt string of an OpenAI-style request body, at most `limit_chars` long:
    chat `messages`, completion `prompt` (text, token ids, or a batch: its first), or Responses
    `instructions` + `input`. None when the body holds no prompt this policy understands; the
    model name leads the string so two models never share entries."""
    if not isinstance(body, Mapping) or limit_chars <= 0:
        return None
    model = body.get("model")
    lead = (model if isinstance(model, str) else "")[:256] + _RECORD
    text: str | None = None
    messages = body.get("messages")
    if isinstance(messages, list):
        text = _messages_text(messages, limit_chars)
    elif "prompt" in body:
        text = _prompt_text(body.get("prompt"), limit_chars)
    elif "input" in body and body.get("input") is not None:
        instructions = body.get("instructions")
        items = body.get("input")
        if isinstance(items, str):
            items = [{"role": "user", "content": items}]
        if isinstance(items, list):
            if isinstance(instructions, str):
                items = [{"role": "system", "content": instructions}, *items]
            text = _messages_text(items, limit_chars)
    if text is None:
        return None
    return (lead + text)[:limit_chars]


# ---------------------------------------------------------------------------------------------
# Blocks and the index


def block_hashes(text: str, block_chars: int, max_blocks: int) -> list[bytes]:
    """Chained hashes of the whole `block_chars`-sized blocks of `text` (at most `max_blocks`):
    hash i covers blocks 0..i, so equal hashes mean an equal prefix."""
    hashes: list[bytes] = []
    prev = b""
    n = min(len(text) // block_chars, max_blocks)
    for i in range(n):
        block = text[i * block_chars:(i + 1) * block_chars]
        prev = hashlib.blake2b(prev + block.encode("utf-8", "surrogatepass"),
                               digest_size=12).digest()
        hashes.append(prev)
    return hashes


class PrefixIndex:
    """Bounded LRU map of block-chain hash -> the replicas that served that prefix (at most
    `max_holders`, most recent last), with a count of entries per replica (how much cache each
    one is believed to hold)."""

    def __init__(self, max_entries: int, max_holders: int = 1) -> None:
        self.max_entries = max_entries
        self.max_holders = max_holders
        self._holders: OrderedDict[bytes, list[str]] = OrderedDict()
        self._owned: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._holders)

    def owned(self, replica: str) -> int:
        return self._owned.get(replica, 0)

    def longest_match(self, hashes: list[bytes],
                      candidates: Collection[str]) -> tuple[list[str], int]:
        """(the candidates holding the longest indexed prefix, its blocks); ([], 0) when no
        candidate holds any. Matched entries become most recently used."""
        best: list[str] = []
        depth = 0
        for i, h in enumerate(hashes):
            holders = self._holders.get(h)
            if holders is None:
                break  # chained hashes: no longer prefix can be indexed past a miss
            self._holders.move_to_end(h)
            found = [r for r in holders if r in candidates]
            if found:
                best, depth = found, i + 1
        return best, depth

    def _drop(self, replica: str) -> None:
        left = self._owned.get(replica, 0) - 1
        if left > 0:
            self._owned[replica] = left
        else:
            self._owned.pop(replica, None)

    def record(self, hashes: Iterable[bytes], replica: str) -> None:
        for h in hashes:
            holders = self._holders.get(h)
            if holders is None:
                self._holders[h] = holders = []
            else:
                self._holders.move_to_end(h)
            if replica in holders:
                holders.remove(replica)
            else:
                self._owned[replica] = self._owned.get(replica, 0) + 1
            holders.append(replica)
            while len(holders) > self.max_holders:
                self._drop(holders.pop(0))
        while len(self._holders) > self.max_entries:
            _, gone = self._holders.popitem(last=False)
            for r in gone:
                self._drop(r)

    def remove_replica(self, replica: str) -> int:
        """Forget a replica that left; returns how many entries it held."""
        held = [h for h, holders in self._holders.items() if replica in holders]
        for h in held:
            holders = self._holders[h]
            holders.remove(replica)
            if not holders:
                del self._holders[h]
        self._owned.pop(replica, None)
        return len(held)

    def retain(self, replicas: Collection[str]) -> None:
        for gone in [r for r in self._owned if r not in replicas]:
            self.remove_replica(gone)


# ---------------------------------------------------------------------------------------------
# The choice


@dataclass(frozen=True)
class Choice:
    """One routing decision: the replica, why (`affinity`, `imbalance`: the holder was too busy,
    `no_match`, `no_prompt`), the matched blocks and the request's block hashes (recorded for
    whichever replica finally serves it)."""

    replica: str
    reason: str
    matched_blocks: int
    hashes: list[bytes]


class PrefixAffinityPolicy:
    """The least-loaded replica among those holding the longest indexed prefix, unless even that
    one is busier than the least-loaded replica overall by more than the threshold; then (and
    for a prompt nobody holds) the least-loaded replica (ties: the one holding the fewest
    indexed blocks, so distinct prefixes spread, then random). Whoever serves a prefix becomes
    one of its holders, so a hot prefix that spilled over is then shared by its holders."""

    def __init__(self, config: PrefixPolicyConfig | None = None,
                 rng: random.Random | None = None) -> None:
        self.config = config or PrefixPolicyConfig()
        self.index = PrefixIndex(self.config.max_entries, self.config.max_holders)
        self._rng = rng or random.Random()
        self.counts: dict[str, int] = {"affinity": 0, "imbalance": 0, "no_match": 0,
                                       "no_prompt": 0}

    def hashes_of(self, body: object) -> list[bytes] | None:
        cfg = self.config
        text = prompt_text(body, cfg.block_chars * cfg.max_blocks)
        if text is None:
            return None
        return block_hashes(text, cfg.block_chars, cfg.max_blocks)

    def least_loaded(self, loads: Mapping[str, int], among: Collection[str] | None = None) -> str:
        pool = list(loads) if among is None else [r for r in loads if r in among]
        low = min(loads[r] for r in pool)
        tied = [r for r in pool if loads[r] == low]
        fewest = min(self.index.owned(r) for r in tied)
        tied = [r for r in tied if self.index.owned(r) == fewest]
        return tied[0] if len(tied) == 1 else self._rng.choice(sorted(tied))

    def choose(self, body: object, loads: Mapping[str, int]) -> Choice | None:
        """The replica for a request body given each candidate's queue length; None when there
        is no candidate. The choice is recorded at once, so the next request of the same
        prefix follows it even before this one is sent."""
        if not loads:
            return None
        hashes = self.hashes_of(body)
        if not hashes:
            choice = Choice(self.least_loaded(loads), "no_prompt" if hashes is None else
                            "no_match", 0, hashes or [])
        else:
            holders, depth = self.index.longest_match(hashes, loads)
            if not holders or depth < self.config.min_match_blocks:
                choice = Choice(self.least_loaded(loads), "no_match", depth, hashes)
            else:
                holder = self.least_loaded(loads, holders)
                if loads[holder] - min(loads.values()) > self.config.imbalance_threshold:
                    choice = Choice(self.least_loaded(loads), "imbalance", depth, hashes)
                else:
                    choice = Choice(holder, "affinity", depth, hashes)
        self.counts[choice.reason] += 1
        self.record(choice.hashes, choice.replica)
        return choice

    def record(self, hashes: list[bytes], replica: str) -> None:
        if hashes:
            self.index.record(hashes, replica)

    def remove_replica(self, replica: str) -> None:
        n = self.index.remove_replica(replica)
        logger.debug("prefix index: replica %s left, %d entries dropped", replica, n)

    def retain(self, replicas: Collection[str]) -> None:
        self.index.retain(replicas)
