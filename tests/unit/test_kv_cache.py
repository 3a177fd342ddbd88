"""Unit tests of the block pool, chained block hashes and the KV-cache manager (no model)."""

from __future__ import annotations

import pytest

from fornax.runtime.kv_cache.block_hash import extend_block_hashes, hash_block, root_hash
from fornax.runtime.kv_cache.block_pool import BlockPool
from fornax.runtime.kv_cache.kv_cache_manager import KVCacheManager
from fornax.runtime.sampling.params import SamplingParams
from fornax.runtime.scheduler.request import Request


def make_request(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), cache_salt=salt)


def test_hashes_chain_over_parents_and_salt() -> None:
    a = [1, 2, 3, 4]
    h1 = hash_block(root_hash(None), a)
    assert h1 == hash_block(root_hash(None), list(a))
    assert hash_block(h1, a) != h1  # same tokens, different parent
    assert hash_block(root_hash("tenant-a"), a) != h1
    assert hash_block(root_hash("tenant-a"), a) != hash_block(root_hash("tenant-b"), a)
    hashes: list[bytes] = []
    extend_block_hashes(hashes, list(range(10)), 4, None)
    assert len(hashes) == 2  # only full blocks
    extend_block_hashes(hashes, list(range(13)), 4, None)
    assert len(hashes) == 3
    assert hashes[1] == hash_block(hashes[0], [4, 5, 6, 7])


def test_pool_reserves_null_block_and_refcounts() -> None:
    pool = BlockPool(5)
    assert pool.num_free_blocks() == 4
    blocks = pool.allocate(4)
    assert 0 not in [b.block_id for b in blocks]
    with pytest.raises(RuntimeError):
        pool.allocate(1)
    pool.free(blocks)
    assert pool.num_free_blocks() == 4
    with pytest.raises(RuntimeError):
        pool.free(blocks[:1])


def test_lru_eviction_prefers_oldest_freed_and_keeps_hits() -> None:
    pool = BlockPool(4)
    a, b, c = pool.allocate(3)
    for blk, h in ((a, b"a"), (b, b"b"), (c, b"c")):
        pool.cache_block(blk, h)
    pool.free([b])
    pool.free([a])
    pool.free([c])
    # A hit on "a" takes it out of the free list; the next allocation evicts "b" (freed first).
    hit = pool.lookup(b"a")
    assert hit is a
    pool.touch([hit])
    new = pool.allocate(1)[0]
    assert new is b and pool.lookup(b"b") is None
    assert pool.lookup(b"c") is c and pool.lookup(b"a") is a


def test_prefix_hit_never_covers_last_prompt_token() -> None:
    kv = KVCacheManager(num_blocks=20, block_size=4, max_model_len=64)
    r1 = make_request("r1", list(range(8)))
    assert kv.allocate_slots(r1, 8)
    kv.free(r1)
    # Same 8 tokens: both blocks are cached, but the hit stops one block short.
    r2 = make_request("r2", list(range(8)))
    hits, n = kv.get_computed_blocks(r2)
    assert n == 4 and len(hits) == 1
    r3 = make_request("r3", list(range(9)))
    hits, n = kv.get_computed_blocks(r3)
    assert n == 8
    assert kv.stats.hits == 12 and kv.stats.queries == 17


def test_salt_isolates_prefix_cache() -> None:
    kv = KVCacheManager(num_blocks=20, block_size=4, max_model_len=64)
    r1 = make_request("r1", list(range(12)), salt="alice")
    assert kv.allocate_slots(r1, 12)
    assert kv.get_computed_blocks(make_request("x", list(range(12)), salt="bob"))[1] == 0
    assert kv.get_computed_blocks(make_request("y", list(range(12))))[1] == 0
    assert kv.get_computed_blocks(make_request("z", list(range(12)), salt="alice"))[1] == 8


def test_allocate_fails_cleanly_when_out_of_blocks() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4, max_model_len=64)  # 3 usable
    r1 = make_request("r1", list(range(8)))
    assert kv.allocate_slots(r1, 8)
    r2 = make_request("r2", list(range(100, 108)))
    assert not kv.allocate_slots(r2, 8)
    assert kv.num_free_blocks() == 1 and "r2" not in kv.req_to_blocks
    kv.free(r1)
    assert kv.num_free_blocks() == 3
    assert kv.usage() == 0.0


def test_shared_blocks_are_refcounted() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4, max_model_len=64)
    r1 = make_request("r1", list(range(9)))
    assert kv.allocate_slots(r1, 9)
    r2 = make_request("r2", list(range(9)))
    hits, n = kv.get_computed_blocks(r2)
    r2.num_computed_tokens = n
    assert kv.allocate_slots(r2, 9 - n, hits)
    assert kv.req_to_blocks["r1"][:2] == kv.req_to_blocks["r2"][:2]
    assert all(b.ref_cnt == 2 for b in kv.req_to_blocks["r2"][:2])
    kv.free(r1)
    kv.free(r2)
    assert kv.num_free_blocks() == 9


def test_reset_prefix_cache_refused_while_in_use() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4, max_model_len=64)
    r1 = make_request("r1", list(range(9)))
    assert kv.allocate_slots(r1, 9)
    assert not kv.reset_prefix_cache()
    kv.free(r1)
    assert kv.reset_prefix_cache()
    assert kv.get_computed_blocks(make_request("r2", list(range(9))))[1] == 0
