"""Paged KV block bookkeeping: a fixed pool, refcounts, and prefix caching by chained block hash.

No tensors live here: the model runner owns the cache memory, and this module only decides
which block ids each request uses. The pool never grows.

Prefix caching: a FULL block whose KV has been computed is registered under the key
`(parent_hash, block_token_ids, lora_id)`; its own hash, `hash(key)`, is the parent of the next
block, so one key names a whole prefix. A block whose refcount drops to 0 keeps its key and stays
findable until the free queue hands it out again (least recently freed first).

Python's `hash` differs between processes (on 3.11 `hash(None)` is address-based), so those hashes
never leave the worker. For the router, `stable_block_hash` chains a process-independent digest over
the same blocks, keyed by adapter name instead of the worker-local `lora_id`, and
`BlockPool.cached_block_hashes` publishes the cached prefixes under it.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence

from workers.engine.request import Request

logger = logging.getLogger(__name__)

BlockKey = tuple[int | None, tuple[int, ...], int]
"""(parent block hash or None for the first block, the block's token ids, lora_id)."""


def block_key(parent_hash: int | None, token_ids: Sequence[int], lora_id: int) -> BlockKey:
    """Cache key of one full block: its tokens, everything before it (via the parent) and the adapter."""
    return (parent_hash, tuple(token_ids), lora_id)


def stable_block_hash(parent_hash: int | None, token_ids: Sequence[int], adapter: str | None) -> int:
    """Process-independent chained hash (unsigned 64-bit) of a full block; the router recomputes it from tokens.

    Same chaining as `hash(block_key(...))`, but over a BLAKE2b digest, and the adapter is named (None: base model)
    because `lora_id` is assigned per worker.
    """
    digest = hashlib.blake2b(digest_size=8)
    # Distinct tags keep "no parent" from colliding with parent 0 and "base model" with an adapter named "".
    digest.update(b"\x00" if parent_hash is None else b"\x01" + parent_hash.to_bytes(8, "little"))
    if adapter is None:
        digest.update(b"\x00")
    else:
        name = adapter.encode()
        digest.update(b"\x01" + len(name).to_bytes(4, "little") + name)
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return int.from_bytes(digest.digest(), "little")


def prefix_block_hashes(
    token_ids: Sequence[int], block_size: int, adapter: str | None = None, max_blocks: int | None = None
) -> list[int]:
    """`stable_block_hash` of each full block of `token_ids`, in order (at most `max_blocks` of them)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_blocks = len(token_ids) // block_size
    if max_blocks is not None:
        num_blocks = min(num_blocks, max(max_blocks, 0))
    hashes: list[int] = []
    parent: int | None = None
    for i in range(num_blocks):
        parent = stable_block_hash(parent, token_ids[i * block_size : (i + 1) * block_size], adapter)
        hashes.append(parent)
    return hashes


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockPool:
    """A fixed set of block ids with refcounts, an LRU free queue and the prefix-cache table.

    Free blocks (refcount 0) wait in `_free`; the front is handed out first. A freed block that
    holds a cached prefix joins the back, so cached blocks are evicted least recently freed first;
    a freed block with nothing cached joins the front, because reusing it evicts nothing.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._keys: list[BlockKey | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Keyed by the full key, not its hash, so a hash collision can never serve another block's KV.
        self._cached: dict[BlockKey, int] = {}
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out, cached-but-unused ones included."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks findable by prefix lookup, in use or not."""
        return len(self._cached)

    def lookup(self, key: BlockKey) -> int | None:
        return self._cached.get(key)

    def cached_block_hashes(self, limit: int, adapter_names: Mapping[int, str] | None = None) -> list[int]:
        """`stable_block_hash` of up to `limit` cached blocks, those least likely to be evicted first.

        Order: blocks held by requests (not evictable), then unused ones from the back of the free queue
        (most recently freed). Only blocks a lookup can reach are listed: the whole chain before them is
        cached, and their adapter is base (`lora_id` 0) or named in `adapter_names` (lora_id -> name).
        """
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        names = {0: None, **(adapter_names or {})}
        by_hash = {hash(key): key for key in self._cached}
        stable: dict[BlockKey, int | None] = {}
        in_use = [b for b in self._cached.values() if self.ref_counts[b] > 0]
        recently_freed = [b for b in reversed(self._free) if self._keys[b] is not None]
        hashes: list[int] = []
        for block_id in in_use + recently_freed:
            if len(hashes) >= limit:
                break
            value = _stable_hash_of(self._keys[block_id], by_hash, names, stable)
            if value is not None:
                hashes.append(value)
        return hashes

    def allocate(self, count: int) -> list[int]:
        """Take `count` blocks from the front of the free queue, dropping whatever they cached."""
        assert count <= len(self._free), "caller must check num_free first"
        blocks = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            key = self._keys[block_id]
            if key is not None:
                del self._cached[key]
                self._keys[block_id] = None
                self.num_evictions += 1
            self.ref_counts[block_id] = 1
            blocks.append(block_id)
        return blocks

    def acquire(self, block_ids: Iterable[int]) -> None:
        """Take another reference to cached blocks (a prefix hit), pulling unused ones off the free queue."""
        for block_id in block_ids:
            assert self._keys[block_id] is not None, f"block {block_id} holds no cached prefix"
            if self.ref_counts[block_id] == 0:
                del self._free[block_id]
            self.ref_counts[block_id] += 1

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block; blocks reaching zero join the free queue."""
        for block_id in block_ids:
            assert self.ref_counts[block_id] > 0, f"block {block_id} released twice"
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self._free[block_id] = None
                if self._keys[block_id] is None:
                    self._free.move_to_end(block_id, last=False)

    def cache(self, block_id: int, key: BlockKey) -> None:
        """Make a computed full block findable under `key`; a duplicate of an already cached key stays private."""
        existing = self._keys[block_id]
        if existing is not None:
            assert existing == key, f"block {block_id} is cached under another key"
            return
        if key not in self._cached:
            self._cached[key] = block_id
            self._keys[block_id] = key


def _stable_hash_of(
    key: BlockKey | None,
    by_hash: Mapping[int, BlockKey],
    names: Mapping[int, str | None],
    memo: dict[BlockKey, int | None],
) -> int | None:
    """Stable hash of a cached key, or None when its chain is broken or its adapter unnamed (memoized)."""
    # Walk up to the root or a memoized ancestor iteratively: chains of long prompts run to thousands of blocks.
    chain: list[BlockKey] = []
    link = key
    while link is not None and link not in memo:
        chain.append(link)
        parent = link[0]
        if parent is None:
            link = None
        elif parent in by_hash:
            link = by_hash[parent]
        else:  # parent evicted: a lookup stops there, so nothing below it is reachable
            memo.update(dict.fromkeys(chain))
            return None
    value = memo[link] if link is not None else None
    is_broken = link is not None and value is None
    for child in reversed(chain):
        is_broken = is_broken or child[2] not in names
        value = None if is_broken else stable_block_hash(value, child[1], names[child[2]])
        memo[child] = value
    return value


class KVCacheManager:
    """Maps requests to block lists and keeps the prefix cache consistent with what was computed.

    Contract: `allocate` never hands out a block another request can find by prefix lookup until
    `cache_computed_blocks` is called after the step that computed it, so a cache hit always
    points at finished KV.
    """

    def __init__(self, *, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._blocks: dict[str, list[int]] = {}
        self._num_hashed: dict[str, tuple[int, int | None]] = {}
        """Per request: how many leading blocks were registered, and the hash of the last of them."""
        self._reserved: dict[str, list[int]] = {}
        """Blocks held for an incoming migration, outside any request until `adopt_reserved` hands them over."""

    # ---- queries ----------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free

    @property
    def num_cached_blocks(self) -> int:
        return self.pool.num_cached

    @property
    def num_evictions(self) -> int:
        return self.pool.num_evictions

    def cached_block_hashes(self, limit: int, adapter_names: Mapping[int, str] | None = None) -> list[int]:
        """The prefix-cache summary the worker publishes: see `BlockPool.cached_block_hashes`."""
        if not self.enable_prefix_caching:
            return []
        return self.pool.cached_block_hashes(limit, adapter_names)

    def get_block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block table (empty when it holds none)."""
        return list(self._blocks.get(request_id, ()))

    def ref_count(self, block_id: int) -> int:
        return self.pool.ref_counts[block_id]

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Cached blocks covering the longest full-block prefix of the request's tokens.

        At most `num_tokens - 1` tokens (rounded down to a block) are served from the cache, so the
        step always computes at least one token and yields logits to sample from.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent: int | None = None
        for i in range((request.num_tokens - 1) // self.block_size):
            key = block_key(parent, self._block_tokens(request, i), request.lora_id)
            block_id = self.pool.lookup(key)
            if block_id is None:
                break
            hits.append(block_id)
            parent = hash(key)
        return hits

    def num_blocks_to_allocate(self, request: Request, num_total_tokens: int, cached_prefix: Sequence[int] = ()) -> int:
        """Blocks that covering `num_total_tokens` tokens would take off the free queue.

        Unused cached blocks among `cached_prefix` count too: reviving them takes them off the queue.
        """
        num_held = len(self._blocks.get(request.request_id, ())) + len(cached_prefix)
        num_fresh = max(cdiv(num_total_tokens, self.block_size) - num_held, 0)
        num_revived = sum(1 for b in cached_prefix if self.pool.ref_counts[b] == 0)
        return num_fresh + num_revived

    def num_blocks_freed_by(self, request_ids: Iterable[str], exclude: Iterable[int] = ()) -> int:
        """Blocks that would return to the free queue if all these requests freed theirs.

        Blocks other requests still share do not count, nor do those in `exclude` (a prefix the
        caller is about to reuse, which would leave the queue again at once).
        """
        held = Counter(b for rid in request_ids for b in self._blocks.get(rid, ()))
        skip = set(exclude)
        return sum(1 for b, count in held.items() if self.pool.ref_counts[b] == count and b not in skip)

    # ---- changes ----------------------------------------------------------------------------

    def allocate(self, request: Request, num_total_tokens: int, cached_prefix: Sequence[int] = ()) -> bool:
        """Make the request's blocks cover its first `num_total_tokens` tokens.

        `cached_prefix` (from `find_cached_prefix`) is only for a request that holds no blocks yet.
        Returns False, changing nothing, when the free queue is too short.
        """
        assert not cached_prefix or request.request_id not in self._blocks, "prefix hits only on first allocation"
        if self.num_blocks_to_allocate(request, num_total_tokens, cached_prefix) > self.pool.num_free:
            return False
        blocks = self._blocks.setdefault(request.request_id, [])
        if cached_prefix:
            # Acquire before allocating so the fresh blocks cannot evict the hits.
            self.pool.acquire(cached_prefix)
            blocks.extend(cached_prefix)
        num_fresh = cdiv(num_total_tokens, self.block_size) - len(blocks)
        if num_fresh > 0:
            blocks.extend(self.pool.allocate(num_fresh))
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's full blocks whose KV is now computed (call after each step)."""
        if not self.enable_prefix_caching:
            return
        blocks = self._blocks[request.request_id]
        num_done, parent = self._num_hashed.get(request.request_id, (0, None))
        num_full = request.num_computed_tokens // self.block_size
        assert num_full <= len(blocks), "computed tokens beyond the allocated blocks"
        if num_full <= num_done:
            return
        for i in range(num_done, num_full):
            key = block_key(parent, self._block_tokens(request, i), request.lora_id)
            self.pool.cache(blocks[i], key)
            parent = hash(key)
        self._num_hashed[request.request_id] = (num_full, parent)

    def free(self, request_id: str) -> None:
        """Release all of a request's blocks, tail first, so its prefix stays cached the longest."""
        blocks = self._blocks.pop(request_id, [])
        self._num_hashed.pop(request_id, None)
        self.pool.release(reversed(blocks))

    def reserve(self, key: str, num_blocks: int) -> list[int] | None:
        """Grow the reservation `key` to at least `num_blocks` blocks; None, changing nothing, when too few are free."""
        blocks = self._reserved.setdefault(key, [])
        num_fresh = num_blocks - len(blocks)
        if num_fresh > self.pool.num_free:
            if not blocks:
                del self._reserved[key]
            return None
        if num_fresh > 0:
            blocks.extend(self.pool.allocate(num_fresh))
        return list(blocks)

    def reserved_block_ids(self, key: str) -> list[int]:
        return list(self._reserved.get(key, ()))

    def release_reserved(self, key: str) -> int:
        """Give a reservation's blocks back; returns how many (0 for an unknown key)."""
        blocks = self._reserved.pop(key, [])
        self.pool.release(blocks)
        return len(blocks)

    def adopt_reserved(self, key: str, request: Request, num_total_tokens: int) -> list[int]:
        """Make the leading reserved blocks the request's block table; the surplus is released."""
        assert request.request_id not in self._blocks, "an adopting request must hold no blocks"
        blocks = self._reserved.pop(key)
        num_needed = cdiv(num_total_tokens, self.block_size)
        assert num_needed <= len(blocks), "reservation smaller than the request"
        self.pool.release(blocks[num_needed:])
        self._blocks[request.request_id] = blocks[:num_needed]
        return list(blocks[:num_needed])

    def _block_tokens(self, request: Request, index: int) -> list[int]:
        return request.all_token_ids[index * self.block_size : (index + 1) * self.block_size]
