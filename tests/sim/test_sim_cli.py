"""`raylane sim run CONFIG.yaml` end to end on a small config."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from control_plane.cli import app

CONFIG = """
trace:
  synthetic: {rate_per_s: 20, duration_s: 10, prompt_median: 200, output_median: 30, max_len: 600, seed: 2}
pools:
  - {role: prefill, num_workers: 1}
  - {role: decode, num_workers: 2}
policy: raylane
cost_model: {kind: roofline, gpu: H100, model: llama-3-8b, tp: 1}
slo: {ttft_s: 0.5, tpot_s: 0.05}
"""


def test_sim_run_writes_json_and_plots(tmp_path: Path) -> None:
    config = tmp_path / "sim.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["sim", "run", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["num_requests"] > 100
    assert summary["pools"] == {"prefill": 1, "decode": 2}
    assert 0 <= summary["slo_attainment"] <= 1
    saved = json.loads((out / "result.json").read_text())
    assert len(saved["requests"]["ttft_s"]) == summary["num_requests"]
    assert (out / "latency_cdf.png").stat().st_size > 0
    assert (out / "timeseries.png").stat().st_size > 0


def test_sim_run_rejects_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(CONFIG.replace("policy: raylane", "policy: nope"))
    result = CliRunner().invoke(app, ["sim", "run", str(config)])
    assert result.exit_code != 0
    assert "unknown policy" in result.output


def test_example_configs_load() -> None:
    from sim.config import load_config

    repo = Path(__file__).resolve().parents[2]
    for path in sorted(repo.joinpath("examples", "sim").glob("*.yaml")):
        config = load_config(path)
        assert config.pools, path
        if config.trace.path is not None:  # a clone has nothing beside it: the trace ships in the repository
            assert Path(config.trace.path).resolve().is_relative_to(repo / "data"), path
            assert Path(config.trace.path).is_file(), path
