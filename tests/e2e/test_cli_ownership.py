"""`raylane up` / `raylane down` own exactly what they start, on a host where other Ray clusters run.

`up --address local` (in its own process, as a user runs it) starts a Ray head of its own; `down`
stops that head, the control plane and its embedded Redis, and nothing else: the test session's
Ray cluster keeps working throughout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from control_plane.ray_head import head_processes
from control_plane.redis_server import DATA_SUBDIR, _is_alive

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _raylane(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "control_plane.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _redis_servers_in(data_dir: Path) -> list[int]:
    """redis-server processes serving `data_dir` (redis chdirs into its data dir)."""
    found = []
    for process in psutil.process_iter(["name"]):
        try:
            if "redis-server" in (process.info["name"] or "") and Path(process.cwd()) == data_dir:
                found.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _session_cluster_works(ray) -> bool:
    @ray.remote(num_cpus=0)
    def one() -> int:
        return 1

    return ray.get(one.remote(), timeout=60) == 1


def test_up_then_down_stops_its_own_head_and_redis_and_nothing_else(ray_cluster, tmp_path):
    state = tmp_path / "state"
    config = tmp_path / "cluster.yaml"
    config.write_text(
        "admin_port: 0\nmetrics_port: 0\nrouter: {port: 0, metrics_port: 0, http_port: 0}\nreconcile_interval_s: 0.5\n"
    )
    session_address = ray_cluster.get_runtime_context().gcs_address
    assert _session_cluster_works(ray_cluster)

    up = _raylane("up", "--state-dir", str(state), "--config", str(config), "--num-cpus", "2")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        cluster = json.loads((state / "cluster.json").read_text())
        assert cluster["started_ray"] and cluster["ray_address"] != session_address
        head_pids = {p.pid for p in head_processes(cluster["ray_temp_dir"])}
        assert head_pids, "the head `up` started has no processes"
        assert _is_alive(cluster["redis_pid"])
        assert _redis_servers_in(state / DATA_SUBDIR) == [cluster["redis_pid"]]
        status = _raylane("status", "--state-dir", str(state), timeout_s=60)
        assert status.returncode == 0, status.stdout + status.stderr
        # `up` again is idempotent: it reuses its head rather than starting a second one.
        again = _raylane("up", "--state-dir", str(state), "--config", str(config), "--num-cpus", "2")
        assert again.returncode == 0, again.stdout + again.stderr
        assert json.loads((state / "cluster.json").read_text())["ray_temp_dir"] == cluster["ray_temp_dir"]
    finally:
        down = _raylane("down", "--state-dir", str(state))
    assert down.returncode == 0 and "cluster down" in down.stderr, down.stdout + down.stderr
    assert not (state / "cluster.json").exists()
    assert not [pid for pid in head_pids if psutil.pid_exists(pid) and _is_alive(pid)]
    assert head_processes(cluster["ray_temp_dir"]) == []
    assert _redis_servers_in(state / DATA_SUBDIR) == []
    # Someone else's cluster on the same host (here: the test session's) never noticed.
    assert ray_cluster.is_initialized() and _session_cluster_works(ray_cluster)
