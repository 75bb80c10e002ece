"""Per-pool indexes over a `ClusterView`, kept incrementally, so a policy scores a few workers instead of all.

A pool is one (deployment, role). For its healthy workers a `PoolIndex` keeps:

- orderings: the workers sorted by (key, worker id), one per key a policy registers (`PoolIndex.ordering`). The
  first entry is the minimum by (key, worker id); walking it visits workers by ascending key;
- the worker ids in sorted order (round-robin, power-of-two and the LAPS partition go by id);
- prefix hash -> workers whose `prefix_block_hashes` hold it, per summary block size;
- adapter -> workers where it is registered, and -> workers where it costs nothing (`adapter_load_cost` 0).

A `ClusterIndex` holds the pools of one view. Whoever produces the view calls `update(worker_view)` for each worker
whose view changed: O(log n) per ordering plus the change in its hash set, instead of O(n) per request.
`best_two` is the search the policies run on it: exact, and cheap when the keys bound the scores tightly.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from router.policy import WorkerView, load_score

SortKey = Callable[[WorkerView], "float | None"]
"""A worker's key in an ordering (None leaves the worker out of it); a pure function of the view."""

_SLACK = 1e-9
"""Relative slack on bound comparisons: keys and scores add the same terms in different orders."""


class Ordering:
    """The pool's healthy workers sorted by (key, worker id); updated one worker at a time."""

    def __init__(
        self, key: SortKey, views: Iterable[WorkerView] = (), group: Callable[[WorkerView], Hashable] | None = None
    ) -> None:
        self.key = key
        self.group = group
        """Optional: what a worker's total depends on; `uniform_group` tells when all workers at a key share it."""
        self.entries: list[tuple[float, str]] = []
        """(key, worker id), ascending; read-only for callers."""
        self._keys: dict[str, float] = {}
        self._groups: dict[float, Counter] = {}
        self._group_of: dict[str, Hashable] = {}
        for view in views:
            self.add(view)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[tuple[float, str]]:
        return iter(self.entries)

    def add(self, view: WorkerView) -> None:
        key = self.key(view)
        if key is None:
            return
        if key != key:
            raise ValueError(f"ordering key of worker {view.worker_id!r} is NaN")
        self._keys[view.worker_id] = key
        bisect.insort(self.entries, (key, view.worker_id))
        if self.group is not None:
            group = self._group_of[view.worker_id] = self.group(view)
            self._groups.setdefault(key, Counter())[group] += 1

    def discard(self, worker_id: str) -> None:
        key = self._keys.pop(worker_id, None)
        if key is not None:
            del self.entries[bisect.bisect_left(self.entries, (key, worker_id))]
            if self.group is not None:
                groups = self._groups[key]
                _decrement(groups, self._group_of.pop(worker_id))
                if not groups:
                    del self._groups[key]

    def uniform_group(self, key: float) -> Hashable | None:
        """The group every worker at exactly `key` shares; None when they differ or no `group` was given."""
        groups = self._groups.get(key)
        if groups is None or len(groups) != 1:
            return None
        return next(iter(groups))

    def first(self) -> tuple[float, str] | None:
        """(key, worker id) of the smallest entry; None when empty."""
        return self.entries[0] if self.entries else None

    def count_at_most(self, key: float) -> int:
        """How many workers have a key <= `key`. O(log n)."""
        return bisect.bisect_right(self.entries, (key, "\U0010ffff"))

    def at_most(self, key: float) -> Iterator[tuple[float, str]]:
        """The entries with a key <= `key`, ascending."""
        return iter(self.entries[: self.count_at_most(key)])


