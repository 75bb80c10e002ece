"""`raylane demo`'s config: the trace it replays ships with the repository, and a missing one fails before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from control_plane.cli import app
from control_plane.demo import DemoConfig
from router.trace import load_trace

REPO = Path(__file__).resolve().parents[2]


def test_default_trace_is_the_repository_copy(tmp_path: Path) -> None:
    config = DemoConfig(workdir=tmp_path)
    assert config.trace.is_relative_to(REPO / "data" / "traces")
    assert len(load_trace(config.trace)) == 19366


def test_missing_trace_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--trace"):
        DemoConfig(workdir=tmp_path, trace=tmp_path / "absent.csv")
    result = CliRunner().invoke(
        app, ["demo", "--workdir", str(tmp_path / "w"), "--trace", str(tmp_path / "absent.csv")]
    )
    assert result.exit_code != 0
    assert "not found; pass --trace" in " ".join(result.output.split())  # rich wraps long lines
    assert not (tmp_path / "w").exists()  # no models built, no cluster started
