"""`raylane demo`: a whole multi-tenant cluster on this machine, driven by a real trace, then torn down.

Starts Ray in-process, makes tiny Llama and Mixtral models and two LoRA adapters, creates two
tenants, deploys a disaggregated deployment (prefill + decode pools) and a mixed one, replays a
window of the Azure LLM conversation trace through the router, prints the summary, writes a PNG
report, and shuts everything down.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from control_plane.admin_client import AdminClient, admin_client_for
from control_plane.config import ControlPlaneConfig
from control_plane.spec import AdapterSpec, DeploymentSpec, EngineOptions, PoolSpec, Quota, TenantSpec
from router.config import RouterConfig
from router.replay import ReplayTarget
from router.trace import DEFAULT_TRACE

logger = logging.getLogger(__name__)
console = Console(stderr=True)


@dataclass(kw_only=True, frozen=True)
class DemoConfig:
    """What the demo builds and how hard it drives it."""

    workdir: Path
    """Models, adapters and the cluster's state go here."""
    report: Path = Path("demo_report.png")
    """Where the PNG report is written."""
    duration_s: float = 60.0
    """Seconds of trace replayed."""
    rate_scale: float = 2.0
    """Multiplier on the trace's arrival rate: 2x (about 7.6 requests/s) loads 2 CPU cores without overloading them."""
    max_prompt_len: int = 256
    """Prompts are scaled so the longest has this many tokens (the tiny models' context is 512)."""
    max_output_len: int = 48
    """Cap on output lengths."""
    num_cpus: int = 8
    """Logical CPUs of the in-process Ray cluster; the tiny workers oversubscribe real cores on purpose."""
    trace: Path = DEFAULT_TRACE
    """Azure-format trace CSV replayed; the default ships in the repository's data/traces/."""

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.rate_scale <= 0:
            raise ValueError("duration_s and rate_scale must be positive")
        # Checked before any model is built or cluster started: a missing trace would only surface minutes later.
        if not Path(self.trace).is_file():
            raise ValueError(
                f"trace {self.trace} not found; pass --trace PATH (an Azure-format CSV); the Azure trace ships in the "
                "repository's data/traces/, which a non-editable install does not carry"
            )
        if not 1 <= self.max_prompt_len <= 448 or not 1 <= self.max_output_len <= 64:
            raise ValueError("max_prompt_len must be in [1, 448] and max_output_len in [1, 64] for the tiny models")


def build_models(workdir: Path) -> dict[str, Path]:
    """Tiny Llama and Mixtral (random weights, trained BPE tokenizer) and two adapters on the Llama."""
    from workers.engine.tiny import make_tiny_lora, make_tiny_model

    paths = {
        "llama": workdir / "models" / "tiny-llama",
        "mixtral": workdir / "models" / "tiny-mixtral",
        "support-lora": workdir / "adapters" / "acme-support",
        "legal-lora": workdir / "adapters" / "globex-legal",
    }
    if not (paths["llama"] / "config.json").is_file():
        make_tiny_model("llama", paths["llama"], seed=0, dtype="float32")
    if not (paths["mixtral"] / "config.json").is_file():
        make_tiny_model("mixtral", paths["mixtral"], seed=1, dtype="float32")
    if not (paths["support-lora"] / "adapter_config.json").is_file():
        make_tiny_lora(paths["llama"], paths["support-lora"], rank=8, alpha=16, seed=2)
    if not (paths["legal-lora"] / "adapter_config.json").is_file():
        make_tiny_lora(paths["llama"], paths["legal-lora"], rank=16, alpha=16, seed=3)
    return paths


def demo_deployments(paths: dict[str, Path]) -> list[DeploymentSpec]:
    engine = EngineOptions(kv_cache_bytes=16 << 20, max_num_batched_tokens=256, max_num_seqs=32)
    chat = DeploymentSpec(
        name="chat",
        model=str(paths["llama"]),
        pools=(PoolSpec(role="prefill", replicas=1), PoolSpec(role="decode", replicas=1)),
        engine=engine,
    )
    moe = DeploymentSpec(name="moe", model=str(paths["mixtral"]), pools=(PoolSpec(role="mixed", replicas=1),))
    return [chat, moe]