class PoolIndex:
    """The indexes of one (deployment, role) pool over its healthy workers (see the module docstring)."""

    def __init__(self) -> None:
        self.views: dict[str, WorkerView] = {}
        """Worker id -> its current view, healthy workers only."""
        self._init_structures()

    def _init_structures(self) -> None:
        self._list: list[WorkerView] = []
        self._pos: dict[str, int] = {}
        self.ids: list[str] = []
        """Healthy worker ids, sorted."""
        self._orderings: dict[str, Ordering] = {"load": Ordering(load_score)}
        self._versions: dict[str, object] = {}
        self.prefix_holders: dict[int, dict[int, set[str]]] = {}
        """Summary block size -> block hash -> workers holding it."""
        self.registered: dict[str, set[str]] = {}
        """Adapter -> workers where it is registered."""
        self.resident: dict[str, set[str]] = {}
        """Adapter -> workers where serving it costs no load (`adapter_load_cost` 0)."""
        self.kv_blocks_totals: Counter[int] = Counter()
        self.kv_block_sizes: Counter[int] = Counter()
        self.summary_block_sizes: Counter[int] = Counter()
        """Block sizes of the published prefix summaries, counted per worker."""
        self.num_without_summary = 0

    def __len__(self) -> int:
        return len(self._list)

    def candidates(self) -> list[WorkerView]:
        """The healthy workers (a copy, in no particular order)."""
        return list(self._list)

    def ordering(
        self, name: str, key: SortKey, version: object = None, group: Callable[[WorkerView], Hashable] | None = None
    ) -> Ordering:
        """The ordering registered under `name`, built on first use and rebuilt when `version` changes.

        `name` and `version` together must identify `key`: e.g. the name carries the weights, and the version a
        parameter that moves now and then (the ordering then costs one O(n log n) rebuild per move).
        """
        ordering = self._orderings.get(name)
        if ordering is None or self._versions.get(name) != version:
            ordering = self._orderings[name] = Ordering(key, self._list, group)
            self._versions[name] = version
        return ordering

    def least_loaded(self) -> WorkerView | None:
        """The worker with the lowest `load_score` (ties: lowest id)."""
        first = self._orderings["load"].first()
        return None if first is None else self.views[first[1]]

    def max_kv_blocks_total(self) -> int:
        return max(self.kv_blocks_totals, default=0)

    def min_kv_blocks_total(self) -> int:
        return min(self.kv_blocks_totals, default=0)

    def max_kv_block_size(self) -> int:
        return max(self.kv_block_sizes, default=1)

    def add(self, view: WorkerView) -> None:
        wid = view.worker_id
        self._pos[wid] = len(self._list)
        self._list.append(view)
        self.views[wid] = view
        bisect.insort(self.ids, wid)
        for ordering in self._orderings.values():
            ordering.add(view)
        self.kv_blocks_totals[view.kv_blocks_total] += 1
        self.kv_block_sizes[view.kv_block_size] += 1
        self._add_summary(view)
        for adapter in view.adapters:
            self.registered.setdefault(adapter, set()).add(wid)
            if view.resident_adapters is None or adapter in view.resident_adapters:
                self.resident.setdefault(adapter, set()).add(wid)

    def remove(self, worker_id: str) -> WorkerView:
        view = self.views.pop(worker_id)
        # Swap-remove keeps `candidates` O(1) to maintain.
        i, last = self._pos.pop(worker_id), self._list.pop()
        if last.worker_id != worker_id:
            self._list[i], self._pos[last.worker_id] = last, i
        del self.ids[bisect.bisect_left(self.ids, worker_id)]
        for ordering in self._orderings.values():
            ordering.discard(worker_id)
        _decrement(self.kv_blocks_totals, view.kv_blocks_total)
        _decrement(self.kv_block_sizes, view.kv_block_size)
        self._remove_summary(view)
        for adapter in view.adapters:
            _discard(self.registered, adapter, worker_id)
            _discard(self.resident, adapter, worker_id)
        return view

    def replace(self, view: WorkerView) -> None:
        """A healthy member's new view: the cheap path for the common change (load, ledger)."""
        wid = view.worker_id
        old = self.views[wid]
        self.views[wid] = view
        self._list[self._pos[wid]] = view
        for ordering in self._orderings.values():
            ordering.discard(wid)
            ordering.add(view)
        if (old.kv_blocks_total, old.kv_block_size) != (view.kv_blocks_total, view.kv_block_size):
            _decrement(self.kv_blocks_totals, old.kv_blocks_total)
            _decrement(self.kv_block_sizes, old.kv_block_size)
            self.kv_blocks_totals[view.kv_blocks_total] += 1
            self.kv_block_sizes[view.kv_block_size] += 1
        if old.prefix_block_hashes is not view.prefix_block_hashes or _summary_block_size(old) != _summary_block_size(
            view
        ):
            self._replace_summary(old, view)
        if (old.adapters, old.resident_adapters) != (view.adapters, view.resident_adapters):
            for adapter in old.adapters:
                _discard(self.registered, adapter, wid)
                _discard(self.resident, adapter, wid)
            for adapter in view.adapters:
                self.registered.setdefault(adapter, set()).add(wid)
                if view.resident_adapters is None or adapter in view.resident_adapters:
                    self.resident.setdefault(adapter, set()).add(wid)

    def _add_summary(self, view: WorkerView) -> None:
        if view.prefix_block_hashes is None:
            self.num_without_summary += 1
            return
        block_size = _summary_block_size(view)
        self.summary_block_sizes[block_size] += 1
        holders = self.prefix_holders.setdefault(block_size, {})
        for block_hash in view.prefix_block_hashes:
            holders.setdefault(block_hash, set()).add(view.worker_id)

    def _remove_summary(self, view: WorkerView) -> None:
        if view.prefix_block_hashes is None:
            self.num_without_summary -= 1
            return
        block_size = _summary_block_size(view)
        _decrement(self.summary_block_sizes, block_size)
        holders = self.prefix_holders[block_size]
        for block_hash in view.prefix_block_hashes:
            _discard(holders, block_hash, view.worker_id)

    def _replace_summary(self, old: WorkerView, new: WorkerView) -> None:
        if (
            old.prefix_block_hashes is None
            or new.prefix_block_hashes is None
            or (_summary_block_size(old) != _summary_block_size(new))
        ):
            self._remove_summary(old)
            self._add_summary(new)
            return
        # Same block size: touch only the hashes that came or went (a cache changes by a few blocks a step).
        holders = self.prefix_holders[_summary_block_size(new)]
        wid = new.worker_id
        for block_hash in old.prefix_block_hashes - new.prefix_block_hashes:
            _discard(holders, block_hash, wid)
        for block_hash in new.prefix_block_hashes - old.prefix_block_hashes:
            holders.setdefault(block_hash, set()).add(wid)


