"""`raylane router serve` options through typer's test runner (serving: tests/e2e/test_metrics_scrape.py)."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from control_plane.cli import app

runner = CliRunner()


def _flat(text: str) -> str:
    """Help text without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_help_explains_the_metrics_port():
    result = runner.invoke(app, ["router", "serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    help_text = _flat(result.output)
    assert "--metrics-port" in help_text and "9091" in help_text
    assert "0 turns it off, -1 picks a free one" in help_text


def test_bad_metrics_port_is_refused_before_joining_ray():
    result = runner.invoke(app, ["router", "serve", "--metrics-port", "70000", "--address", "127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert "metrics_port must be an integer in [1, 65535], 0 (off) or -1 (a free port), got 70000" in _flat(
        result.output
    )
    assert "Traceback" not in result.output
