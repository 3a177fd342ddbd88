"""Test helper: run one `fornax bench` command in-process and return its checked JSON record."""

from __future__ import annotations

import json
from pathlib import Path


def run_bench(tmp_path: Path, command: str, *args: str) -> dict:
    """`fornax bench <command> <args> --output-json <file>`: exits 0 and writes a record that
    passes the schema, of the command's kind (cpu-linear -> cpu_linear); returns the record."""
    from fornax.perf.cli import main
    from fornax.perf.schema import validate_record

    out = tmp_path / f"{command}.json"
    assert main([command, *args, "--output-json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert validate_record(rec) == []
    assert rec["kind"] == command.replace("-", "_")
    return rec


def fake_executable(tmp_path: Path, name: str, script: Path) -> Path:
    """An executable `tmp_path/bin/<name>` that runs the Python file `script` with this
    interpreter (a stand-in for a peer's binary: llama-server, guidellm)."""
    import sys

    path = tmp_path / "bin" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    path.chmod(path.stat().st_mode | 0o100)
    return path


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # reaped between the two looks: gone
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
