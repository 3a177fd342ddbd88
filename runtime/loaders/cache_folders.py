"""Prepared-model cache folders: a marker file that means "complete", and a per-key build lock."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

MARKER_NAME = "fornax-prepared.json"  # written last into a prepared folder


def is_prepared(folder: Path, format_version: int) -> bool:
    """True when `folder` holds a complete preparation of this format version."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format_version") == format_version


@contextlib.contextmanager
def build_lock(lock_path: Path) -> Iterator[None]:
    """One build per key across processes (POSIX flock); the atomic rename is the backstop."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield
        return
    with open(lock_path, "a+b") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
