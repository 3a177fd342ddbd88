"""perf/gpu_runbook.sh on a CPU machine: a missing carry stops it at once, DRY_RUN installs
fornax afresh on every call and plans the first call's stages."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNBOOK = REPO / "perf" / "gpu_runbook.sh"


def fake_wheel(folder: Path, dist: str, module: str) -> None:
    """A minimal valid pure-Python wheel holding `module`/__init__.py."""
    info = f"{dist}-0.1.dist-info"
    with zipfile.ZipFile(folder / f"{dist}-0.1-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{module}/__init__.py", "__version__ = '0.1'\n")
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: "
                     "true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")


def fake_carry(folder: Path) -> Path:
    folder.mkdir()
    stub = folder / "stub" / "flashinfer"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("__version__ = 'stub'\n")
    with tarfile.open(folder / "flashinfer-0.0.tar.xz", "w:xz") as tar:
        tar.add(stub, arcname="flashinfer")
    (stub / "__init__.py").unlink()
    stub.rmdir()
    stub.parent.rmdir()
    # stub modules under other names: the real msgspec and pytest-timeout stay importable
    for dist, module in (("apache_tvm_ffi", "tvm_ffi"), ("msgspec", "msgspec_stub"),
                         ("pytest_timeout", "pytest_timeout_stub")):
        fake_wheel(folder, dist, module)
    return folder


def run_book(tmp_path: Path, carry: Path, *stages: str, dry: bool = True
             ) -> subprocess.CompletedProcess:
    env = {**os.environ, "WHL_DIR": str(carry), "OUT": str(tmp_path / "out"),
           "SITE": str(tmp_path / "site"), "PY": sys.executable, "DRY_RUN": "1" if dry else "0",
           "FORNAX_CACHE": str(tmp_path / "cache")}
    env.pop("PYTHONPATH", None)
    return subprocess.run(["bash", str(RUNBOOK), *stages], capture_output=True, text=True,
                          env=env, timeout=300)


def test_a_missing_carry_stops_before_anything_runs(tmp_path: Path) -> None:
    empty = tmp_path / "whl"
    empty.mkdir()
    done = run_book(tmp_path, empty, dry=False)
    assert done.returncode == 3, done.stderr
    assert "flashinfer-*.tar.xz" in done.stderr and "msgspec-*.whl" in done.stderr
    assert "=== stage" not in done.stdout  # no stage started
    assert not (tmp_path / "site").exists()  # nothing installed


def test_an_unknown_stage_is_refused(tmp_path: Path) -> None:
    done = run_book(tmp_path, tmp_path / "nowhere", "tests", "benchmarks")
    assert done.returncode == 2 and "unknown stage benchmarks" in done.stderr


@pytest.mark.slow
def test_dry_run_reinstalls_fornax_every_call_and_plans_the_first_check(tmp_path: Path) -> None:
    carry = fake_carry(tmp_path / "whl")
    first = run_book(tmp_path, carry)
    assert first.returncode == 0, first.stdout + first.stderr
    env_log = (tmp_path / "out" / "env.log").read_text()
    assert f"fornax from {tmp_path / 'site-fornax'}" in env_log
    assert "flashinfer stub" in env_log  # the carried tarball was unpacked onto the path
    plan = [line for line in first.stdout.splitlines() if line.startswith("would run")]
    assert len(plan) == 2  # `first` = tests + floor
    assert "test_gpu_attention.py" in plan[0] and "--timeout" in plan[0]
    assert "decode-floor" in plan[1] and "--batch-sizes 1,64" in plan[1]
    stale = tmp_path / "site-fornax" / "stale-marker"
    stale.write_text("left by the previous call")
    second = run_book(tmp_path, carry, "second")
    assert second.returncode == 0, second.stdout + second.stderr
    assert not stale.exists()  # fornax was installed afresh
    assert "test_gpu_parity.py" in second.stdout and "modes" in second.stdout
