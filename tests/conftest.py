"""Shared pytest set-up: offline HF, thread count, `tools` importable, tiny-checkpoint factory."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
for _path in (REPO_ROOT, TESTS_DIR):  # `tools` and the tests' own `helpers` importable
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., Path]:
    """Factory: ``tiny_model(arch, seed=0)`` -> cached tiny random checkpoint dir (built once)."""
    from tools.make_tiny_model import tiny_model_dir

    def factory(arch: str, seed: int = 0) -> Path:
        return tiny_model_dir(arch, seed=seed)

    return factory


@pytest.fixture
def make_llm(tiny_model: Callable[..., Path]):
    """Factory for offline LLMs on tiny models; after the test, every KV block must be free."""
    from fornax.runtime import LLM

    made = []

    def factory(arch: str = "llama", **kwargs):
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("max_model_len", 512)
        llm = LLM(str(tiny_model(arch)), **kwargs)
        made.append(llm)
        return llm

    yield factory
    for llm in made:
        engine = llm.__dict__.get("engine")
        if engine is None:  # the test closed it
            continue
        assert not engine.has_unfinished_requests(), "requests left in the engine"
        assert engine.kv.num_free_blocks() == engine.kv.pool.num_usable_blocks, "KV blocks leaked"


def _flashinfer_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("flashinfer") is not None


# Fixtures that start a `fornax serve` or load a packaged model (tests/api/conftest.py,
# tests/engine/conftest.py): a test that uses one, even through another fixture, is `slow`.
SLOW_FIXTURES = frozenset({"main_server", "surfaces_server", "thinker_server", "cross_server",
                           "fuzz_fleet", "packaged_gguf"})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that use a SLOW_FIXTURES fixture are marked `slow`; `gpu` tests skip without CUDA,
    and those also marked `flashinfer` skip without flashinfer (an optional extra)."""
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    # markers, not keywords: a keyword also matches the folder name (tests/gpu/ holds CPU tests)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    has_cuda = torch.cuda.is_available()
    has_flashinfer = has_cuda and _flashinfer_importable()
    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    no_flashinfer = pytest.mark.skip(reason="needs flashinfer-python (pip install -e '.[gpu]')")
    for item in gpu_items:
        if not has_cuda:
            item.add_marker(no_cuda)
        elif item.get_closest_marker("flashinfer") and not has_flashinfer:
            item.add_marker(no_flashinfer)
