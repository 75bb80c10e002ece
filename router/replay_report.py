"""A one-page PNG of a replay: latency CDFs per target and output throughput over time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from router.replay import RequestRecord


def write_report_png(records: Sequence[RequestRecord], path: str | Path, *, title: str = "raylane replay") -> Path:
    """Write the report to `path` (PNG) and return it."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, (ax_cdf, ax_tput) = plt.subplots(1, 2, figsize=(12, 4.5))
    targets = sorted({r.target for r in records})
    for target in targets:
        for metric, style in (("ttft_ms", "-"), ("e2e_ms", "--")):
            values = sorted(v for r in records if r.target == target and (v := getattr(r, metric)) is not None)
            if values:
                # Start at 0 so a target with one request still draws a visible step.
                fractions = [0.0] + [(i + 1) / len(values) for i in range(len(values))]
                label = f"{target} {metric[:-3].upper()}"
                ax_cdf.step([values[0], *values], fractions, style, where="post", label=label)
    ax_cdf.set_xscale("log")
    ax_cdf.set_xlabel("latency (ms, log scale)")
    ax_cdf.set_ylabel("fraction of requests")
    ax_cdf.set_title("latency CDF (solid: TTFT, dashed: end-to-end)")
    ax_cdf.grid(True, alpha=0.3)
    ax_cdf.legend(fontsize=7)

    times = [t for r in records for t in r.token_times_s]
    if times:
        num_bins = max(1, int(max(times)) + 1)
        totals = [0] * num_bins
        for target in targets:
            counts = [0] * num_bins
            for r in records:
                if r.target == target:
                    for t in r.token_times_s:
                        counts[int(t)] += 1
                        totals[int(t)] += 1
            ax_tput.plot(range(num_bins), counts, label=target)
        ax_tput.plot(range(num_bins), totals, "k", label="all")
    ax_tput.set_xlabel("time since start (s)")
    ax_tput.set_ylabel("output tokens/s")
    ax_tput.set_title("throughput over time")
    ax_tput.grid(True, alpha=0.3)
    ax_tput.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
