"""`raylane migrate` and `raylane drain` through typer's runner, with the admin client replaced by a recorder.

The admin calls themselves run against a real cluster in `tests/e2e/test_cluster_failover.py`; here: arguments,
output, exit codes and `--help`. Also the configuration fields the triggers and failover read.
"""

from __future__ import annotations

import grpc
import pytest
from typer.testing import CliRunner

from control_plane import cli_migrate
from control_plane.cli import app
from control_plane.config import ControlPlaneConfig
from protos.raylane.v1 import control_pb2
from router.client import RaylaneError
from router.server import RouterConfig

runner = CliRunner()


def _result(request_id: str, outcome: str = "committed", reason: str = "") -> control_pb2.MigrationResult:
    return control_pb2.MigrationResult(
        request_id=request_id,
        source_id="chat-mixed-0",
        destination_id="chat-mixed-1",
        outcome=outcome,
        reason=reason,
        num_stages=3,
        num_blocks_copied=12,
        bytes_moved=4096,
        downtime_ms=2.5,
        total_ms=30.0,
    )


class RecordingAdmin:
    def __init__(self, *, migrate=None, drain=None, error: Exception | None = None) -> None:
        self._migrate, self._drain, self._error = migrate, drain, error
        self.calls: list[tuple] = []

    def __enter__(self) -> RecordingAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def migrate(self, request_id: str, destination: str):
        self.calls.append(("migrate", request_id, destination))
        if self._error is not None:
            raise self._error
        return self._migrate

    def drain(self, worker_id: str, *, scale_down: bool, timeout_s: float):
        self.calls.append(("drain", worker_id, scale_down, timeout_s))
        return self._drain


@pytest.fixture
def admin(monkeypatch):
    holder: dict[str, RecordingAdmin] = {}

    def install(recorder: RecordingAdmin) -> RecordingAdmin:
        holder["admin"] = recorder
        monkeypatch.setattr(cli_migrate, "_admin", lambda state_dir, timeout_s: recorder)
        return recorder

    return install


def test_migrate_prints_the_result_and_exits_zero_on_commit(admin):
    recorder = admin(RecordingAdmin(migrate=_result("acme/r1")))
    result = runner.invoke(app, ["migrate", "acme/r1", "--to", "chat-mixed-1"])
    assert result.exit_code == 0, result.output
    assert recorder.calls == [("migrate", "acme/r1", "chat-mixed-1")]
    assert "committed acme/r1: chat-mixed-0 -> chat-mixed-1" in result.stdout
    assert "downtime 2.5 ms" in result.stdout


def test_an_aborted_migration_exits_3_with_the_reason(admin):
    admin(RecordingAdmin(migrate=_result("acme/r1", "aborted", "destination has no free blocks")))
    result = runner.invoke(app, ["migrate", "acme/r1"])
    assert result.exit_code == 3
    assert "stays on chat-mixed-0" in result.stdout and "no free blocks" in result.stdout


def test_an_unknown_request_is_reported_without_a_traceback(admin):
    admin(RecordingAdmin(error=RaylaneError(grpc.StatusCode.NOT_FOUND, "request 'acme/x' is not running")))
    result = runner.invoke(app, ["migrate", "acme/x"])
    assert result.exit_code == 2
    assert "not running" in result.output and "Traceback" not in result.output


def test_drain_reports_every_migration_and_what_remained(admin):
    response = control_pb2.DrainResponse(
        migrations=[_result("acme/r1"), _result("acme/r2", "aborted", "request finished")],
        num_remaining=0,
        stopped=True,
    )
    recorder = admin(RecordingAdmin(drain=response))
    result = runner.invoke(app, ["drain", "chat-mixed-0", "--scale-down", "--timeout", "30"])
    assert result.exit_code == 0, result.output
    assert recorder.calls == [("drain", "chat-mixed-0", True, 30.0)]
    assert "1 request(s) moved, 0 left" in result.stdout and "pool scaled down" in result.stdout


def test_drain_exits_3_when_requests_were_left_behind(admin):
    admin(RecordingAdmin(drain=control_pb2.DrainResponse(num_remaining=2, stopped=True)))
    result = runner.invoke(app, ["drain", "chat-mixed-0"])
    assert result.exit_code == 3
    assert "2 left" in result.stdout and "starts a replacement" in result.stdout


def test_drain_refuses_a_non_positive_timeout(admin):
    recorder = admin(RecordingAdmin())
    result = runner.invoke(app, ["drain", "chat-mixed-0", "--timeout", "0"])
    assert result.exit_code == 2 and "--timeout" in result.output
    assert recorder.calls == []


@pytest.mark.parametrize("command", ["migrate", "drain"])
def test_help_explains_the_command(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert {"migrate": "--to", "drain": "--scale-down"}[command] in result.stdout
    assert "Exit status" in result.stdout


def test_failover_and_rebalance_settings_are_validated():
    assert ControlPlaneConfig().rebalance_interval_s == 0.0  # the rebalancer is off unless asked for
    assert ControlPlaneConfig().router.failover.max_failovers == 3
    with pytest.raises(ValueError, match="rebalance_interval_s"):
        ControlPlaneConfig(rebalance_interval_s=-1)
    with pytest.raises(ValueError, match=r"router\.failover\.max_failovers"):
        ControlPlaneConfig.from_dict({"router": {"failover": {"max_failovers": -1}}})
    with pytest.raises(ValueError, match="max_failovers"):
        RouterConfig.from_dict({"failover": {"max_failovers": -2}})