def wait_until_serving(admin: AdminClient, num_workers: int, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = admin.status()
        if status.num_healthy_workers >= num_workers:
            return
        time.sleep(0.5)
    raise TimeoutError(f"workers not healthy after {timeout_s:.0f}s; see `ray logs` for the worker errors")


def run_demo(config: DemoConfig) -> dict:
    """Run the whole demo; returns the replay summary."""
    import ray

    from control_plane.cli_cluster import print_summary, run_replay
    from control_plane.cluster import start_control_plane

    workdir = config.workdir.expanduser().absolute()  # workers and the control plane run in other directories
    workdir.mkdir(parents=True, exist_ok=True)
    with console.status("making tiny Llama and Mixtral models and two LoRA adapters"):
        paths = build_models(workdir)
    # address="local": a fresh cluster even when `raylane up` left one running on this machine.
    ray.init(
        address="local", num_cpus=config.num_cpus, include_dashboard=False, log_to_driver=False, namespace="raylane"
    )
    try:
        cp_config = ControlPlaneConfig(
            state_dir=str(workdir / "state"), admin_port=0, router=RouterConfig(port=0, http_port=-1)
        )
        with console.status("starting the control plane, its Redis and the router"):
            # Held until the end: a non-detached actor lives only while its handle does.
            _control_plane, info = start_control_plane(cp_config, detached=False)
        console.print(f"control plane up: admin {info.admin_address}, router {info.router_addresses[0]}")
        with admin_client_for(cp_config, info.admin_address) as admin:
            targets = setup_tenants_and_deployments(admin, paths)
            with console.status("waiting for 3 workers (chat prefill + chat decode + moe mixed) to serve"):
                wait_until_serving(admin, num_workers=3)
            summary, _ = run_replay(
                info.router_addresses[0],
                targets,
                config.trace,
                rate_scale=config.rate_scale,
                duration_s=config.duration_s,
                max_prompt_len=config.max_prompt_len,
                max_output_len=config.max_output_len,
                vocab_size=512,
                report=config.report,
            )
            print_summary(summary)
            status = admin.status()
            console.print(
                f"workers healthy {status.num_healthy_workers}/{status.num_workers}, "
                f"reconcile loops {status.reconcile.num_loops} (errors {status.reconcile.num_errors})"
            )
    finally:
        # On a crash too: the embedded redis-server is a process of its own and would outlive the demo.
        with console.status("shutting down"):
            shut_down(workdir / "state")
    console.print("[green]demo finished[/green]; the trace is Azure LLM inference 2023 (CC-BY 4.0, Splitwise)")
    return summary


def shut_down(state_dir: Path) -> None:
    """Stop the control plane (its routers, workers and Redis), then Ray; and the Redis of `state_dir` if the
    control plane never got to stop it. Never raises: it runs while another error may be on its way out."""
    import ray

    from control_plane.cluster import stop_control_plane
    from control_plane.redis_server import stop_orphan

    try:
        if ray.is_initialized():
            stop_control_plane()
    except Exception:
        logger.warning("the control plane did not shut down cleanly", exc_info=True)
    finally:
        ray.shutdown()
        try:
            stop_orphan(state_dir)
        except OSError:
            logger.warning("could not stop the embedded redis of %s", state_dir, exc_info=True)


def setup_tenants_and_deployments(admin: AdminClient, paths: dict[str, Path]) -> list[ReplayTarget]:
    """Two tenants with their own adapter each, two deployments; the replay targets that exercise them."""
    keys = {}
    for name in ("acme", "globex"):
        if name not in {t.name for t in admin.list_tenants()}:
            admin.create_tenant(TenantSpec(name=name, quota=Quota(max_concurrent=64, tokens_per_minute=2_000_000)))
        keys[name] = admin.issue_key(name)[1]
    for spec in demo_deployments(paths):
        admin.apply_deployment(spec)
    admin.register_adapter(
        AdapterSpec(name="acme-support", path=str(paths["support-lora"]), tenant="acme", deployment="chat")
    )
    admin.register_adapter(
        AdapterSpec(name="globex-legal", path=str(paths["legal-lora"]), tenant="globex", deployment="chat")
    )
    console.print("tenants acme and globex; deployments chat (prefill+decode) and moe (mixed); 2 adapters")
    return [
        ReplayTarget(deployment="chat", api_key=keys["acme"], label="chat (acme)"),
        ReplayTarget(deployment="chat", api_key=keys["acme"], adapter="acme-support", label="chat+lora (acme)"),
        ReplayTarget(deployment="moe", api_key=keys["globex"], label="moe (globex)"),
        ReplayTarget(deployment="chat", api_key=keys["globex"], adapter="globex-legal", label="chat+lora (globex)"),
    ]
