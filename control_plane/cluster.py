"""Starting and stopping a raylane cluster: the Ray head, the `ControlPlane` actor, and the cluster file.

The cluster file (`<state_dir>/cluster.json`) records where the admin service and routers listen,
so later CLI calls (`status`, `deploy`, `generate`) need only gRPC, not Ray.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from control_plane.config import ControlPlaneConfig
from control_plane.control_plane import ClusterInfo, ControlPlane
from router.server import CONTROL_PLANE_ACTOR, NAMESPACE

logger = logging.getLogger(__name__)

CLUSTER_FILE = "cluster.json"
LOCAL = "local"


class ClusterNotRunningError(RuntimeError):
    """No cluster file in the state directory: nothing was started with `raylane up` there."""


@dataclass(kw_only=True)
class ClusterFile:
    """What `raylane up` leaves behind for the other commands."""

    admin_address: str
    router_addresses: list[str]
    state_url: str
    ray_address: str
    """`auto` for a local head this CLI started, else the address given to `up`."""
    started_ray: bool
    """Whether `up` started the Ray head (then `down` stops it)."""
    api_key: str = ""
    """A key of the `default` tenant, so `raylane generate` works out of the box (file mode 0600)."""

    def save(self, state_dir: Path) -> Path:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / CLUSTER_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        path.chmod(0o600)
        return path

    @classmethod
    def load(cls, state_dir: Path) -> ClusterFile:
        path = state_dir / CLUSTER_FILE
        if not path.is_file():
            raise ClusterNotRunningError(f"no cluster is running from {state_dir} (start one with `raylane up`)")
        return cls(**json.loads(path.read_text()))


def connect_ray(address: str, *, num_cpus: int | None = None, wait_s: float = 0.0) -> bool:
    """Connect this process to Ray; for `local`, start a head first if none runs. True if we started it.

    With `wait_s`, keep retrying a non-local address that far: in a pod, Ray may still be starting.
    """
    if ray.is_initialized():
        return False
    if address != LOCAL:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
                return False
            except (ConnectionError, RuntimeError):
                if time.monotonic() >= deadline:
                    raise
                logger.info("waiting for Ray at %s", address)
                time.sleep(2.0)
    try:
        ray.init(address="auto", namespace=NAMESPACE, log_to_driver=False)
        return False
    except (ConnectionError, RuntimeError):
        pass
    ray_bin = shutil.which("ray")
    if ray_bin is None:
        raise RuntimeError("the `ray` command is not on PATH; reinstall raylane (pip install -e .)")
    # Logical CPUs: tiny CPU workers oversubscribe a laptop's cores on purpose.
    cpus = num_cpus or max(8, os.cpu_count() or 1)
    cmd = [ray_bin, "start", "--head", f"--num-cpus={cpus}", "--include-dashboard=false", "--disable-usage-stats"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    ray.init(address="auto", namespace=NAMESPACE, log_to_driver=False)
    return True


def start_control_plane(config: ControlPlaneConfig, *, detached: bool = True) -> tuple[Any, ClusterInfo]:
    """Start (or find) the control plane on the connected Ray cluster and wait until it serves.

    Returns its handle with the addresses. A non-detached control plane lives only while the
    caller holds that handle (Ray collects actors nobody references).
    """
    try:
        handle = ray.get_actor(CONTROL_PLANE_ACTOR, namespace=NAMESPACE)
    except ValueError:
        options: dict[str, Any] = {"name": CONTROL_PLANE_ACTOR, "namespace": NAMESPACE}
        if detached:
            options["lifetime"] = "detached"
        if not ray.util.client.ray.is_connected():
            # On this node: its admin port is where `up` (and the Helm chart's admin Service) says it is.
            node_id = ray.get_runtime_context().get_node_id()
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        handle = ControlPlane.options(**options).remote(config)
    return handle, ray.get(handle.start.remote())


def wait_for_control_plane(wait_s: float) -> Any:
    """The control plane's handle, waiting up to `wait_s` for it to be started (a router pod may start first)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return ray.get_actor(CONTROL_PLANE_ACTOR, namespace=NAMESPACE)
        except ValueError:
            if time.monotonic() >= deadline:
                message = "no raylane control plane in this Ray cluster (run `raylane up`)"
                raise ClusterNotRunningError(message) from None
            time.sleep(2.0)


def stop_control_plane(timeout_s: float = 60.0) -> bool:
    """Shut the control plane down (it stops its routers and workers). False if none was running."""
    try:
        handle = ray.get_actor(CONTROL_PLANE_ACTOR, namespace=NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(handle.shutdown.remote(), timeout=timeout_s)
    finally:
        ray.kill(handle)
    return True


def stop_ray_head() -> None:
    ray_bin = shutil.which("ray")
    if ray_bin is not None:
        subprocess.run([ray_bin, "stop", "--force"], check=False, capture_output=True)
