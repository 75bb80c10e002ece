"""A modelled worker's prefix cache, as vLLM's: chained block hashes, shared and refcounted while held, LRU once not.

Counts only, at the trace's hash granularity (e.g. Mooncake's 512-token blocks, a multiple of the KV block size):
a request looks up its leading blocks when admitted, holds what it finds (no new KV for a block another request
holds; a cached block no one held leaves the free pool) and computes only the rest, always including its last
prompt token; its full prompt blocks become findable as it computes them. Blocks no request holds stay cached
inside the worker's free blocks and are evicted least recently used (a prompt's tail before its head, as vLLM frees
blocks in reverse) when an allocation needs them. The worker owns the block counts; this owns only membership.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sim.worker import SimRequest


class PrefixCache:
    """Which prefix blocks a worker holds, by hash; `SimRequest.cached_hashes` lists each request's share."""

    def __init__(self, kv_block_size: int) -> None:
        self.kv_block_size = kv_block_size
        self.block_size = 0
        """Tokens per cached block, set by the first request with block hashes (0: it has seen none)."""
        self.blocks_per_hash = 0
        """KV blocks one cached block occupies."""
        self.num_query_tokens = 0
        """Prompt tokens looked up at admissions (recomputes included), as the engine counts them."""
        self.num_hit_tokens = 0
        """Of those, tokens served from the cache."""
        self.clear()

    def clear(self) -> None:
        """Forget every block (the worker died); counters and the block size stay."""
        self.in_use: dict[int, int] = {}
        """Blocks running requests hold: hash -> number of requests sharing it."""
        self.unheld: OrderedDict[int, None] = OrderedDict()
        """Blocks no request holds, least recently used first; their KV blocks count as the worker's free blocks."""
        self._summary: frozenset[int] | None = None

    def hashes(self) -> frozenset[int] | None:
        """Every findable block (held or not), for the router's view; None before any request had hashes."""
        if not self.block_size:
            return None
        if self._summary is None:
            self._summary = frozenset(self.in_use).union(self.unheld)
        return self._summary

    def trim(self, free_blocks: int) -> None:
        """Evict unheld blocks, least recently used first, until they fit in `free_blocks`."""
        unheld = self.unheld
        if unheld and len(unheld) * self.blocks_per_hash > free_blocks:
            while unheld and len(unheld) * self.blocks_per_hash > free_blocks:
                unheld.popitem(last=False)
            self._summary = None

    def lookup(self, r: SimRequest) -> tuple[int, int]:
        """(leading blocks of `r` cached here, free KV blocks holding them takes); never covers its last token."""
        if not r.block_hashes:
            return 0, 0
        if r.hash_block_size != self.block_size:
            self._set_block_size(r.hash_block_size)
        limit = min(len(r.block_hashes), (r.prefill_target - 1) // r.hash_block_size)
        in_use, unheld = self.in_use, self.unheld
        num_hit = num_unheld = 0
        while num_hit < limit:
            h = r.block_hashes[num_hit]
            if h in unheld:
                num_unheld += 1
            elif h not in in_use:
                break
            num_hit += 1
        return num_hit, num_unheld * self.blocks_per_hash

    def _set_block_size(self, size: int) -> None:
        if self.block_size:
            raise ValueError(f"prompts hashed in blocks of both {size} and {self.block_size} tokens on one worker")
        if size % self.kv_block_size:
            raise ValueError(f"prefix block size {size} must be a multiple of the KV block size {self.kv_block_size}")
        self.block_size, self.blocks_per_hash = size, size // self.kv_block_size

    def claim(self, r: SimRequest, num_hit: int) -> int:
        """`r` is admitted holding its `num_hit` leading cached blocks; returns the free KV blocks that took."""
        r.cached_hashes, r.num_hashed = None, num_hit
        tokens = num_hit * r.hash_block_size
        self.num_query_tokens += r.prefill_target
        self.num_hit_tokens += tokens
        if r.first_token_s < 0:
            r.num_cached_tokens = tokens
        if not num_hit:
            return 0
        in_use, unheld = self.in_use, self.unheld
        num_taken = 0
        for h in r.block_hashes[:num_hit]:
            if h in unheld:
                del unheld[h]
                in_use[h] = 1
                num_taken += 1
            else:
                in_use[h] += 1
        r.cached_hashes = list(r.block_hashes[:num_hit])
        r.num_computed = tokens
        r.num_blocks = num_hit * self.blocks_per_hash
        return num_taken * self.blocks_per_hash

    def register(self, r: SimRequest) -> None:
        """Make the prompt blocks `r` has computed findable; one another running request already holds stays a
        private copy of `r` (both computed it at once)."""
        num_full = min(r.num_computed // r.hash_block_size, len(r.block_hashes))
        if num_full <= r.num_hashed:
            return
        in_use, unheld = self.in_use, self.unheld
        for h in r.block_hashes[r.num_hashed : num_full]:
            if h in in_use:
                continue
            unheld.pop(h, None)  # an unheld copy is redundant now: this one is as recent, and held
            in_use[h] = 1
            if r.cached_hashes is None:
                r.cached_hashes = []
            r.cached_hashes.append(h)
        r.num_hashed = num_full
        self._summary = None

    def release(self, r: SimRequest) -> int:
        """`r` lets go of its cached blocks (they stay findable); returns how many of its KV blocks others hold."""
        if r.cached_hashes is None:
            r.num_hashed = 0
            return 0
        in_use, unheld = self.in_use, self.unheld
        num_shared = 0
        for h in reversed(r.cached_hashes):  # tail first: the head of a prefix is evicted last
            count = in_use[h] - 1
            if count:
                in_use[h] = count
                num_shared += 1
            else:
                del in_use[h]
                unheld[h] = None
        r.cached_hashes, r.num_hashed = None, 0
        return num_shared * self.blocks_per_hash
