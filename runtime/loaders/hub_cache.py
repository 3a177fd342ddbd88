"""Hub ids (`org/name`) found in the local Hugging Face cache, never downloaded (any process).

The cache layout is huggingface_hub's: `<cache>/models--org--name/refs/<branch or tag>` holds a
commit hash and `<cache>/models--org--name/snapshots/<commit>/` the files. Caches are searched in
this order, each only where it is set: `--download-dir` (vLLM's), `HF_HUB_CACHE`,
`HUGGINGFACE_HUB_CACHE` (its older name), `TRANSFORMERS_CACHE` (transformers' older one), then
`$HF_HOME/hub` (HF_HOME defaults to `$XDG_CACHE_HOME/huggingface`, else ~/.cache/huggingface).
The first snapshot found wins; when none is, the error names every place looked at. There is no
network code here: a model that is not on disk is an error, with the download command to run
on a machine that has a network.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from fornax.runtime import env
from fornax.runtime.errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_REVISION = "main"
# huggingface_hub's repo id: an optional namespace, a name; letters, digits, '-', '_', '.'
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_REVISION = re.compile(r"^[\w.+-]+(?:/[\w.+-]+)*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def looks_like_repo_id(name: str) -> bool:
    """True for `org/name` or `name` as the hub spells repo ids (no '--', '..' or path parts)."""
    return bool(_REPO_ID.match(name)) and "--" not in name and ".." not in name


def check_revision(revision: str, what: str = "--revision") -> None:
    """ConfigError-like refusal (ModelLoadError) of a revision that cannot name a ref or a
    commit: empty, absolute, with '..' or characters a ref cannot hold."""
    if not revision or not _REVISION.match(revision) or ".." in revision.split("/"):
        raise ModelLoadError(f"{what} {revision!r} is not a branch, tag or commit hash")


@dataclass(frozen=True)
class CachePlace:
    """One hub cache folder and where its location came from (for the error message)."""

    folder: Path
    source: str


def cache_places(download_dir: str | None = None) -> list[CachePlace]:
    """The hub caches to search, in order, without duplicates (see the module docstring)."""
    places: list[CachePlace] = []
    if download_dir:
        places.append(CachePlace(Path(download_dir).expanduser(), "--download-dir"))
    for var in (env.HF_HUB_CACHE, env.HUGGINGFACE_HUB_CACHE, env.TRANSFORMERS_CACHE):
        if (folder := var.get()) is not None:
            places.append(CachePlace(folder, var.name))
    if (home := env.HF_HOME.get()) is not None:
        places.append(CachePlace(home / "hub", "$HF_HOME/hub"))
    else:
        base = env.XDG_CACHE_HOME.get() or Path("~/.cache").expanduser()
        places.append(CachePlace(base / "huggingface" / "hub", "the default cache"))
    seen: set[Path] = set()
    unique = []
    for place in places:
        if place.folder not in seen:
            seen.add(place.folder)
            unique.append(place)
    return unique


def repo_folder_name(repo_id: str) -> str:
    """`org/name` -> `models--org--name` (huggingface_hub's folder for a model repo)."""
    return "models--" + repo_id.replace("/", "--")


def _snapshot(repo_dir: Path, revision: str) -> tuple[Path | None, str]:
    """(the snapshot folder for `revision`, or None and what was missing)."""
    if not repo_dir.is_dir():
        return None, "no such folder"
    ref = repo_dir / "refs" / revision
    commit = revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
    elif not _COMMIT.match(revision):
        refs = sorted(str(p.relative_to(repo_dir / "refs")) for p in (repo_dir / "refs").rglob("*")
                      if p.is_file()) if (repo_dir / "refs").is_dir() else []
        return None, f"no ref {revision!r} (refs: {', '.join(refs) or 'none'})"
    snapshot = repo_dir / "snapshots" / commit
    if not snapshot.is_dir():
        return None, f"no snapshot {commit}" + ("" if commit == revision else
                                                f" (refs/{revision} names it)")
    return snapshot, ""


def find_in_hub_cache(repo_id: str, revision: str | None = None,
                      download_dir: str | None = None, what: str = "model") -> Path:
    """The snapshot folder of `repo_id` at `revision` (a branch or tag in refs/, or a commit
    hash; default main) in the first cache that has it; ModelLoadError naming every place
    looked at otherwise."""
    revision = revision or DEFAULT_REVISION
    check_revision(revision, "--revision" if what == "model" else "--tokenizer-revision")
    looked: list[str] = []
    for place in cache_places(download_dir):
        repo_dir = place.folder / repo_folder_name(repo_id)
        snapshot, missing = _snapshot(repo_dir, revision)
        if snapshot is not None:
            logger.info("%s %s (revision %s) from the Hugging Face cache: %s", what, repo_id,
                        revision, snapshot)
            return snapshot
        looked.append(f"{repo_dir} ({place.source}: {missing})")
    raise ModelLoadError(
        f"{what} {repo_id!r} (revision {revision}) is neither a local path nor in the local "
        f"Hugging Face cache; fornax never downloads. Looked in: {'; '.join(looked)}. Download "
        f"it where there is a network (`hf download {repo_id}`) into one of these caches, or "
        "point --download-dir, HF_HUB_CACHE or HF_HOME at a cache that has it")
