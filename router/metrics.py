"""Prometheus metrics of a router process, named after vLLM's (`vllm:x` -> `raylane_x`).

Every metric lives in `REGISTRY`, one per process; `render()` is what `/metrics` serves.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)
"""This process's metrics (not prometheus_client's global registry, so tests can build their own)."""


def render(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The Prometheus text exposition of `registry` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
