"""Fault injection for the chaos tests: delay or fail named points in production code. Off unless enabled.

`RAYLANE_FAULTS` names a JSON plan file; it is read once, at import, so a process started without it pays one
`None` check per hook and nothing else. When it is set, each hook reads the plan again whenever the file changed,
so a test can turn a point on and off in actors that are already running (Ray actors inherit the variable through
their creator's `runtime_env`). This is the one environment variable read outside `control_plane/config.py`: it
lives here, the lowest layer, because routers, workers and the control plane all carry hooks.

A plan maps point names (`POINTS`) to a `Fault`:
    {"pd_handoff": {"delay_s": 2.0}, "state_write": {"fail": true}}
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ENV_VAR = "RAYLANE_FAULTS"
POINTS = {
    "pd_handoff": "the router holds a prefilled request before handing its KV to the decode worker",
    "state_write": "the state store is about to commit a write to Redis",
    "worker_chunk": "a worker is about to hand one token chunk to its stream (paces streams)",
}
"""Every hook point in production code, and where it sits."""


class InjectedFault(RuntimeError):
    """The default error a failing point raises; a hook passes its own type to look like the real failure."""


@dataclass(kw_only=True, frozen=True)
class Fault:
    """What one point does when it is hit."""

    delay_s: float = 0.0
    """Seconds to wait (asleep, not spinning) before going on or failing."""
    fail: bool = False
    """Raise the hook's error after the delay."""

    def __post_init__(self) -> None:
        if isinstance(self.delay_s, bool) or not isinstance(self.delay_s, int | float) or not 0 <= self.delay_s < 3600:
            raise ValueError(f"delay_s must be a number of seconds in [0, 3600), got {self.delay_s!r}")
        if not isinstance(self.fail, bool):
            raise ValueError(f"fail must be true or false, got {self.fail!r}")


def parse_plan(data: object) -> dict[str, Fault]:
    """The plan in `data` (a decoded JSON object), checked: unknown points and fields are errors, not no-ops."""
    if not isinstance(data, dict):
        raise ValueError(f"a fault plan must be a JSON object of point -> fault, got {type(data).__name__}")
    plan = {}
    for point, fields in data.items():
        if point not in POINTS:
            raise ValueError(f"unknown fault point {point!r}; known: {', '.join(sorted(POINTS))}")
        if not isinstance(fields, dict):
            raise ValueError(f"fault {point!r} must be an object like {{'delay_s': 1.0}}, got {fields!r}")
        try:
            plan[point] = Fault(**fields)
        except TypeError:
            raise ValueError(f"fault {point!r}: fields are delay_s and fail, got {sorted(fields)}") from None
    return plan


def write_plan(path: str | Path, plan: Mapping[str, Fault]) -> None:
    """Replace the plan in `path` atomically (readers never see half a file); an empty plan turns every point off."""
    parse_plan({point: asdict(fault) for point, fault in plan.items()})  # refuse what no reader would accept
    path = Path(path)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text(json.dumps({point: asdict(fault) for point, fault in plan.items()}))
    os.replace(scratch, path)


class _PlanFile:
    """The plan behind `RAYLANE_FAULTS`, re-read when the file's modification time or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._plan: dict[str, Fault] = {}

    def fault(self, point: str) -> Fault | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None  # no file yet: nothing planned
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            try:
                self._plan = parse_plan(json.loads(self.path.read_text()))
            except (OSError, ValueError) as exc:
                # A broken plan must not break serving; say so once per change and keep the last good one.
                logger.warning("fault plan unreadable path=%s error=%s", self.path, exc)
            self._stamp = stamp
        return self._plan.get(point)


def _plan_from_env() -> _PlanFile | None:
    path = os.environ.get(ENV_VAR)
    return _PlanFile(Path(path)) if path else None


_PLAN = _plan_from_env()


def _planned(point: str) -> Fault | None:
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; add it to workers.faults.POINTS")
    return None if _PLAN is None else _PLAN.fault(point)


def _log(point: str, fault: Fault) -> None:
    # A pacing delay hits every chunk: only failures are worth a line at the default level.
    level = logging.WARNING if fault.fail else logging.DEBUG
    logger.log(level, "fault injected point=%s delay_s=%.3f fail=%s", point, fault.delay_s, fault.fail)


def hit(point: str, error: type[Exception] = InjectedFault) -> None:
    """A synchronous hook: sleep and/or raise `error` if the plan says so for `point`; nothing when off."""
    if _PLAN is None:
        return
    fault = _planned(point)
    if fault is None:
        return
    _log(point, fault)
    time.sleep(fault.delay_s)
    if fault.fail:
        raise error(f"fault injected at {point}")


async def hit_async(point: str, error: type[Exception] = InjectedFault) -> None:
    """`hit` for event loops: the delay is an `asyncio.sleep`, so other requests keep running."""
    if _PLAN is None:
        return
    fault = _planned(point)
    if fault is None:
        return
    _log(point, fault)
    await asyncio.sleep(fault.delay_s)
    if fault.fail:
        raise error(f"fault injected at {point}")