class ClusterIndex:
    """The `PoolIndex` of every (deployment, role) of one view, plus each deployment's roles (healthy or not)."""

    def __init__(self, views: Iterable[WorkerView] = ()) -> None:
        self._pools: dict[tuple[str, str], PoolIndex] = {}
        self._members: dict[str, WorkerView] = {}
        """Worker id -> its latest view, healthy or not."""
        self._roles: dict[str, Counter[str]] = {}
        for view in views:
            self.update(view)

    def pool(self, deployment: str, role: str) -> PoolIndex | None:
        return self._pools.get((deployment, role))

    def roles(self, deployment: str) -> set[str]:
        return set(self._roles.get(deployment, ()))

    def update(self, view: WorkerView) -> None:
        """`view` is a worker's current view (new, changed, or turned (un)healthy)."""
        old = self._members.get(view.worker_id)
        self._members[view.worker_id] = view
        if old is view:
            return
        same_pool = old is not None and (old.deployment, old.role) == (view.deployment, view.role)
        if same_pool and old.is_healthy and view.is_healthy:
            self._pools[(view.deployment, view.role)].replace(view)
            return
        if old is not None:
            self._forget(old)
        self._roles.setdefault(view.deployment, Counter())[view.role] += 1
        if view.is_healthy:
            self._pools.setdefault((view.deployment, view.role), PoolIndex()).add(view)

    def remove(self, worker_id: str) -> None:
        """The worker left the view."""
        old = self._members.pop(worker_id, None)
        if old is not None:
            self._forget(old)

    def _forget(self, old: WorkerView) -> None:
        _decrement(self._roles[old.deployment], old.role)
        if old.is_healthy:
            self._pools[(old.deployment, old.role)].remove(old.worker_id)


