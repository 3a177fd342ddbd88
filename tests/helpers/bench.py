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
