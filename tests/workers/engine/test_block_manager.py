"""KV block bookkeeping: fixed pool, refcounts, prefix caching by chained hash, LRU eviction."""

from __future__ import annotations

import subprocess
import sys

import pytest

from workers.engine.block_manager import (
    BlockPool,
    KVCacheManager,
    block_key,
    prefix_block_hashes,
    stable_block_hash,
)
from workers.engine.request import Request
from workers.engine.sampling_params import SamplingParams

BS = 4


def _req(rid: str, tokens: list[int], lora_id: int = 0) -> Request:
    return Request(request_id=rid, prompt_token_ids=tokens, sampling_params=SamplingParams(), lora_id=lora_id)


def _kv(num_blocks: int = 8, *, caching: bool = True) -> KVCacheManager:
    return KVCacheManager(num_blocks=num_blocks, block_size=BS, enable_prefix_caching=caching)


def _compute_all(kv: KVCacheManager, req: Request) -> list[int]:
    """Allocate and 'compute' the whole prompt in one step, as the scheduler would."""
    prefix = kv.find_cached_prefix(req)
    assert kv.allocate(req, req.num_tokens, prefix)
    req.num_computed_tokens = req.num_tokens
    kv.cache_computed_blocks(req)
    return kv.get_block_ids(req.request_id)


def test_hash_is_chained_over_parent_tokens_and_adapter():
    first = hash(block_key(None, [1, 2, 3, 4], 0))
    assert first == hash(block_key(None, (1, 2, 3, 4), 0))
    assert hash(block_key(first, [5, 6, 7, 8], 0)) != hash(block_key(None, [5, 6, 7, 8], 0))
    assert hash(block_key(None, [1, 2, 3, 4], 1)) != first


def test_pool_rejects_empty_pool():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)


def test_allocate_covers_tokens_and_free_restores_the_pool():
    kv = _kv(8)
    req = _req("a", list(range(9)))
    assert kv.allocate(req, 9)
    assert len(kv.get_block_ids("a")) == 3  # ceil(9 / 4)
    assert (kv.num_free_blocks, kv.num_used_blocks) == (5, 3)
    assert kv.allocate(req, 12)  # still within the third block
    assert len(kv.get_block_ids("a")) == 3
    assert kv.allocate(req, 13)
    assert len(kv.get_block_ids("a")) == 4
    kv.free("a")
    assert (kv.num_free_blocks, kv.num_used_blocks) == (8, 0)
    assert kv.get_block_ids("a") == []


def test_allocate_when_short_changes_nothing():
    kv = _kv(4)
    assert kv.allocate(_req("a", [1] * 12), 12)
    big = _req("b", [2] * 8)
    assert not kv.allocate(big, 8)
    assert kv.get_block_ids("b") == []
    assert kv.num_free_blocks == 1


def test_uncomputed_blocks_are_never_found_by_prefix_lookup():
    kv = _kv()
    a = _req("a", list(range(12)))
    assert kv.allocate(a, 12)  # allocated, but no step has computed them yet
    assert kv.find_cached_prefix(_req("b", [*range(12), 99])) == []
    a.num_computed_tokens = 6  # one full block computed, the second half done
    kv.cache_computed_blocks(a)
    assert kv.find_cached_prefix(_req("b", [*range(12), 99])) == kv.get_block_ids("a")[:1]


def test_prefix_hit_shares_blocks_and_counts_references():
    kv = _kv()
    a_blocks = _compute_all(kv, _req("a", list(range(12))))
    b = _req("b", [*range(8), 50, 51, 52, 53, 54])
    prefix = kv.find_cached_prefix(b)
    assert prefix == a_blocks[:2]
    assert kv.allocate(b, b.num_tokens, prefix)
    b_blocks = kv.get_block_ids("b")
    assert b_blocks[:2] == a_blocks[:2] and len(b_blocks) == 4
    assert [kv.ref_count(x) for x in a_blocks] == [2, 2, 1]
    assert not set(b_blocks[2:]) & set(a_blocks)
    kv.free("a")
    assert [kv.ref_count(x) for x in a_blocks] == [1, 1, 0]
    kv.free("b")
    assert kv.num_free_blocks == kv.num_blocks


def test_prefix_hit_never_covers_the_whole_prompt():
    kv = _kv()
    a_blocks = _compute_all(kv, _req("a", list(range(8))))
    # An identical 8-token prompt may reuse one block only: the last token must run to give logits.
    assert kv.find_cached_prefix(_req("b", list(range(8)))) == a_blocks[:1]
    assert kv.find_cached_prefix(_req("c", list(range(9)))) == a_blocks[:2]


