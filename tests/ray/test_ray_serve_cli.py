"""`fornax serve-ray` as a command: SIGTERM while its replicas are still waiting to start (here
for CPUs the cluster does not have) stops it and everything it started, instead of being held
until the application runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from fornax.perf.managed_server import descendants
from helpers.api_server import REPO_ROOT, free_port, tiny_model_path
from helpers.bench import alive

pytestmark = pytest.mark.slow


def test_sigterm_while_replicas_wait_to_start_stops_everything(tmp_path):
    port = free_port()
    config = {"model": str(tiny_model_path("llama")), "served_model_name": "tiny",
              "host": "127.0.0.1", "port": port, "max_model_len": 256,
              # never schedulable; Serve holds its shutdown for a replica that never started
              # for the whole grace period (default 20 s), so keep that short
              "deployment": {"ray_actor_options": {"num_cpus": 4096},
                             "graceful_shutdown_timeout_s": 1}}
    (tmp_path / "app.yaml").write_text(yaml.safe_dump(config), "utf-8")
    log = Path(tempfile.mkstemp(prefix="fornax-serve-ray-", suffix=".log")[1])
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fornax.api.cli", "serve-ray",
                                 str(tmp_path / "app.yaml")], stdout=out,
                                stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
                                start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    started: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while True:  # the ingress answers (its model has no replica): serve.run is waiting
            assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-4000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 503:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        started = set(descendants(proc.pid))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log.read_text(errors="replace")[-4000:]
        deadline = time.monotonic() + 30
        while (left := {p for p in started if alive(p)}) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"left running after serve-ray stopped: {sorted(left)}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in started:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        log.unlink(missing_ok=True)
