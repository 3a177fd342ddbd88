"""The cache root ($FORNAX_CACHE) and prepared folders in it: "complete" marker, build lock."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from fornax.runtime import env

MARKER_NAME = "fornax-prepared.json"  # written last into a prepared folder


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The one cache root: `override` when given, else $FORNAX_CACHE, else ~/.cache/fornax."""
    if override is not None and str(override):
        return Path(override).expanduser()
    return env.CACHE.get()


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
