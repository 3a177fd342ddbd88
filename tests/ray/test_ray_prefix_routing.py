"""`request_router: prefix` on a local Ray cluster: requests sharing a long prompt prefix land on
one replica, distinct prefixes spread over both (which replica answered: the ingress's
x-fornax-replica header)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray.serve  # noqa: F401 - make test installs fornax[ray]: a broken extra fails here
import yaml

from helpers.api_server import REPO_ROOT, free_port, tiny_model_path

REPLICA_HEADER = "x-fornax-replica"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefix_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    folder = tmp_path_factory.mktemp("ray-prefix")
    config = {
        "model": str(tiny_model_path("llama")), "served_model_name": ["tiny"],
        "host": "127.0.0.1", "port": port, "max_model_len": 2048, "dtype": "float32",
        "deployment": {"num_replicas": 2, "request_router": "prefix",
                       "ray_actor_options": {"num_cpus": 0.5}},
    }
    (folder / "app.yaml").write_text(yaml.safe_dump(config), "utf-8")
    log = Path(tempfile.mkstemp(prefix="fornax-serve-ray-", suffix=".log")[1])
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fornax.api.cli", "serve-ray",
                                 str(folder / "app.yaml")], stdout=out, stderr=subprocess.STDOUT,
                                cwd=str(REPO_ROOT), start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1",
                                     "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_two_replicas(url, proc, log)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.unlink(missing_ok=True)


def _wait_two_replicas(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Until /metrics carries samples of two replicas (both children answer)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fornax serve-ray exited ({proc.returncode}):\n"
                               + log.read_text(errors="replace")[-4000:])
        try:
            text = httpx.get(f"{url}/metrics", timeout=10).text
            if len({line.split('replica="', 1)[1].split('"', 1)[0]
                    for line in text.splitlines() if 'replica="' in line}) >= 2:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("two replicas did not come up:\n" + log.read_text(errors="replace")[-4000:])


def _ask(url: str, system: str, user: str) -> str:
    reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "tiny", "max_tokens": 2, "temperature": 0,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
    assert reply.status_code == 200, reply.text
    return reply.headers[REPLICA_HEADER]


def _system(i: int) -> str:
    return f"System prompt {i}: " + " ".join(f"rule-{i}-{k}" for k in range(120))


def test_shared_prefix_sticks_to_one_replica_and_distinct_prefixes_spread(prefix_app):
    shared = [_ask(prefix_app, _system(0), f"question {k}") for k in range(8)]
    # the default router (power of two choices) splits 8 sequential requests over both replicas
    # with probability 1 - 2/256; the prefix router keeps them on the first one's replica
    assert len(set(shared)) == 1, shared
    # new prefixes: equal (idle) loads, so the replica holding fewer indexed blocks takes each
    spread = [_ask(prefix_app, _system(i), "hello") for i in range(1, 4)]
    assert len(set(shared) | set(spread)) == 2, (shared, spread)
    assert spread[0] != shared[0]
    # and each of those follows its prefix too
    assert [_ask(prefix_app, _system(i), "again") for i in range(1, 4)] == spread
