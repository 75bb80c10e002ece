"""Run an invariant check after every event a `Simulator` handles."""

from __future__ import annotations

from collections.abc import Callable

from sim.simulator import Simulator


def check_after_every_event(sim: Simulator, check: Callable[[], None]) -> None:
    """Wrap each of `sim`'s event handlers so `check()` runs right after it."""
    handlers = sim._handlers

    def checked():
        wrapped = {}
        for kind, handler in handlers().items():

            def run_and_check(a, b, handler=handler):
                handler(a, b)
                check()

            wrapped[kind] = run_and_check
        return wrapped

    sim._handlers = checked
