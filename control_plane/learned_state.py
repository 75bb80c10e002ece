"""What routers learn, kept in Redis so a new or restarted router starts where the last one left off.

Layout (under the state store's prefix):
  learned:<name>   HASH   router id -> {"saved_at": unix seconds, "data": <snapshot>} JSON

Each router replica writes its own field, so replicas never overwrite one another; a starting router
loads the freshest snapshot. This is not part of the versioned control state: saving it does not bump
`version`, so routers do not re-pull the routing table because another router learned something.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from control_plane.state import StateStore

logger = logging.getLogger(__name__)

MAX_SNAPSHOTS = 16
"""Snapshots kept per name (one per router id); the oldest go first, so restarted routers do not pile up."""


def _key(store: StateStore, name: str) -> str:
    if not name or ":" in name:
        raise ValueError(f"learned-state name must be non-empty and contain no ':', got {name!r}")
    return f"{store.prefix}learned:{name}"


def save_learned(store: StateStore, name: str, router_id: str, data: dict[str, Any]) -> int:
    """Store `router_id`'s snapshot of `name`; returns its size in bytes."""
    if not router_id:
        raise ValueError("router_id must be non-empty")
    payload = json.dumps({"saved_at": time.time(), "data": data}, separators=(",", ":"))
    key = _key(store, name)
    store.client.hset(key, router_id, payload)
    if store.client.hlen(key) > MAX_SNAPSHOTS:
        _prune(store, key)
    logger.info("learned state saved name=%s router=%s bytes=%d", name, router_id, len(payload))
    return len(payload)


def _prune(store: StateStore, key: str) -> None:
    raw = store.client.hgetall(key)
    entries = sorted(_entries(raw, key), key=lambda e: e[1], reverse=True)
    kept = {router_id for router_id, _, _ in entries[:MAX_SNAPSHOTS]}
    stale = [router_id for router_id in raw if router_id not in kept]  # unreadable ones too
    if stale:
        store.client.hdel(key, *stale)


def load_learned(store: StateStore, name: str) -> dict[str, Any] | None:
    """The freshest snapshot of `name` any router saved, or None. Unreadable entries are skipped, not fatal."""
    key = _key(store, name)
    entries = _entries(store.client.hgetall(key), key)
    return max(entries, key=lambda e: e[1])[2] if entries else None


def _entries(raw: dict[str, str], key: str) -> list[tuple[str, float, dict[str, Any]]]:
    entries = []
    for router_id, payload in raw.items():
        try:
            entry = json.loads(payload)
            entries.append((router_id, float(entry["saved_at"]), entry["data"]))
        except (ValueError, KeyError, TypeError):
            logger.warning("learned state unreadable key=%s router=%s; skipped", key, router_id)
    return entries
