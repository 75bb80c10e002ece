"""A Ray head that `raylane up` starts for itself, and stops again without touching anyone else's.

`ray stop` stops every Ray process on the host, so it is no way to stop one cluster on a shared
machine. The head gets its own temp dir and free ports instead; its processes are the ones whose
command line names that dir, and their descendants (Ray renames its workers and agents to `ray::…`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

TEMP_DIR_PREFIX = "raylane-ray-"


@dataclass(kw_only=True, frozen=True)
class RayHead:
    """A Ray head started by `start_ray_head`."""

    address: str
    """Its GCS address, `127.0.0.1:<port>`."""
    temp_dir: str
    """Its own temp dir: every process of the head names it, and `stop_ray_head` finds them by it."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ray_head(num_cpus: int, *, timeout_s: float = 180.0) -> RayHead:
    """Start a head on free ports with a fresh temp dir (short: Ray's socket paths live under it)."""
    ray_bin = shutil.which("ray")
    if ray_bin is None:
        raise RuntimeError("the `ray` command is not on PATH; reinstall raylane (pip install -e .)")
    if num_cpus < 1:
        raise ValueError(f"num_cpus must be >= 1, got {num_cpus}")
    temp_dir = tempfile.mkdtemp(prefix=TEMP_DIR_PREFIX, dir="/tmp" if Path("/tmp").is_dir() else None)
    port = _free_port()
    # Each port Ray would otherwise take at a fixed default, which another cluster on the host may hold.
    fixed_ports = {
        "--ray-client-server-port": _free_port(),
        "--dashboard-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
    }
    cmd = [
        ray_bin,
        "start",
        "--head",
        f"--port={port}",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={num_cpus}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        *(f"{flag}={value}" for flag, value in fixed_ports.items()),
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join another cluster
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout_s, env=env)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        stop_ray_head(temp_dir)
        output = getattr(exc, "stderr", "") or ""
        raise RuntimeError(f"`ray start --head` failed: {output.strip()[-2000:] or exc}") from None
    head = RayHead(address=f"127.0.0.1:{port}", temp_dir=temp_dir)
    logger.info("ray head started address=%s temp_dir=%s", head.address, temp_dir)
    return head


def head_processes(temp_dir: str) -> list[psutil.Process]:
    """The head's processes: those whose command line names `temp_dir`, with all their descendants."""
    if not Path(temp_dir).is_absolute() or not Path(temp_dir).name.startswith(TEMP_DIR_PREFIX):
        raise ValueError(f"{temp_dir!r} is not a temp dir `raylane up` made for a Ray head")
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if any(temp_dir in arg for arg in cmdline):
            found[process.pid] = process
            try:
                found.update((child.pid, child) for child in process.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_ray_head(temp_dir: str, *, grace_s: float = 10.0) -> int:
    """SIGTERM the head's processes, SIGKILL what is left after `grace_s`, remove its temp dir.

    Returns how many processes it stopped; no other Ray cluster on the host is touched.
    """
    processes = head_processes(temp_dir)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):  # exited already
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    shutil.rmtree(temp_dir, ignore_errors=True)
    logger.info("ray head stopped temp_dir=%s processes=%d killed=%d", temp_dir, len(processes), len(alive))
    return len(processes)
