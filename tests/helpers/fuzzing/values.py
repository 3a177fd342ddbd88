"""Hypothesis strategies of extreme and malformed JSON values, and a msgspec-schema walker (fuzzer
process)."""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Any

import msgspec
from hypothesis import strategies as st

# Integers at the edges of every machine range the server or torch may meet.
EDGE_INTS = (0, 1, -1, 2, 255, 256, 65535, 65536, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1,
             2**32, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 2**64 - 1,
             10**30, -(10**30), 1000000000, 49152, 511, 512, 513)
EDGE_FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-300, 5e-324, 1e308, -1e308, 1.7976931348623157e308,
               math.nan, math.inf, -math.inf, 2.0**31, 2.0**63, 3.4e38, 1e-45, 100.0, -100.0)
# Text that breaks naive headers, logs, terminals, tokenizers and encoders.
EDGE_TEXT = ("", " ", "\r\n", "a\r\nX-Injected: 1", "\u2028", "\u2029", "\x00", "\x7f", "\ud800",
             "\udfff", "\ud83d", "²", "ﬀ", "é", "日本語", "🦊" * 3, "\ufeff", "\u202e", "%s%n",
             "{{7*7}}", "{% raw %}", "</s>", "<|im_start|>", "<think>", "null", "NaN", "[",
             "\\", "\"", "a" * 300, "\t\v\f", "\u0301" * 50, "../../etc/passwd", "%00",
             "resp_", "resp_../x", "chatcmpl-1")
HUGE_SIZES = (1_000, 10_000, 100_000, 1_000_000)


# Huge values come from the case's Random, never from hypothesis: hypothesis keeps a record of
# every example it draws, and megabyte examples made the fuzzer itself run out of memory.
def huge_string(rnd: random.Random) -> str:
    """A long string built from one piece."""
    piece = rnd.choice(("a", "hi ", "日本", "🦊", "\u2028", " ", "<s>", "\ud800x"))
    return piece * (rnd.choice(HUGE_SIZES) // len(piece))


def huge_list(rnd: random.Random) -> list[Any]:
    item = rnd.choice((0, 1, 2**31, "a", "", None, {}, [], 0.5, -1, 100000))
    return [item] * rnd.choice(HUGE_SIZES)


def deep_nesting(rnd: random.Random) -> Any:
    depth = rnd.choice((50, 200, 1000, 5000, 20000))
    kind = rnd.choice(("list", "dict", "mixed"))
    value: Any = rnd.choice((1, "x", None))
    for i in range(depth):
        value = [value] if kind == "list" or (kind == "mixed" and i % 2) else {"a": value}
    return value


@functools.cache
def edge_ints() -> st.SearchStrategy[int]:
    edges = st.sampled_from(EDGE_INTS)
    return st.one_of(edges, edges, edges, st.integers(-5, 600), st.integers(-(2**65), 2**65))


@functools.cache
def edge_floats() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(allow_nan=True, allow_infinity=True),
                     st.floats(-3, 3))


@functools.cache
def edge_text() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(EDGE_TEXT), st.text(max_size=40),
                     st.text(st.characters(codec="utf-8"), max_size=10))


@functools.cache
def scalars() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.booleans(), edge_ints(), edge_floats(), edge_text())


@functools.cache
def any_json() -> st.SearchStrategy[Any]:
    """Any JSON-ish value: scalars, small containers, huge lists and deep nesting."""
    return st.recursive(scalars(), lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(edge_text(), inner, max_size=4)),
        max_leaves=8)


