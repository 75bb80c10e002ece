"""Discrete-event cluster simulator driving the real policies.

Entry point: `sim.run(config: SimConfig) -> SimResult` (or `sim.Simulator(config).run()`); configs load from YAML
with `sim.load_config(path)`. Names resolve lazily so `import sim.cost` stays light.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "run": "sim.simulator",
    "Simulator": "sim.simulator",
    "SimResult": "sim.results",
    "SimConfig": "sim.config",
    "PoolConfig": "sim.config",
    "TraceConfig": "sim.config",
    "SloConfig": "sim.config",
    "load_config": "sim.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sim' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