def test_lora_id_and_earlier_blocks_are_part_of_the_key():
    kv = _kv()
    _compute_all(kv, _req("a", [*range(8), 0], lora_id=1))
    assert kv.find_cached_prefix(_req("b", [*range(8), 0], lora_id=2)) == []
    assert kv.find_cached_prefix(_req("c", [*range(8), 0], lora_id=0)) == []
    assert len(kv.find_cached_prefix(_req("d", [*range(8), 0], lora_id=1))) == 2
    # Same second block after a different first block: no hit, the chain differs.
    assert kv.find_cached_prefix(_req("e", [9, 9, 9, 9, 4, 5, 6, 7, 0], lora_id=1)) == []


def test_disabled_prefix_caching_never_hits():
    kv = _kv(caching=False)
    _compute_all(kv, _req("a", list(range(9))))
    assert kv.find_cached_prefix(_req("b", list(range(9)))) == []
    assert kv.num_cached_blocks == 0


def test_freed_cached_blocks_stay_findable_until_reused_lru_order():
    kv = _kv(6)
    blocks = {}
    for rid, base in (("a", 0), ("b", 100), ("c", 200)):
        blocks[rid] = _compute_all(kv, _req(rid, list(range(base, base + 8))))
        kv.free(rid)  # a freed first, c last
    assert kv.num_free_blocks == 6 and kv.num_cached_blocks == 6
    assert kv.find_cached_prefix(_req("a2", [*range(8), 1])) == blocks["a"]
    # Two fresh blocks evict the least recently freed: a's.
    assert kv.allocate(_req("x", [7] * 8), 8)
    assert set(kv.get_block_ids("x")) == set(blocks["a"])
    assert kv.num_evictions == 2
    assert kv.find_cached_prefix(_req("a3", [*range(8), 1])) == []
    assert kv.find_cached_prefix(_req("b2", [*range(100, 108), 1])) == blocks["b"]
    assert kv.find_cached_prefix(_req("c2", [*range(200, 208), 1])) == blocks["c"]


def test_a_prefix_hit_refreshes_lru_position():
    kv = _kv(4)
    a_blocks = _compute_all(kv, _req("a", list(range(8))))
    kv.free("a")
    b_blocks = _compute_all(kv, _req("b", list(range(100, 108))))
    kv.free("b")
    a2 = _req("a2", [*range(8), 1])
    assert kv.allocate(a2, 8, kv.find_cached_prefix(a2))  # revive a's blocks, then free them again
    kv.free("a2")
    assert kv.allocate(_req("x", [7] * 8), 8)
    assert set(kv.get_block_ids("x")) == set(b_blocks)  # b was freed longer ago now
    assert kv.find_cached_prefix(_req("a3", [*range(8), 1])) == a_blocks


def test_free_releases_tail_first_and_uncached_blocks_are_reused_first():
    kv = _kv(4)
    a_blocks = _compute_all(kv, _req("a", list(range(10))))  # 2 full cached blocks + 1 partial
    kv.free("a")
    assert kv.allocate(_req("x", [7]), 1)
    assert kv.get_block_ids("x") == [a_blocks[2]]  # the partial block: reusing it evicts nothing
    assert kv.num_evictions == 0
    assert kv.allocate(_req("y", [7] * 8), 8)
    # Then the never-used block, then a's tail block; a's first block survives.
    assert a_blocks[0] not in kv.get_block_ids("y") and a_blocks[1] in kv.get_block_ids("y")
    assert kv.find_cached_prefix(_req("a2", list(range(10)))) == a_blocks[:1]


def test_duplicate_content_computed_twice_stays_private():
    kv = _kv()
    a, b = _req("a", list(range(5))), _req("b", list(range(5)))
    assert kv.allocate(a, 5) and kv.allocate(b, 5)  # both admitted before either computed
    for r in (a, b):
        r.num_computed_tokens = 5
        kv.cache_computed_blocks(r)
    assert kv.num_cached_blocks == 1
    assert kv.find_cached_prefix(_req("c", list(range(6)))) == kv.get_block_ids("a")[:1]
    kv.free("a")
    kv.free("b")
    assert kv.num_free_blocks == kv.num_blocks


