"""KVCacheManager: per-request block lists, prefix-cache lookups and slot allocation (engine core)."""

from __future__ import annotations

from dataclasses import dataclass

from fornax.runtime.kv_cache.block_hash import extend_block_hashes
from fornax.runtime.kv_cache.block_pool import BlockPool, KVCacheBlock
from fornax.runtime.scheduler.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class PrefixCacheStats:
    """Counters for the prefix-cache metrics (tokens queried and hit)."""

    queries: int = 0
    hits: int = 0


class KVCacheManager:
    """Hands out blocks to requests and shares full blocks between them by hash."""

    def __init__(self, num_blocks: int, block_size: int, max_model_len: int,
                 enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self._num_cached_blocks: dict[str, int] = {}
        self.stats = PrefixCacheStats()

    def usage(self) -> float:
        return self.pool.usage()

    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks()

    def _caches(self, request: Request) -> bool:
        return self.enable_caching or request.share_group is not None

    def _salt(self, request: Request) -> str | None:
        """With caching off, siblings still share: their chain is scoped to their group."""
        if self.enable_caching:
            return request.cache_salt
        return f"group\x00{request.share_group}\x00{request.cache_salt or ''}"

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of the request's tokens, never covering its last token."""
        if not self._caches(request):
            return [], 0
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size,
                            self._salt(request))
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        num_hit_tokens = len(hits) * self.block_size
        self.stats.queries += request.num_tokens
        self.stats.hits += num_hit_tokens
        return hits, num_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens; False (nothing changed) if blocks run out.

        `new_computed_blocks` are prefix-cache hits found for a request being admitted; the
        request's `num_computed_tokens` must already count them.
        """
        new_computed_blocks = new_computed_blocks or []
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        num_total = request.num_computed_tokens + num_new_tokens
        num_needed = cdiv(num_total, self.block_size) - len(blocks) - len(new_computed_blocks)
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks() - num_evictable_hits:
            if not blocks:
                del self.req_to_blocks[request.request_id]
            return False
        self.pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        if num_needed > 0:
            blocks.extend(self.pool.allocate(num_needed))
        self._cache_full_blocks(request, min(num_total, request.num_tokens))
        return True

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        if not self._caches(request):
            return
        num_full = num_tokens // self.block_size
        start = self._num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size,
                            self._salt(request))
        blocks = self.req_to_blocks[request.request_id]
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], request.block_hashes[i])
        self._num_cached_blocks[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks; tail blocks are evicted first."""
        blocks = self.req_to_blocks.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free(list(reversed(blocks)))

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
