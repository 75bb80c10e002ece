"""Starting and stopping a raylane cluster: the Ray head, the `ControlPlane` actor, and the cluster file.

The cluster file (`<state_dir>/cluster.json`) records where the admin service and routers listen,
so later CLI calls (`status`, `deploy`, `generate`) need only gRPC, not Ray.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray._common.utils import hex_to_binary
from ray._raylet import PlacementGroupID
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from control_plane.config import ControlPlaneConfig
from control_plane.control_plane import ClusterInfo, ControlPlane
from control_plane.ray_head import RayHead, head_processes, start_ray_head, stop_ray_head
from control_plane.redis_server import stop_orphan
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
    """The GCS address of the head `up` started, else the address given to `up`."""
    started_ray: bool
    """Whether `up` started the Ray head (then `down` stops it, and only it)."""
    api_key: str = ""
    """A key of the `default` tenant, so `raylane generate` works out of the box (file mode 0600)."""
    router_http_addresses: list[str] = field(default_factory=list)
    """The routers' OpenAI-compatible HTTP fronts (`host:port`); empty when they are off."""
    metrics_address: str = ""
    """The control plane's Prometheus `/metrics` (`host:port`); empty when it is off."""
    router_metrics_addresses: list[str] = field(default_factory=list)
    """The routers' own `/metrics` ports (`host:port`); each HTTP front serves `/metrics` too."""
    ray_temp_dir: str = ""
    """Temp dir of the Ray head `up` started: `down` finds that head's processes by it. Empty: `up` joined one."""
    redis_pid: int = 0
    """The embedded redis-server `up` started (0: an external Redis); `down` makes sure none is left running."""
    https: bool = False
    """Whether the routers' HTTP fronts speak only HTTPS (`up` was given a TLS certificate)."""

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


def connect_ray(address: str, *, num_cpus: int | None = None, wait_s: float = 0.0) -> RayHead | None:
    """Connect this process to Ray: `local` starts a head of its own (returned: the caller owns it); `auto`
    joins this node's running cluster; anything else is a cluster address to join.

    With `wait_s`, keep retrying a non-local address that far: in a pod, Ray may still be starting.
    """
    if ray.is_initialized():
        return None
    if address != LOCAL:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
                return None
            except (ConnectionError, RuntimeError):
                if time.monotonic() >= deadline:
                    raise
                logger.info("waiting for Ray at %s", address)
                time.sleep(2.0)
    # Never `ray.init("auto")` here: on a shared host that finds someone else's cluster.
    # Logical CPUs: tiny CPU workers oversubscribe a laptop's cores on purpose.
    head = start_ray_head(num_cpus or max(8, os.cpu_count() or 1))
    try:
        ray.init(address=head.address, namespace=NAMESPACE, log_to_driver=False)
    except Exception:
        stop_ray_head(head.temp_dir)
        raise
    return head


def connect_for_up(
    address: str, state_dir: Path, *, num_cpus: int | None = None, wait_s: float = 0.0
) -> tuple[str, RayHead | None]:
    """Connect `raylane up` to Ray: the address to record, and the head `up` owns (None when it joined one).

    `local` reuses the head a previous `up` on this state directory started, while it runs (`up` is idempotent).
    """
    if address == LOCAL and not ray.is_initialized():
        try:
            previous = ClusterFile.load(state_dir)
        except ClusterNotRunningError:
            previous = None
        if previous is not None and previous.started_ray and _head_runs(previous.ray_temp_dir):
            connect_ray(previous.ray_address)
            return previous.ray_address, RayHead(address=previous.ray_address, temp_dir=previous.ray_temp_dir)
    head = connect_ray(address, num_cpus=num_cpus, wait_s=wait_s)
    return (head.address if head is not None else address), head


def _head_runs(temp_dir: str) -> bool:
    try:
        return bool(temp_dir) and bool(head_processes(temp_dir))
    except ValueError:  # not a head `up` made (a hand-edited cluster file)
        return False


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
    """Shut the control plane down (it stops its routers, workers and embedded Redis), then kill any raylane
    actor or placement group still left (e.g. the control plane could not shut down). False if none was running.
    """
    try:
        handle = ray.get_actor(CONTROL_PLANE_ACTOR, namespace=NAMESPACE)
    except ValueError:
        handle = None
    try:
        if handle is not None:
            ray.get(handle.shutdown.remote(), timeout=timeout_s)
    finally:
        if handle is not None:
            ray.kill(handle, no_restart=True)
        _kill_data_plane()
    return handle is not None


def _kill_data_plane() -> None:
    # Routers and workers are detached: nothing else stops them once their control plane is gone.
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == NAMESPACE and entry["name"].startswith(("raylane:router:", "raylane:worker:")):
            try:
                ray.kill(ray.get_actor(entry["name"], namespace=NAMESPACE), no_restart=True)
                logger.warning("killed a leftover actor name=%s", entry["name"])
            except ValueError:
                pass  # it exited meanwhile
    for group_id, group in placement_group_table().items():
        if group.get("name", "").startswith("raylane:pool:") and group.get("state") != "REMOVED":
            remove_placement_group(PlacementGroup(PlacementGroupID(hex_to_binary(group_id))))
            logger.warning("removed a leftover placement group name=%s", group["name"])


def stop_started(cluster: ClusterFile, state_dir: Path) -> None:
    """Stop what `up` started besides the actors: its Ray head (by its own processes, never `ray stop`,
    which stops every Ray cluster on the host) and an embedded Redis still running from `state_dir`."""
    if cluster.started_ray and cluster.ray_temp_dir:
        stop_ray_head(cluster.ray_temp_dir)
    if stop_orphan(state_dir):
        logger.warning("an embedded redis outlived its control plane in %s; stopped it", state_dir)
