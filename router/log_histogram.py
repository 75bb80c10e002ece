"""A weighted histogram of lengths in geometric bins: the one both the length predictor and LAPS learn with.

Bin `i` covers [2**(i / bins_per_octave), 2**((i + 1) / bins_per_octave)); lengths below 1 count as 1. Bins are
sparse (a dict), so memory follows the lengths seen. Forgetting is the owner's choice: `scale` multiplies every
bin, whether to halve a key past its weight cap (the predictor) or to fold a lazily growing sample weight back
(LAPS). Quantiles and shares interpolate geometrically inside a bin, which suits lengths spanning decades.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MIN_MASS = 1e-3
"""`scale` drops bins that fall below this weight, so memory follows recent traffic (1 = one fresh sample)."""


class LogHistogram:
    """Weighted counts of lengths in geometric bins; quantiles interpolate in log space within a bin."""

    def __init__(self, bins_per_octave: int) -> None:
        if bins_per_octave < 1:
            raise ValueError(f"bins_per_octave must be >= 1, got {bins_per_octave}")
        self.bins_per_octave = bins_per_octave
        self.counts: dict[int, float] = {}
        self.total = 0.0

    @classmethod
    def from_counts(cls, bins_per_octave: int, counts: dict[int, float]) -> LogHistogram:
        """A histogram holding `counts` (bin index -> weight), as `counts` of another one exported them."""
        histogram = cls(bins_per_octave)
        histogram.counts = dict(counts)
        histogram.total = math.fsum(histogram.counts.values())
        return histogram

    def bin_of(self, value: float) -> int:
        return int(math.log2(max(1.0, value)) * self.bins_per_octave)

    def add(self, value: float, weight: float = 1.0) -> None:
        index = self.bin_of(value)
        self.counts[index] = self.counts.get(index, 0.0) + weight
        self.total += weight

    def scale(self, factor: float) -> None:
        """Multiply every bin by `factor`, dropping bins that fall below `MIN_MASS`."""
        self.counts = {i: c * factor for i, c in self.counts.items() if c * factor >= MIN_MASS}
        self.total = math.fsum(self.counts.values())

    def quantiles(self, qs: Sequence[float]) -> list[float]:
        """Values at quantiles `qs` (each in [0, 1], ascending); NaN when empty."""
        if self.total <= 0:
            return [math.nan] * len(qs)
        out: list[float] = []
        bins = sorted(self.counts.items())
        i, cumulative = 0, 0.0
        for q in qs:
            target = q * self.total
            while i < len(bins) - 1 and cumulative + bins[i][1] < target:
                cumulative += bins[i][1]
                i += 1
            index, count = bins[i]
            frac = min(1.0, max(0.0, (target - cumulative) / count))
            out.append(2.0 ** ((index + frac) / self.bins_per_octave))
        return out

    def mass_above(self, value: float) -> float:
        """Weight of lengths above `value`; the bin holding `value` is split where `value` sits in it, geometrically."""
        cut = self.bin_of(value)
        lo = 2.0 ** (cut / self.bins_per_octave)
        inside = min(max(math.log2(value / lo) * self.bins_per_octave, 0.0), 1.0) if value > lo else 0.0
        above = math.fsum(c for i, c in self.counts.items() if i > cut)
        return above + self.counts.get(cut, 0.0) * (1.0 - inside)
