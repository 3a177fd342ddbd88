"""The engine-core process loads xgrammar (and the transformers it imports, ~50 MiB resident) on
the first request with an output constraint, not at start-up: a server that never constrains
output does not hold it (issue #20's resident-memory target); the first constrained request is
answered correctly, and from then on the library is mapped into the engine. FORNAX_GRAMMAR_PREWARM=1
loads it at start-up instead."""

from __future__ import annotations

import time

import httpx
import pytest

from fornax.perf.resident_memory import mapped
from helpers.api_server import serving, tiny_model_path

pytestmark = pytest.mark.slow

CHOICES = ["red", "green", "blue"]


def test_xgrammar_loads_on_the_first_constrained_request_only() -> None:
    with serving(str(tiny_model_path("llama")), "--max-model-len", "256",
                 "--kv-cache-memory", "32MiB") as server:
        pid = server.engine_pid()
        plain = httpx.post(server.url + "/v1/completions", timeout=120,
                           json={"prompt": "Colors:", "max_tokens": 4})
        assert plain.status_code == 200, plain.text
        time.sleep(3.0)  # what a start-up prewarm would have loaded by now on a quiet machine
        assert not mapped(pid, "xgrammar"), "xgrammar was loaded without a constrained request"
        constrained = httpx.post(server.url + "/v1/completions", timeout=180, json={
            "prompt": "Pick a color:", "max_tokens": 8, "structured_outputs": {"choice": CHOICES}})
        assert constrained.status_code == 200, constrained.text
        assert constrained.json()["choices"][0]["text"] in CHOICES
        assert mapped(pid, "xgrammar")  # the check above can see the library


def test_grammar_prewarm_loads_xgrammar_at_start_up() -> None:
    """FORNAX_GRAMMAR_PREWARM=1: loaded without any request (the first one does not wait)."""
    with serving(str(tiny_model_path("llama")), "--max-model-len", "256",
                 "--kv-cache-memory", "32MiB", env={"FORNAX_GRAMMAR_PREWARM": "1"}) as server:
        pid = server.engine_pid()
        deadline = time.monotonic() + 120  # an import of seconds, more on a loaded machine
        while not mapped(pid, "xgrammar") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert mapped(pid, "xgrammar")
