"""Chained block hashes for prefix caching (engine-core process)."""

from __future__ import annotations

import hashlib

import numpy as np

ROOT_HASH = b"fornax-kv-v1"


def root_hash(cache_salt: str | None) -> bytes:
    """The parent hash of a request's first block; a salt isolates its whole chain."""
    if not cache_salt:
        return ROOT_HASH
    return hashlib.sha256(ROOT_HASH + b"\x00salt\x00" + cache_salt.encode("utf-8")).digest()


def hash_block(parent_hash: bytes, token_ids: list[int] | np.ndarray) -> bytes:
    """Hash of one full block: (parent hash, the block's token ids)."""
    tokens = np.asarray(token_ids, dtype=np.int64).tobytes()
    return hashlib.sha256(parent_hash + tokens).digest()


def extend_block_hashes(
    block_hashes: list[bytes], token_ids: list[int], block_size: int, cache_salt: str | None
) -> None:
    """Append the hashes of every block of `token_ids` that became full since the last call."""
    num_full = len(token_ids) // block_size
    parent = block_hashes[-1] if block_hashes else root_hash(cache_salt)
    for i in range(len(block_hashes), num_full):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        block_hashes.append(parent)
