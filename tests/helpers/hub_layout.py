"""Test helper: write a model folder into a Hugging Face hub cache layout, as `hf download` leaves
it (blobs by content hash, snapshots of relative symlinks, refs holding commit hashes)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def commit_hash(label: str) -> str:
    """A 40-hex commit id made from a label (stable across runs)."""
    return hashlib.sha1(label.encode()).hexdigest()


def write_snapshot(cache: Path, repo_id: str, source: Path, commit: str, *,
                   refs: tuple[str, ...] = ("main",), skip: tuple[str, ...] = (),
                   replace: dict[str, str] | None = None) -> Path:
    """`source`'s files (less `skip`, with `replace`'s texts) as snapshot `commit` of `repo_id`
    under `cache`; each name in `refs` (a branch or tag, e.g. "main", "v1") points at it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    files = {p.name: p.read_bytes() for p in source.iterdir() if p.is_file()
             and p.name not in skip}
    files.update({name: text.encode() for name, text in (replace or {}).items()})
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        path = repo / "refs" / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(commit)  # huggingface_hub writes no newline
    return snapshot


def remove_repo(cache: Path, repo_id: str) -> None:
    shutil.rmtree(cache / ("models--" + repo_id.replace("/", "--")), ignore_errors=True)
