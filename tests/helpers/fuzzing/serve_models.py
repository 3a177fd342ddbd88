"""Fuzzed `--models` entries (a many-model server's list): any JSON, near-valid flag mappings and
plain model words, for the start-up parser's refusal test (test process)."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from helpers.fuzzing.values import any_json, edge_ints, edge_text

# flag names an entry may carry, server flags it must not, and a few that do not exist
_KEYS = ("model", "max_model_len", "max-model-len", "dtype", "served_model_name", "runner",
         "chat_template", "port", "api_key", "host", "models", "config", "nope", "--dtype", "",
         "idle_action", "idle_timeout", "max_loaded_memory", "kv_cache_memory")


def _value() -> st.SearchStrategy[object]:
    return st.one_of(any_json(), edge_ints(), edge_text(), st.lists(edge_text(), max_size=3),
                     st.sampled_from(["auto", "float32", "pooling", "generate", "-1", "1k",
                                      "sleep", "stop", "6GiB", "63MiB"]))


def model_words() -> st.SearchStrategy[list[str]]:
    """A `--models` argument list: JSON objects of flags, bare words, or broken JSON."""
    entry = st.dictionaries(st.sampled_from(_KEYS), _value(), max_size=5).map(json.dumps)
    word = st.one_of(entry, edge_text(), any_json().map(json.dumps),
                     entry.map(lambda text: text[:-1]))
    return st.lists(word, min_size=1, max_size=20)
