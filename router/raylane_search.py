"""The `raylane` policy's decode and mixed pools scored on a small candidate set, with a full scan's decisions.

Why it is exact. On a decode or mixed pool a worker's total is

    w_kv * kv + w_load * load + w_ad * adapter (+ w_px * prefix on mixed pools)

and each term is bounded below by something the pool index keeps:

- `load` is `load_score(w)` and `backlog` is `num_pending_prefill_tokens / unit`: request-independent, they sit in
  the ordering key unchanged (the key is rebuilt when the unit, the learned LAPS threshold, moves).
- `kv = (untracked + peak_with) / T` (`predicted_peak_kv_blocks`, T = `kv_blocks_total`). The forecast peak with
  the request added is at least the padded tokens held now plus the request's padded prompt, so
  `untracked + peak_with >= kv_blocks_used + ceil(H / bs)` (H prompt tokens, bs the block size): the key holds
  `w_kv * kv_blocks_used / T` and the request adds `w_kv * ceil(H / bs_max) / T_max`. A worker with no tracked
  request holds exactly `kv_blocks_used + ceil((H + R) / bs)` (R the predicted output): for those, kept in their own
  ordering, the bound uses H + R and is tight in a pool of equal workers. Workers reporting no pool size score 0,
  so a pool with one drops the request part of the bound.
- `adapter` is 1 where the adapter is not registered, at least 0.5 where it is registered but not in a slot, and 0
  where it is in a slot: the last are scored as specials (adapter -> workers index), the others get the least
  value their class allows.
- `prefix` is 1 on a worker that does not hold the prompt's first block (no match reaches `min_match_blocks`) or
  whose load is more than `max_load_gap` above the pool's least; the holders within the gap (prefix hash ->
  workers index) are scored as specials. A prompt with no full block, or a worker without a summary when the
  request has no prompt, scores 0: the bound takes the least value of the classes present.

So every worker that is not a special scores at least its key plus a per-ordering offset, and `best_two` scores
workers by ascending bound until the next bound exceeds the runner-up's total: the full scan's winner and
runner-up (ties by worker id) are both scored, so the decision and its deciding term are the full scan's. The
cost is the specials plus the workers whose bound lies below the runner-up. Prefill pools (LAPS partition,
backlog per learned threshold) and any term this module does not know fall back to the full scan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from router.kv_forecast import predicted_remaining_tokens
from router.laps import LapsPrefillScorer
from router.policy import (
    AdapterAffinityScorer,
    ClusterView,
    LoadScorer,
    PredictedKvScorer,
    PrefillBacklogScorer,
    RouteRequest,
    WeightedTerm,
    WorkerView,
    load_score,
)
from router.pool_index import BoundedOrdering, Ordering, PoolIndex, best_two
from router.prefix_affinity import PrefixAffinityScorer

_ROLES = ("decode", "mixed")


@dataclass(kw_only=True, frozen=True)
class _RoleWeights:
    """The weights of the terms that apply to one pool role (0 for an absent term)."""

    kv: float = 0.0
    use_p90: bool = False
    load: float = 0.0
    backlog: float = 0.0
    backlog_unit: Callable[[], float] | None = None
    adapter: float = 0.0
    prefix: float = 0.0


class RaylaneSearch:
    """`CandidateSearch` for a `WeightedPolicy` built of the terms above (see the module docstring).

    Pools smaller than `min_pool_size` are scanned: below it a scan costs less than the search's bookkeeping.
    """

    def __init__(
        self, terms: Sequence[WeightedTerm], *, prefix: PrefixAffinityScorer | None, min_pool_size: int = 16
    ) -> None:
        if min_pool_size < 0:
            raise ValueError(f"min_pool_size must be >= 0, got {min_pool_size}")
        self.prefix = prefix
        self.min_pool_size = min_pool_size
        self._weights = {role: _weights_for(terms, role, prefix) for role in _ROLES}

    def select(
        self, request: RouteRequest, view: ClusterView, role: str, total: Callable[[WorkerView], float]
    ) -> Sequence[WorkerView] | None:
        weights = self._weights.get(role)
        if weights is None or view.index is None:
            return None
        pool = view.index.pool(request.deployment, role)
        if pool is None or len(pool) < max(self.min_pool_size, 1):
            return None
        specials: set[str] = set()
        generic = self._adapter_floor(request, pool, weights, specials)
        generic += self._prefix_floor(request, pool, weights, specials)
        idle, busy = _orderings(pool, weights)
        kv_busy, kv_idle = _kv_offsets(request, pool, weights)
        orderings = (
            BoundedOrdering(ordering=idle, offset=generic + kv_idle),
            BoundedOrdering(ordering=busy, offset=generic + kv_busy),
        )
        return best_two(total, pool.views, sorted(specials), orderings, _idle_signature)

    def _adapter_floor(self, request: RouteRequest, pool: PoolIndex, w: _RoleWeights, specials: set[str]) -> float:
        if request.adapter is None or w.adapter == 0:
            return 0.0
        resident = pool.resident.get(request.adapter, set())
        registered = pool.registered.get(request.adapter, set())
        if 4 * len(resident) > len(pool):
            return 0.0  # most workers hold it: bound everyone by 0 rather than score most of the pool
        specials.update(resident)
        return w.adapter * (0.5 if len(registered) > len(resident) else 1.0)

    def _prefix_floor(self, request: RouteRequest, pool: PoolIndex, w: _RoleWeights, specials: set[str]) -> float:
        if w.prefix == 0 or self.prefix is None:
            return 0.0
        floors = []
        if pool.num_without_summary:
            floors.append(1.0 if (request.prompt_token_ids or request.prompt_hashes) else 0.0)
        least = pool.least_loaded()
        gap_limit = load_score(least) + self.prefix.config.max_load_gap if least is not None else 0.0
        gap_limit += 1e-9 * max(1.0, abs(gap_limit))  # the scorer compares a difference; keep every holder it may
        load = pool.ordering("load", load_score)
        for block_size in pool.summary_block_sizes:
            hashes = self.prefix.request_hashes(request, block_size)
            if not hashes:
                floors.append(0.0)
                continue
            floors.append(1.0)
            holders = pool.prefix_holders.get(block_size, {}).get(hashes[0], set())
            if len(holders) <= load.count_at_most(gap_limit):
                specials.update(wid for wid in holders if load_score(pool.views[wid]) <= gap_limit)
            else:
                specials.update(wid for _, wid in load.at_most(gap_limit) if wid in holders)
        return w.prefix * min(floors, default=0.0)


def _weights_for(terms: Sequence[WeightedTerm], role: str, prefix: PrefixAffinityScorer | None) -> _RoleWeights | None:
    """The role's weights, or None when a term has no bound here (the policy then scans that pool)."""
    fields: dict = {"load": 0.0}
    for term in terms:
        if term.roles is not None and role not in term.roles:
            continue
        scorer = term.scorer
        if isinstance(scorer, LoadScorer):
            fields["load"] = float(fields["load"]) + term.weight
        elif isinstance(scorer, PredictedKvScorer) and "kv" not in fields:
            fields.update(kv=term.weight, use_p90=scorer.use_p90)
        elif isinstance(scorer, PrefillBacklogScorer) and "backlog" not in fields:
            fields.update(backlog=term.weight, backlog_unit=scorer.unit_tokens)
        elif isinstance(scorer, AdapterAffinityScorer) and "adapter" not in fields:
            fields["adapter"] = term.weight
        elif (
            scorer is prefix
            and prefix is not None
            and prefix.pool is not None
            and prefix.summaries is None
            and prefix.prompt_tokens is None
        ):
            fields["prefix"] = term.weight
        elif (isinstance(scorer, LapsPrefillScorer) and role not in scorer.partition_roles) or term.weight == 0:
            continue  # scores 0 on this pool (LAPS partitions prefill pools only), or counts for nothing
        else:
            return None
    return _RoleWeights(**fields)


