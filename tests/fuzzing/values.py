"""Hypothesis strategies of extreme and malformed JSON values, and a msgspec-schema walker (fuzzer
process)."""

from __future__ import annotations

import functools
import math
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


@st.composite
def huge_string(draw: st.DrawFn) -> str:
    """A long string built from one drawn piece (kept out of hypothesis's byte budget)."""
    piece = draw(st.sampled_from(("a", "hi ", "日本", "🦊", "\u2028", " ", "<s>", "\ud800x")))
    size = draw(st.sampled_from(HUGE_SIZES))
    return piece * (size // len(piece))


@st.composite
def huge_list(draw: st.DrawFn) -> list[Any]:
    item = draw(st.sampled_from((0, 1, 2**31, "a", "", None, {}, [], 0.5, -1, 100000)))
    size = draw(st.sampled_from(HUGE_SIZES))
    return [item] * size


@st.composite
def deep_nesting(draw: st.DrawFn) -> Any:
    depth = draw(st.sampled_from((50, 200, 1000, 5000, 20000)))
    kind = draw(st.sampled_from(("list", "dict", "mixed")))
    value: Any = draw(st.sampled_from((1, "x", None)))
    for i in range(depth):
        if kind == "list" or (kind == "mixed" and i % 2):
            value = [value]
        else:
            value = {"a": value}
    return value


@functools.cache
def edge_ints() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(EDGE_INTS), st.integers(-(2**70), 2**70),
                     st.integers(-5, 600))


@functools.cache
def edge_floats() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(allow_nan=True, allow_infinity=True),
                     st.floats(-3, 3))


@functools.cache
def edge_text() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(EDGE_TEXT), st.text(max_size=40),
                     st.text(st.characters(codec="utf-8"), max_size=10), huge_string())


@functools.cache
def scalars() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.booleans(), edge_ints(), edge_floats(), edge_text())


@functools.cache
def any_json() -> st.SearchStrategy[Any]:
    """Any JSON-ish value: scalars, small containers, huge lists and deep nesting."""
    small = st.recursive(scalars(), lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(edge_text(), inner, max_size=4)),
        max_leaves=8)
    return st.one_of(small, huge_list(), deep_nesting())


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


def from_schema(schema: dict[str, Any], defs: dict[str, Any], wild: float = 0.25,
                depth: int = 0) -> st.SearchStrategy[Any]:
    """Values that fit `schema`, mixed (with weight `wild`) with extremes and wrong types."""
    schema = _resolve(schema, defs)
    fitting = _fitting(schema, defs, wild, depth)
    if depth > 3:
        return fitting
    weight = max(1, int(wild * 10))
    return st.one_of(*([fitting] * (10 - weight)), *([any_json()] * weight))


def _fitting(schema: dict[str, Any], defs: dict[str, Any], wild: float,
             depth: int) -> st.SearchStrategy[Any]:
    if "anyOf" in schema:
        return st.one_of(*(from_schema(s, defs, wild, depth + 1) for s in schema["anyOf"]))
    if "enum" in schema:
        return st.one_of(st.sampled_from(schema["enum"]), edge_text())
    kind = schema.get("type")
    if kind == "integer":
        return edge_ints()
    if kind == "number":
        return st.one_of(edge_floats(), edge_ints())
    if kind == "string":
        return edge_text()
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        items = from_schema(schema.get("items", {}), defs, wild, depth + 1)
        return st.one_of(st.lists(items, max_size=5), huge_list())
    if kind == "object":
        props = schema.get("properties")
        if props:
            return struct_values(schema, defs, wild, depth + 1)
        values = from_schema(schema.get("additionalProperties", {}), defs, wild, depth + 1)
        return st.dictionaries(edge_text(), values, max_size=4)
    return any_json()


def struct_values(schema: dict[str, Any], defs: dict[str, Any], wild: float = 0.25,
                  depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the schema's required fields (mostly) and a few of its optional ones."""
    props: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", ()))
    names = sorted(props)

    values = {name: from_schema(props[name], defs, wild, depth) for name in names}

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        chosen = set(draw(st.lists(st.sampled_from(names), max_size=5))) if names else set()
        if draw(st.integers(0, 9)) > 0:
            chosen |= required
        return {name: draw(values[name]) for name in sorted(chosen)}

    return build()
