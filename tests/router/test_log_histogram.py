"""The one log-bucket histogram: quantiles, the mass above a length, and forgetting by scaling."""

from __future__ import annotations

import math

import pytest

from router.log_histogram import MIN_MASS, LogHistogram


def uniform_1_to_1000() -> LogHistogram:
    histogram = LogHistogram(bins_per_octave=8)
    for value in range(1, 1001):
        histogram.add(value)
    return histogram


def test_quantiles_interpolate_within_bins_and_are_nan_when_empty():
    assert all(math.isnan(v) for v in LogHistogram(bins_per_octave=8).quantiles((0.5,)))
    p10, p50, p90 = uniform_1_to_1000().quantiles((0.1, 0.5, 0.9))
    assert p10 == pytest.approx(100, rel=0.1)
    assert p50 == pytest.approx(500, rel=0.1)
    assert p90 == pytest.approx(900, rel=0.1)


def test_lengths_below_one_count_as_one_and_bins_are_geometric():
    histogram = LogHistogram(bins_per_octave=2)
    assert [histogram.bin_of(v) for v in (0, 1, 1.41, 1.42, 2, 3, 4)] == [0, 0, 0, 1, 2, 3, 4]
    histogram.add(0, weight=2.0)
    assert histogram.counts == {0: 2.0} and histogram.total == 2.0


def test_mass_above_splits_the_bin_holding_the_value_geometrically():
    histogram = uniform_1_to_1000()
    assert histogram.mass_above(0.5) == pytest.approx(1000)
    assert histogram.mass_above(750) == pytest.approx(250, rel=0.05)
    assert histogram.mass_above(10_000) == 0.0
    one_bin = LogHistogram(bins_per_octave=1)
    one_bin.add(5, weight=4.0)  # bin [4, 8)
    assert one_bin.mass_above(4) == pytest.approx(4.0)
    assert one_bin.mass_above(2**2.5) == pytest.approx(2.0)  # halfway through the bin in log space
    assert one_bin.mass_above(7.999) == pytest.approx(0.0, abs=0.01)


def test_scale_keeps_the_shape_and_drops_faded_bins():
    histogram = uniform_1_to_1000()
    before = histogram.quantiles((0.25, 0.75))
    histogram.scale(0.5)
    assert histogram.total == pytest.approx(500)
    assert histogram.quantiles((0.25, 0.75)) == pytest.approx(before)
    faint = LogHistogram(bins_per_octave=1)
    faint.add(2, weight=1.0)
    faint.add(1000, weight=4 * MIN_MASS)
    faint.scale(0.2)
    assert list(faint.counts) == [1] and faint.total == pytest.approx(0.2)


def test_from_counts_round_trips_and_bad_resolution_is_rejected():
    histogram = uniform_1_to_1000()
    copy = LogHistogram.from_counts(8, histogram.counts)
    assert copy.quantiles((0.5,)) == pytest.approx(histogram.quantiles((0.5,)))
    assert copy.total == pytest.approx(histogram.total)
    with pytest.raises(ValueError, match="bins_per_octave"):
        LogHistogram(bins_per_octave=0)