def _orderings(pool: PoolIndex, w: _RoleWeights) -> tuple[Ordering, Ordering]:
    name = f"raylane:{w.kv!r}:{w.load!r}:{w.backlog!r}"
    # The backlog's unit (the LAPS threshold) moves now and then: the key fixes the value it was built with.
    unit = max(float(w.backlog_unit()), 1.0) if w.backlog_unit is not None else 1.0

    def key(view: WorkerView) -> float:
        kv = view.kv_blocks_used / view.kv_blocks_total if view.kv_blocks_total > 0 else 0.0
        return w.kv * kv + w.load * load_score(view) + w.backlog * (view.num_pending_prefill_tokens / unit)

    def idle_key(view: WorkerView) -> float | None:
        return key(view) if _is_idle(view) else None

    def busy_key(view: WorkerView) -> float | None:
        return None if _is_idle(view) else key(view)

    return (
        pool.ordering(name + ":idle", idle_key, unit, group=_idle_signature),
        pool.ordering(name + ":busy", busy_key, unit),
    )


def _idle_signature(view: WorkerView) -> tuple | None:
    """What an idle non-special worker's total depends on (every term's inputs but the empty ledger); None if busy.

    Its prefix term is its class's generic value (specials hold every worker the prompt could hit), so only
    whether it publishes a summary, and at what block size, matters.
    """
    if not _is_idle(view):
        return None
    return (
        view.kv_blocks_used,
        view.kv_blocks_total,
        view.kv_block_size,
        load_score(view),
        view.num_pending_prefill_tokens,
        view.adapters,
        view.resident_adapters,
        view.num_adapter_slots,
        view.prefix_block_hashes is None,
        view.prefix_block_size,
    )


def _is_idle(view: WorkerView) -> bool:
    """No request tracked there: its KV forecast is the request alone."""
    return view.kv_ledger is None or view.kv_ledger.num_requests == 0


def _kv_offsets(request: RouteRequest, pool: PoolIndex, w: _RoleWeights) -> tuple[float, float]:
    """(busy, idle): the least `w_kv * kv` the request itself adds on a worker, beyond `kv_blocks_used / T`."""
    prompt = request.num_prompt_tokens_estimate
    if w.kv == 0 or prompt < 0 or pool.min_kv_blocks_total() <= 0:
        return 0.0, 0.0
    remaining = predicted_remaining_tokens(
        num_generated=0,
        max_tokens=request.max_tokens,
        p50=request.predicted_output_p50,
        p90=request.predicted_output_p90,
        use_p90=w.use_p90,
    )
    block_size = max(pool.max_kv_block_size(), 1)
    per_block = w.kv / pool.max_kv_blocks_total()
    return per_block * math.ceil(prompt / block_size), per_block * math.ceil((prompt + remaining) / block_size)