@dataclass(kw_only=True, frozen=True)
class BoundedOrdering:
    """An ordering with the bound a search may prune on."""

    ordering: Ordering
    """Workers by ascending key."""
    offset: float
    """Every worker of `ordering` that is not a special scores at least its key plus this."""


def best_two(
    total: Callable[[WorkerView], float],
    views: Mapping[str, WorkerView],
    specials: Iterable[str],
    orderings: Sequence[BoundedOrdering],
    signature: Callable[[WorkerView], Hashable | None] | None = None,
) -> list[WorkerView]:
    """The workers scored to find the pool's best two by (total, worker id), as a full scan would rank them.

    Contract: every pool worker is in `specials` or in one of `orderings`, and each ordering's bound holds for its
    non-special workers (score >= key + offset). Specials are scored first; then the orderings are walked merged
    by bound, scoring each worker, until the next bound exceeds the second-best total. An unscored worker's score
    is at least its bound, which is at least that one: it cannot rank in the top two, so the full scan's winner
    and runner-up are both scored. Cost: the specials plus the workers whose bound is below the runner-up.

    `signature` (optional) maps a non-special worker to a value that determines its total (None: it does not):
    a worker whose signature was scored already has that total, so it is scored only if it would enter the top
    two. That spares scoring a crowd of identical workers (idle ones, tied at one bound) one by one.
    """
    scored: dict[str, float] = {}
    known: dict[Hashable, float] = {}
    top: list[tuple[float, str]] = []

    def visit(worker_id: str) -> float:
        value = scored[worker_id] = total(views[worker_id])
        bisect.insort(top, (value, worker_id))
        del top[2:]
        return value

    for worker_id in specials:
        if worker_id not in scored:
            visit(worker_id)
    cursors = [0] * len(orderings)
    while True:
        step = _next_bound(orderings, cursors)
        if step is None:
            break
        bound, worker_id, i = step
        if len(top) == 2 and bound > top[1][0] + _SLACK * max(1.0, abs(top[1][0])):
            break
        cursors[i] += 1
        if worker_id in scored:
            continue
        sig = signature(views[worker_id]) if signature is not None else None
        if sig is None:
            visit(worker_id)
        elif sig not in known:
            known[sig] = visit(worker_id)
        elif len(top) < 2 or (known[sig], worker_id) < top[1]:
            visit(worker_id)
        else:
            # Everyone after it at this key has a larger id; if they all share its signature, none can enter.
            ordering = orderings[i].ordering
            key = ordering.entries[cursors[i] - 1][0]
            if ordering.uniform_group(key) == sig:
                cursors[i] = max(cursors[i], ordering.count_at_most(key))
    return [views[wid] for wid in scored]


def _next_bound(orderings: Sequence[BoundedOrdering], cursors: list[int]) -> tuple[float, str, int] | None:
    """The smallest (bound, worker id) at the orderings' cursors, and which ordering it came from."""
    best = None
    for i, b in enumerate(orderings):
        entries = b.ordering.entries
        if cursors[i] < len(entries):
            key, worker_id = entries[cursors[i]]
            candidate = (key + b.offset, worker_id, i)
            if best is None or candidate < best:
                best = candidate
    return best


def _summary_block_size(view: WorkerView) -> int:
    return view.prefix_block_size or view.kv_block_size


def _decrement(counter: Counter, key: object) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _discard(sets: dict, key: object, worker_id: str) -> None:
    members = sets.get(key)
    if members is not None:
        members.discard(worker_id)
        if not members:
            del sets[key]