def test_blocks_freed_by_counts_only_unshared_blocks():
    kv = _kv()
    _compute_all(kv, _req("a", list(range(12))))
    b = _req("b", [*range(8), 1, 2])
    assert kv.allocate(b, b.num_tokens, kv.find_cached_prefix(b))  # shares a's first 2 blocks
    assert kv.num_blocks_freed_by(["b"]) == 1
    assert kv.num_blocks_freed_by(["a"]) == 1
    assert kv.num_blocks_freed_by(["a", "b"]) == 4
    assert kv.num_blocks_freed_by(["a", "b"], exclude=kv.get_block_ids("a")[:2]) == 2


def test_revived_cached_blocks_count_against_free_blocks():
    kv = _kv(3)
    _compute_all(kv, _req("a", list(range(8))))
    kv.free("a")
    b = _req("b", [*range(8), 1, 2, 3, 4, 5])  # 2 cached + 2 fresh blocks > 3 in the pool
    prefix = kv.find_cached_prefix(b)
    assert len(prefix) == 2
    assert kv.num_blocks_to_allocate(b, b.num_tokens, prefix) == 4
    assert not kv.allocate(b, b.num_tokens, prefix)
    assert kv.num_free_blocks == 3 and kv.num_cached_blocks == 2


# ---- process-independent summaries for the router ------------------------------------------------------------


def test_stable_hash_is_chained_and_names_the_adapter():
    first = stable_block_hash(None, [1, 2, 3, 4], None)
    assert first == stable_block_hash(None, (1, 2, 3, 4), None)
    assert stable_block_hash(first, [5, 6, 7, 8], None) != stable_block_hash(None, [5, 6, 7, 8], None)
    assert stable_block_hash(None, [1, 2, 3, 4], "sql") != first
    assert stable_block_hash(None, [1, 2, 3, 4], "") != first
    assert 0 <= first < 2**64
    assert prefix_block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], BS) == [first, stable_block_hash(first, [5, 6, 7, 8], None)]
    assert prefix_block_hashes(list(range(9)), BS, max_blocks=1) == prefix_block_hashes(list(range(4)), BS)


def test_stable_hash_is_the_same_in_another_process():
    code = "from workers.engine.block_manager import prefix_block_hashes as p; print(p(list(range(12)), 4, 'a'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(prefix_block_hashes(list(range(12)), 4, "a"))


def test_cached_block_hashes_lists_what_a_lookup_can_reach_most_recent_first():
    kv = _kv(8)
    tokens_a, tokens_b = list(range(100, 108)), list(range(200, 208))
    _compute_all(kv, _req("a", [*tokens_a, 1]))
    _compute_all(kv, _req("b", [*tokens_b, 1]))
    hashes_a, hashes_b = prefix_block_hashes(tokens_a, BS), prefix_block_hashes(tokens_b, BS)
    assert set(kv.cached_block_hashes(100)) == {*hashes_a, *hashes_b}
    kv.free("a")  # a's blocks are now evictable; b's are held, so they come first
    assert kv.cached_block_hashes(2) == hashes_b
    kv.free("b")  # freed tail first: b's first block is now the most recently freed
    assert kv.cached_block_hashes(1) == hashes_b[:1]
    assert kv.cached_block_hashes(0) == []


def test_cached_block_hashes_skips_broken_chains_and_unnamed_adapters():
    kv = _kv(3)
    _compute_all(kv, _req("a", list(range(9))))  # 3 blocks, two of them full and cached
    kv.free("a")  # tail first: block 0 is the most recently freed, so block 1 (its child) is evicted before it
    kv.allocate(_req("x", [7] * 4), 4)  # takes the uncached third block
    kv.allocate(_req("y", [7] * 4), 4)  # evicts the child
    assert kv.cached_block_hashes(10) == prefix_block_hashes(list(range(4)), BS)
    lora = _kv(4)
    _compute_all(lora, _req("l", list(range(5)), lora_id=3))
    assert lora.cached_block_hashes(10) == []
    assert lora.cached_block_hashes(10, {3: "sql"}) == prefix_block_hashes(list(range(4)), BS, "sql")
    assert _kv(4, caching=False).cached_block_hashes(10) == []
    with pytest.raises(ValueError, match="limit"):
        kv.cached_block_hashes(-1)


def test_cached_block_hashes_handles_long_chains_without_recursion():
    kv = KVCacheManager(num_blocks=3000, block_size=1, enable_prefix_caching=True)
    _compute_all(kv, _req("long", list(range(2501))))
    assert kv.cached_block_hashes(5000)[-1] == prefix_block_hashes(list(range(2501)), 1)[-1]