# ---- msgspec structs -> JSON schema -> strategies --------------------------------------------
def struct_schema(struct: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the struct's own object schema, the $defs it refers to)."""
    schema = msgspec.json.schema(struct)
    defs = schema.get("$defs", {})
    return _resolve(schema, defs), defs


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


@dataclass
class Pool:
    """One case's hypothesis-drawn values. Every case draws the same shape of pool, whatever it
    turns out to be, so hypothesis sees a consistent choice sequence; a seeded Random then builds
    the case from the pool and the tables above (exact odds, full variety)."""

    seed: int
    ints: list[int]
    floats: list[float]
    texts: list[str]
    jsons: list[Any]
    blobs: list[bytes]

    def int(self, rnd: random.Random) -> int:
        return rnd.choice(self.ints) if rnd.random() < 0.5 else rnd.choice(EDGE_INTS)

    def float(self, rnd: random.Random) -> float | int:
        if rnd.random() < 0.15:
            return self.int(rnd)
        return rnd.choice(self.floats) if rnd.random() < 0.5 else rnd.choice(EDGE_FLOATS)

    def text(self, rnd: random.Random) -> str:
        if rnd.random() < 0.02:
            return huge_string(rnd)
        return rnd.choice(self.texts) if rnd.random() < 0.5 else rnd.choice(EDGE_TEXT)

    def small_text(self, rnd: random.Random) -> str:
        """Text that is at most a few KB (for values that may be repeated many times)."""
        text = self.text(rnd)
        return text if len(text) <= 4096 else rnd.choice(EDGE_TEXT)

    def json(self, rnd: random.Random) -> Any:
        if rnd.random() < 0.1:
            return rnd.choice((huge_list, deep_nesting, huge_string))(rnd)
        return rnd.choice(self.jsons) if rnd.random() < 0.6 else rnd.choice(
            (*EDGE_INTS, *EDGE_FLOATS, *EDGE_TEXT, None, True, [], {}, [None], {"": None}))

    def scalar(self, rnd: random.Random) -> Any:
        return rnd.choice((self.int, self.float, self.text, self.json))(rnd)


POOLS = st.builds(Pool, st.integers(0, 2**64 - 1),
                  st.lists(edge_ints(), min_size=6, max_size=6),
                  st.lists(edge_floats(), min_size=4, max_size=4),
                  st.lists(edge_text(), min_size=4, max_size=4),
                  st.lists(any_json(), min_size=3, max_size=3),
                  st.lists(st.binary(max_size=200), min_size=2, max_size=2))


def schema_value(schema: dict[str, Any], defs: dict[str, Any], rnd: random.Random, pool: Pool,
                 wild: float = 0.15, depth: int = 0) -> Any:
    """A value that fits `schema` (mostly at its edges), or with odds `wild` (at the top level
    only: deeper, wrong types hide the rest) one of the wrong type."""
    if depth == 0 and rnd.random() < wild:
        return pool.json(rnd)
    kinds = _kinds(schema, defs)
    if not kinds or rnd.random() < 0.05:
        return None
    kind = rnd.choice(kinds)
    t = kind.get("type")
    text = pool.text if depth == 0 else pool.small_text
    if "enum" in kind:
        return rnd.choice(kind["enum"]) if rnd.random() < 0.7 else text(rnd)
    if t == "integer":
        return pool.int(rnd) if rnd.random() < 0.8 else rnd.randint(-5, 600)
    if t == "number":
        return pool.float(rnd) if rnd.random() < 0.8 else rnd.uniform(-3, 3)
    if t == "string":
        if depth == 0 and rnd.random() < 0.05:  # huge only at the top: never huge x huge
            return rnd.choice(("a", "hi ", "日本", "\u2028", "\ud800x")) * rnd.choice(HUGE_SIZES)
        return text(rnd)
    if t == "boolean":
        return rnd.choice((True, False)) if rnd.random() < 0.9 else rnd.choice((0, 1, "true"))
    if t == "array":
        size = rnd.choice((0, 1, 1, 2, 3, 5, 8, 300, 5000) if depth == 0 else (0, 1, 2, 3))
        item = kind.get("items", {})
        distinct = [schema_value(item, defs, rnd, pool, wild, depth + 1)
                    for _ in range(min(size, 6))]
        return distinct * max(1, size // 6) if distinct else []
    if t == "object":
        if kind.get("properties"):
            return struct_value(kind, defs, rnd, pool, wild, depth + 1)
        values = kind.get("additionalProperties", {})
        return {pool.small_text(rnd) if rnd.random() < 0.7 else str(pool.int(rnd)):
                schema_value(values, defs, rnd, pool, wild, depth + 1)
                for _ in range(rnd.choice((0, 1, 2, 3)))}
    return pool.json(rnd) if depth == 0 else rnd.choice((*EDGE_INTS, *EDGE_FLOATS, *EDGE_TEXT))


def struct_value(schema: dict[str, Any], defs: dict[str, Any], rnd: random.Random, pool: Pool,
                 wild: float = 0.15, depth: int = 0) -> dict[str, Any]:
    """An object with the schema's required fields (mostly) and a few of its optional ones."""
    props: dict[str, Any] = schema.get("properties", {})
    names = sorted(props)
    chosen = set(rnd.sample(names, min(len(names), rnd.choice((0, 1, 2, 3, 5))))) if names \
        else set()
    if rnd.random() < 0.9:
        chosen |= set(schema.get("required", ()))
    return {name: schema_value(props[name], defs, rnd, pool, wild, depth)
            for name in sorted(chosen)}


def _kinds(schema: dict[str, Any], defs: dict[str, Any]) -> list[dict[str, Any]]:
    schema = _resolve(schema, defs)
    if "anyOf" in schema:
        return [k for s in schema["anyOf"] for k in _kinds(s, defs)]
    return [schema] if schema.get("type") != "null" else []
