"""Decode-time rebalancing for the simulator, Llumnix-shaped: move decoding requests from the most to the least
loaded worker of a pool.

Helper M's `control_plane/migration_policy.py` (the production policy) did not exist when this was written, so
this is a small pure policy with the same inputs (per-worker load, per-request size) and output (a list of
source -> destination moves). Swap it for the production one when that lands.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(kw_only=True, frozen=True)
class WorkerLoad:
    """One worker as the rebalancer sees it."""

    worker_id: str
    """The worker."""
    used_fraction: float
    """KV blocks in use (and reserved) over the pool size."""
    queued_fraction: float
    """KV blocks its queued requests will need, over the pool size."""
    free_blocks: int
    """Blocks a migration could land in."""

    @property
    def load(self) -> float:
        return self.used_fraction + self.queued_fraction


@dataclass(kw_only=True, frozen=True)
class MigrationMove:
    """Move one decoding request from `source_id` to `destination_id`."""

    source_id: str
    destination_id: str
    gap: float
    """Load difference that triggered it."""


def plan_rebalance(loads: Sequence[WorkerLoad], *, min_gap: float, max_moves: int) -> list[MigrationMove]:
    """Pair the most loaded workers with the least loaded ones while their load gap is at least `min_gap`.

    Each worker appears in at most one move per call (as source or destination), so a tick never piles
    migrations onto one destination. Ties break by worker id, so the plan is deterministic.
    """
    ordered = sorted(loads, key=lambda w: (w.load, w.worker_id))
    moves: list[MigrationMove] = []
    lo, hi = 0, len(ordered) - 1
    while lo < hi and len(moves) < max_moves:
        source, destination = ordered[hi], ordered[lo]
        gap = source.load - destination.load
        if gap < min_gap:
            break
        moves.append(MigrationMove(source_id=source.worker_id, destination_id=destination.worker_id, gap=gap))
        logger.debug(
            "migration planned source=%s destination=%s gap=%.3f", source.worker_id, destination.worker_id, gap
        )
        lo, hi = lo + 1, hi - 1
    return moves


def pick_request(candidates: Sequence[tuple[str, int, int]], *, free_blocks: int, block_size: int) -> str | None:
    """From (request_id, tokens held, tokens left to generate): the cheapest to copy that fits and is worth it.

    A request with fewer than `block_size` tokens left would finish before the copy pays off.
    """
    best: tuple[int, str] | None = None
    for request_id, held, remaining in candidates:
        if remaining < block_size or -(-(held + remaining // 4 + 1) // block_size) > free_blocks:
            continue
        if best is None or (held, request_id) < best:
            best = (held, request_id)
    return None if best is None else best[1]
