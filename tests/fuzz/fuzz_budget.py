"""The hypothesis settings every fuzz test shares, and the count of inputs each really sent.

`RAYLANE_FUZZ_EXAMPLES` sets the inputs per surface (100 by default, so CI stays quick; the long run is
`RAYLANE_FUZZ_EXAMPLES=10000 pytest -m fuzz`), shared by the surface's tests. With `CI` set the runs are
derandomized, so a failure reproduces.
"""

from __future__ import annotations

import math
import os
import time

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("RAYLANE_FUZZ_EXAMPLES", "100"))
"""Inputs per surface, shared by its tests."""


def fuzz_settings(num_tests: int = 1) -> settings:
    """Hypothesis settings of a fuzz test whose surface (gRPC router, admin, HTTP, YAML, keys) has `num_tests`
    tests: they share the surface's `EXAMPLES` inputs."""
    return settings(
        max_examples=math.ceil(EXAMPLES / num_tests),
        deadline=None,
        database=None,  # nothing written into the shared tree; CI reproduces by derandomizing instead
        derandomize=bool(os.environ.get("CI")),
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


class InputCounter:
    """Counts the inputs a test really sent, for the fuzz report (`pytest -s` prints it)."""

    def __init__(self, surface: str) -> None:
        self.surface = surface
        self.num_inputs = 0
        self._start = time.monotonic()

    def __call__(self) -> None:
        self.num_inputs += 1

    def report(self, test: str) -> None:
        elapsed = time.monotonic() - self._start
        print(f"\nfuzz surface={self.surface} test={test} inputs={self.num_inputs} seconds={elapsed:.1f}")
