"""`raylane up` and `raylane status` print where Prometheus scrapes the cluster, and those addresses answer."""

from __future__ import annotations

import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from control_plane.cli import app

pytestmark = pytest.mark.slow

ADDRESSES = re.compile(r"metrics:\s+control\s+plane\s+http://(\S+)/metrics,\s+router\s+http://(\S+)/metrics")


def _metric_names(address: str) -> set[str]:
    response = httpx.get(f"http://{address}/metrics", timeout=10)
    response.raise_for_status()
    return {family.name for family in text_string_to_metric_families(response.text)}


def test_up_and_status_print_the_metrics_addresses(ray_cluster, tmp_path):
    runner = CliRunner()
    state = str(tmp_path / "state")
    config = tmp_path / "cluster.yaml"
    # -1: free ports, so this cluster never collides with another on the shared default 9090/9091.
    config.write_text("admin_port: 0\nmetrics_port: -1\nrouter: {port: 0, http_port: 0, metrics_port: -1}\n")
    address = ray_cluster.get_runtime_context().gcs_address
    result = runner.invoke(app, ["up", "--address", address, "--config", str(config), "--state-dir", state])
    try:
        assert result.exit_code == 0, result.output
        at_up = ADDRESSES.search(result.output)
        assert at_up, result.output
        result = runner.invoke(app, ["status", "--state-dir", state])
        assert result.exit_code == 0, result.output
        at_status = ADDRESSES.search(result.output)
        assert at_status and at_status.groups() == at_up.groups(), result.output
        control_plane, router = at_up.groups()
        assert "raylane_reconcile_step_duration_seconds" in _metric_names(control_plane)
        # The HTTP front is off (router.http_port: 0): the metrics port is where this router's metrics are.
        assert {"raylane_requests", "raylane_time_to_first_token_seconds"} <= _metric_names(router)
    finally:
        result = runner.invoke(app, ["down", "--state-dir", state])
    assert result.exit_code == 0 and "cluster down" in result.output, result.output
