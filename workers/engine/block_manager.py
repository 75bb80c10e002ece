"""Paged KV block bookkeeping: a fixed pool, refcounts, and prefix caching by chained block hash.

No tensors live here; the model runner owns the cache memory and this module decides
which block ids each request uses.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

from workers.engine.request import Request

logger = logging.getLogger(__name__)


def hash_block(parent_hash: int | None, token_ids: Sequence[int], lora_id: int) -> int:
    """Key of a full block: its tokens, everything before it (through the parent), and the adapter."""
    return hash((parent_hash, tuple(token_ids), lora_id))


class BlockPool:
    """A fixed set of blocks. Blocks with refcount 0 sit in an LRU free queue; those with a hash stay
    findable by prefix lookups until the queue hands them out again."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[int | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    def lookup(self, block_hash: int) -> int | None:
        return self._cached.get(block_hash)

    def allocate(self, count: int) -> list[int]:
        """Take `count` blocks from the front of the free queue, evicting their cached content."""
        assert count <= len(self._free), "caller must check num_free first"
        blocks = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            old_hash = self.block_hashes[block_id]
            if old_hash is not None:
                del self._cached[old_hash]
                self.block_hashes[block_id] = None
                self.num_evictions += 1
            self.ref_counts[block_id] = 1
            blocks.append(block_id)
        return blocks

    def acquire(self, block_ids: Sequence[int]) -> None:
        """Take another reference to cached blocks (a prefix hit)."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self._free[block_id]
            self.ref_counts[block_id] += 1

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop a reference; blocks reaching zero join the free queue's tail (evicted last)."""
        for block_id in block_ids:
            assert self.ref_counts[block_id] > 0, f"block {block_id} released twice"
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self._free[block_id] = None

    def cache(self, block_id: int, block_hash: int) -> None:
        """Make a computed full block findable by its hash (first writer wins on duplicates)."""
        if self.block_hashes[block_id] is None and block_hash not in self._cached:
            self._cached[block_hash] = block_id
            self.block_hashes[block_id] = block_hash


class KVCacheManager:
    """Maps requests to block lists and keeps the prefix cache consistent with what was computed."""

    def __init__(self, *, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._blocks: dict[str, list[int]] = {}
        self._hashes: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def block_ids(self, request_id: str) -> list[int]:
        return self._blocks.get(request_id, [])

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Cached blocks covering the longest full-block prefix of the request's tokens.

        At least one token is always left to compute so the step yields logits to sample.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits, parent = [], None
        for i in range(max_blocks):
            tokens = request.all_token_ids[i * self.block_size : (i + 1) * self.block_size]
            parent = hash_block(parent, tokens, request.lora_id)
            block_id = self.pool.lookup(parent)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def num_blocks_needed(self, request: Request, num_new_tokens: int, cached_prefix: Sequence[int] = ()) -> int:
        """Fresh blocks an allocation of `num_new_tokens` would take, counting evictable prefix hits."""
        held = len(self._blocks.get(request.request_id, ())) + len(cached_prefix)
        total = self._total_blocks(request, num_new_tokens, cached_prefix)
        revived = sum(1 for b in cached_prefix if self.pool.ref_counts[b] == 0)
        return max(total - held, 0) + revived

    def _total_blocks(self, request: Request, num_new_tokens: int, cached_prefix: Sequence[int]) -> int:
        # A fresh request's prefix hits count as computed before the scheduler records them.
        num_computed = max(request.num_computed_tokens, len(cached_prefix) * self.block_size)
        return -(-(num_computed + num_new_tokens) // self.block_size)

    def allocate(self, request: Request, num_new_tokens: int, cached_prefix: Sequence[int] = ()) -> bool:
        """Reserve blocks for `num_new_tokens` more tokens. Returns False, changing nothing, when short."""
        if self.num_blocks_needed(request, num_new_tokens, cached_prefix) > self.pool.num_free:
            return False
        blocks = self._blocks.setdefault(request.request_id, [])
        if cached_prefix:
            self.pool.acquire(cached_prefix)
            blocks.extend(cached_prefix)
            self._hashes[request.request_id] = self._prefix_hashes(request, len(cached_prefix))
        total = self._total_blocks(request, num_new_tokens, cached_prefix)
        if total > len(blocks):
            blocks.extend(self.pool.allocate(total - len(blocks)))
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        hashes = self._hashes.setdefault(request.request_id, [])
        blocks = self._blocks[request.request_id]
        num_full = request.num_computed_tokens // self.block_size
        for i in range(len(hashes), num_full):
            tokens = request.all_token_ids[i * self.block_size : (i + 1) * self.block_size]
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens, request.lora_id))
            self.pool.cache(blocks[i], hashes[-1])

    def free(self, request_id: str) -> None:
        """Release all of a request's blocks, tail first, so its prefix stays cached the longest."""
        blocks = self._blocks.pop(request_id, [])
        self._hashes.pop(request_id, None)
        self.pool.release(blocks[::-1])

    def _prefix_hashes(self, request: Request, num_blocks: int) -> list[int]:
        hashes, parent = [], None
        for i in range(num_blocks):
            tokens = request.all_token_ids[i * self.block_size : (i + 1) * self.block_size]
            parent = hash_block(parent, tokens, request.lora_id)
            hashes.append(parent)
        return hashes
