"""The API tests' shared servers: session fixtures, each started on first use by a test that asks
for it, shared by every module after that, and stopped by pytest at the end of the session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import openai
import pytest

from helpers.api_server import (
    CROSS_ARGS,
    MAIN_ARGS,
    SURFACES_ARGS,
    ServerProcess,
    serving,
    tiny_model_path,
)
from helpers.thinker import thinker_args, thinker_model

if TYPE_CHECKING:
    from helpers.fuzzing.fleet import Fleet


@pytest.fixture(scope="session")
def main_server() -> Iterator[ServerProcess]:
    """The tiny-llama server most API tests use: keys, aliases, 2 workers, CORS, small limits."""
    with serving(str(tiny_model_path("llama")), *MAIN_ARGS) as server:
        yield server


@pytest.fixture(scope="session")
def surfaces_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The dev-endpoint and Responses tests' tiny llama: no API key, dev endpoints on, a 64 MiB
    KV cache and a SQLite responses store that its 2 workers share and that a restart() finds."""
    db = tmp_path_factory.mktemp("responses") / "store.db"
    with serving(str(tiny_model_path("llama")), *SURFACES_ARGS,
                 "--responses-store", f"sqlite:{db}") as server:
        yield server


@pytest.fixture(scope="session")
def thinker_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """helpers.thinker's model with the hermes tool parser and the qwen3 reasoning parser; shared
    by the tool-calling and reasoning tests of every surface (chat, Anthropic, Responses)."""
    root = tmp_path_factory.mktemp("thinker")
    with serving(thinker_model(root), *thinker_args(root)) as server:
        yield server


@pytest.fixture(scope="session")
def thinker_client(thinker_server: ServerProcess) -> openai.OpenAI:
    """The openai client of the thinker server (no API key, no retries)."""
    return openai.OpenAI(base_url=thinker_server.url + "/v1", api_key="none", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="session")
def thinker_http(thinker_server: ServerProcess) -> Iterator[httpx.Client]:
    """An httpx client on the thinker server's root (/tokenize, raw JSON bodies)."""
    with httpx.Client(base_url=thinker_server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def cross_server() -> Iterator[ServerProcess]:
    """The tiny BERT cross-encoder (float32): the pooling routes' and SageMaker's tests."""
    from tools.make_tiny_bert import tiny_bert_dir

    with serving(str(tiny_bert_dir("bert-cross")), *CROSS_ARGS, timeout_s=180) as server:
        yield server


@pytest.fixture(scope="session")
def fuzz_fleet() -> Iterator[Fleet]:
    """The fuzzed servers (tiny llama, tiny BERT embedder and classifier, Whisper tiny.en): the
    short campaign's; the abort storm runs on its tiny llama afterwards."""
    from helpers.fuzzing.fleet import Fleet
    from helpers.fuzzing.routes import ASR, CLS, EMBED, GEN
    from helpers.whisper_fixtures import packaged_whisper

    packaged_whisper("whisper-tiny.en")  # `make install` installs it: fails when missing
    started = Fleet((GEN, EMBED, CLS, ASR)).start()
    yield started
    started.stop()
