"""Plots the benchmarks share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def write_latency_cdfs(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: Path,
    *,
    title: str,
    styles: Sequence[str] = (),
) -> None:
    """TTFT and TPOT CDFs (ms, log x) side by side: `series` maps a label to its (TTFT, TPOT) samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, samples) in enumerate(series.items()):
        style = styles[i] if i < len(styles) else "-"
        for ax, values in zip(axes, samples, strict=True):
            ordered = sorted(values)
            if ordered:
                fractions = [(k + 1) / len(ordered) for k in range(len(ordered))]
                ax.step(ordered, fractions, style, where="post", label=name)
    for ax, metric in zip(axes, ("TTFT", "TPOT"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel(f"{metric} (ms, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
