"""`raylane up/down/status/deploy/tenant/adapter/generate/bench`: the cluster half of the CLI.

Only `up` and `down` use Ray; every other command talks gRPC to the addresses `up` saved in the
state directory's cluster file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from control_plane.cluster import ClusterFile, ClusterNotRunningError
from control_plane.config import DEFAULT_STATE_DIR, ControlPlaneConfig, tls_ca_file_from_env
from router.client import RaylaneError

console = Console(stderr=True)
# Piped output (logs, CI) would otherwise wrap tables at 80 columns.
out = Console(width=None if sys.stdout.isatty() else 160)

StateDir = Annotated[
    Path,
    typer.Option(help="Cluster state directory (embedded Redis, cluster file).", envvar="RAYLANE_STATE_DIR"),
]

tenant_app = typer.Typer(help="Tenants and their API keys.", no_args_is_help=True)
adapter_app = typer.Typer(help="LoRA adapters, owned by one tenant each.", no_args_is_help=True)
bench_app = typer.Typer(help="Load generators against a running cluster.", no_args_is_help=True)


def _cluster(state_dir: Path) -> ClusterFile:
    try:
        return ClusterFile.load(state_dir.expanduser())
    except ClusterNotRunningError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None


def _admin(state_dir: Path):
    from control_plane.admin_client import connect_admin

    address = _cluster(state_dir).admin_address
    try:
        return connect_admin(address, state_dir)
    except (ValueError, OSError) as exc:
        raise _fail(exc) from None


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(2)


def up(
    address: Annotated[
        str,
        typer.Option(
            help="`local` starts a Ray head of its own here (reused by `up` on the same state dir); "
            "`auto` joins this node's running cluster; or host:port."
        ),
    ] = "local",
    config: Annotated[
        Path | None,
        typer.Option(help="Cluster YAML: ControlPlaneConfig fields, with a `router:` section (examples/cluster.yaml)."),
    ] = None,
    state_dir: StateDir = Path(DEFAULT_STATE_DIR),
    redis_url: Annotated[str | None, typer.Option(help="External Redis; default: embedded, in --state-dir.")] = None,
    num_cpus: Annotated[int | None, typer.Option(help="Logical CPUs of a local Ray head (default max(8, cores)).")] = (
        None
    ),
    wait_for_ray: Annotated[float, typer.Option(help="Seconds to retry a Ray head that is still starting.")] = 0,
    deployments_dir: Annotated[Path | None, typer.Option(help="Apply every *.yaml deployment in this folder.")] = None,
    bootstrap_tenant: Annotated[str, typer.Option(help="Tenant made sure to exist (and given the key below).")] = (
        "default"
    ),
    bootstrap_key_file: Annotated[
        Path | None, typer.Option(help="File holding an API key the bootstrap tenant must accept (a mounted Secret).")
    ] = None,
    routers: Annotated[
        bool, typer.Option("--routers/--no-routers", help="Start routers as Ray actors (off: `raylane router serve`).")
    ] = True,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate: admin and router ports speak TLS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
) -> None:
    """Start a cluster: Ray, the control plane (with its state store) and the routers. Idempotent."""
    import ray

    from control_plane.admin_client import admin_client_for
    from control_plane.cluster import connect_for_up, start_control_plane
    from control_plane.redis_server import DATA_SUBDIR, registered_pid

    try:
        overrides: dict = {} if routers else {"num_routers": 0}
        if tls_cert is not None or tls_key is not None:
            overrides.update(tls_cert_file=str(tls_cert or ""), tls_key_file=str(tls_key or ""))
        cfg = ControlPlaneConfig.load(config, state_dir=str(state_dir), redis_url=redis_url, **overrides)
        bootstrap_key = bootstrap_key_file.read_text().strip() if bootstrap_key_file is not None else None
        specs = _read_deployments(deployments_dir) if deployments_dir is not None else []
    except (ValueError, OSError) as exc:
        raise _fail(exc) from None
    with console.status("starting Ray and the control plane"):
        ray_address, head = connect_for_up(address, cfg.state_path, num_cpus=num_cpus, wait_s=wait_for_ray)
        # Recorded before anything else starts, so `down` can stop what a failing `up` left behind.
        cluster = ClusterFile(
            admin_address="",
            router_addresses=[],
            state_url="",
            ray_address=ray_address,
            started_ray=head is not None,
            ray_temp_dir=head.temp_dir if head is not None else "",
        )
        cluster.save(cfg.state_path)
        handle, info = start_control_plane(cfg, detached=True)
        ray.get(handle.bootstrap_tenant.remote(bootstrap_tenant, bootstrap_key))
    # The control plane runs on this node, so its token is the one this config names or the state dir holds.
    with admin_client_for(cfg, info.admin_address) as admin:
        # Without an operator key, mint one for this machine's cluster file so `raylane generate` just works.
        api_key = "" if bootstrap_key is not None else admin.issue_key(bootstrap_tenant)[1]
        for spec in specs:
            version = admin.apply_deployment(spec)
            console.print(f"applied {spec.name} v{version}")
    cluster = dataclasses.replace(
        cluster,
        admin_address=info.admin_address,
        router_addresses=list(info.router_addresses),
        router_http_addresses=list(info.router_http_addresses),
        metrics_address=info.metrics_address,
        router_metrics_addresses=list(info.router_metrics_addresses),
        state_url=info.state_url,
        api_key=api_key,
        redis_pid=0 if cfg.redis_url else registered_pid(cfg.state_path / DATA_SUBDIR),
        https=cfg.tls_cert_file is not None,
    )
    path = cluster.save(cfg.state_path)
    routers_text = ", ".join(info.router_addresses) or "none (run `raylane router serve`)"
    console.print(f"[green]cluster up[/green] admin={info.admin_address} routers={routers_text}")
    if info.router_http_addresses:
        console.print(f"OpenAI-compatible HTTP: {_http_text(cluster)}")
    console.print(f"metrics: {_metrics_text(info.metrics_address, info.router_metrics_addresses)}")
    console.print(f"state: {info.state_url}  cluster file: {path}")


def _http_text(cluster: ClusterFile) -> str:
    """The routers' OpenAI base URLs (the metrics ports stay plain HTTP even with TLS on)."""
    scheme = "https" if cluster.https else "http"
    return ", ".join(f"{scheme}://{a}/v1" for a in cluster.router_http_addresses)


def _metrics_text(control_plane: str, routers: Sequence[str]) -> str:
    """Where Prometheus scrapes this cluster (each router's HTTP front serves `/metrics` as well)."""
    parts = [f"control plane http://{control_plane}/metrics"] if control_plane else []
    parts += [f"router http://{a}/metrics" for a in routers]
    return ", ".join(parts) or "off"


def _read_deployments(folder: Path) -> list:
    from control_plane.spec import DeploymentSpec, SpecError

    specs = []
    for file in sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml")):
        try:
            specs.append(DeploymentSpec.from_yaml(file.read_text()))
        except SpecError as exc:
            raise ValueError(f"{file}: {exc}") from None
    return specs


def _api_key(cluster: ClusterFile, override: str | None) -> str:
    key = override or cluster.api_key
    if not key:
        console.print("[red]error:[/red] no API key: pass --api-key or set RAYLANE_API_KEY")
        raise typer.Exit(2)
    return key


def _router_address(cluster: ClusterFile, override: str | None) -> str:
    if override:
        return override
    if not cluster.router_addresses:
        console.print("[red]error:[/red] this cluster's routers run outside the control plane; pass --router HOST:PORT")
        raise typer.Exit(2)
    return cluster.router_addresses[0]


def down(state_dir: StateDir = Path(DEFAULT_STATE_DIR)) -> None:
    """Stop what `up` started, and only that: the control plane, its routers, workers and embedded Redis (desired
    state stays in its AOF), and the Ray head if `up` started one (other Ray clusters on the host keep running)."""
    import ray

    from control_plane.cluster import NAMESPACE, stop_control_plane, stop_started

    cluster = _cluster(state_dir)
    was_connected = ray.is_initialized()
    with console.status("stopping the cluster"):
        try:
            if not was_connected:  # never start a head just to stop it: join the recorded one or fail
                ray.init(address=cluster.ray_address, namespace=NAMESPACE, log_to_driver=False)
            stopped = stop_control_plane()
            if not was_connected:
                ray.shutdown()
        except (ConnectionError, RuntimeError) as exc:
            console.print(f"[yellow]Ray was not reachable ({exc}); cleaning up the cluster file[/yellow]")
            stopped = False
        stop_started(cluster, state_dir.expanduser())
    (state_dir.expanduser() / "cluster.json").unlink(missing_ok=True)
    console.print("[green]cluster down[/green]" + ("" if stopped else " (no control plane was running)"))


def status(state_dir: StateDir = Path(DEFAULT_STATE_DIR)) -> None:
    """A table of pools and workers: state, running/waiting requests, KV use and tokens/s."""
    with _admin(state_dir) as admin:
        try:
            response = admin.status()
        except RaylaneError as exc:
            raise _fail(exc) from None
    table = Table(title=f"raylane — routers {', '.join(response.router_addresses)}")
    for column in ("deployment", "role", "worker", "state", "running", "waiting", "KV used", "tok/s", "adapters"):
        table.add_column(column, justify="right" if column in ("running", "waiting", "KV used", "tok/s") else "left")
    for pool in response.pools:
        for w in pool.workers:
            kv = f"{w.kv_blocks_used}/{w.kv_blocks_total}" if w.kv_blocks_total else "-"
            color = {"healthy": "green", "dead": "red"}.get(w.state, "yellow")
            table.add_row(
                pool.deployment,
                pool.role,
                w.worker_id,
                f"[{color}]{w.state}[/{color}]",
                str(w.num_running),
                str(w.num_waiting),
                kv,
                f"{w.output_tokens_per_s:.1f}",
                ",".join(w.adapters) or "-",
            )
        if not pool.workers:
            table.add_row(pool.deployment, pool.role, "-", "[yellow]no workers[/yellow]", "", "", "", "", "")
    out.print(table)
    r = response.reconcile
    out.print(
        f"deployments {response.num_deployments}  tenants {response.num_tenants}  workers "
        f"{response.num_healthy_workers}/{response.num_workers} healthy  reconcile loops {r.num_loops} "
        f"(last {r.last_loop_ms:.0f} ms, errors {r.num_errors}, replaced {r.num_workers_replaced})"
    )
    cluster = _cluster(state_dir)
    if cluster.router_addresses:  # routers run by `raylane router serve` print their own addresses
        out.print(f"OpenAI-compatible HTTP: {_http_text(cluster) or 'off'}")
    out.print(f"metrics: {_metrics_text(cluster.metrics_address, cluster.router_metrics_addresses)}")


def deploy(
    file: Annotated[Path, typer.Argument(help="Deployment YAML (see `examples/`).")],
    state_dir: StateDir = Path(DEFAULT_STATE_DIR),
) -> None:
    """Apply a deployment: create it, or update it (pools are resized or restarted as needed)."""
    from control_plane.spec import DeploymentSpec, SpecError

    try:
        spec = DeploymentSpec.from_yaml(file.read_text())
    except (SpecError, OSError) as exc:
        raise _fail(exc) from None
    model = Path(spec.model).expanduser()
    if not model.is_absolute():
        # Workers do not run in this directory; pin the path the user meant.
        spec = dataclasses.replace(spec, model=str(model.absolute()))
    with _admin(state_dir) as admin:
        try:
            version = admin.apply_deployment(spec)
        except RaylaneError as exc:
            raise _fail(exc) from None
    pools = ", ".join(f"{p.role}x{p.replicas}" for p in spec.pools)
    console.print(f"[green]applied[/green] {spec.name} v{version} ({pools}); `raylane status` shows the workers")


@tenant_app.command("create")
def tenant_create(
    name: str,
    max_concurrent: Annotated[int, typer.Option(help="Requests in flight at once.")] = 16,
    tokens_per_minute: Annotated[int, typer.Option(help="Prompt + output tokens per minute.")] = 120_000,
    state_dir: StateDir = Path(DEFAULT_STATE_DIR),
) -> None:
    """Create a tenant and print its first API key (shown only once)."""
    from control_plane.spec import Quota, TenantSpec

    try:
        tenant = TenantSpec(name=name, quota=Quota(max_concurrent=max_concurrent, tokens_per_minute=tokens_per_minute))
        with _admin(state_dir) as admin:
            admin.create_tenant(tenant)
            key_id, key = admin.issue_key(name)
    except (ValueError, RaylaneError) as exc:
        raise _fail(exc) from None
    console.print(f"[green]created[/green] tenant {name}; key id {key_id}")
    out.print(key)


@tenant_app.command("keys")
def tenant_keys(name: str, state_dir: StateDir = Path(DEFAULT_STATE_DIR)) -> None:
    """Issue another API key for a tenant (printed once; only its hash is stored)."""
    with _admin(state_dir) as admin:
        try:
            key_id, key = admin.issue_key(name)
        except RaylaneError as exc:
            raise _fail(exc) from None
    console.print(f"key id {key_id}")
    out.print(key)


@tenant_app.command("revoke")
def tenant_revoke(key_id: str, state_dir: StateDir = Path(DEFAULT_STATE_DIR)) -> None:
    """Revoke an API key by its id (routers stop accepting it within a second)."""
    with _admin(state_dir) as admin:
        revoked = admin.revoke_key(key_id)
    console.print("[green]revoked[/green]" if revoked else f"[yellow]no key {key_id}[/yellow]")


@tenant_app.command("list")
def tenant_list(state_dir: StateDir = Path(DEFAULT_STATE_DIR)) -> None:
    """Tenants and their quotas."""
    with _admin(state_dir) as admin:
        for t in admin.list_tenants():
            out.print(
                f"{t.name}  max_concurrent={t.quota.max_concurrent} tokens_per_minute={t.quota.tokens_per_minute}"
            )


@adapter_app.command("register")
def adapter_register(
    deployment: Annotated[str, typer.Option(help="Deployment whose workers load it.")],
    tenant: Annotated[str, typer.Option(help="The only tenant allowed to use it.")],
    name: Annotated[str, typer.Option(help="Name requests select it by.")],
    path: Annotated[Path, typer.Option(help="PEFT adapter folder, readable by the workers.")],
    state_dir: StateDir = Path(DEFAULT_STATE_DIR),
) -> None:
    """Register a LoRA adapter for one tenant on one deployment; running workers load it."""
    from control_plane.spec import AdapterSpec

    try:
        spec = AdapterSpec(name=name, path=str(path.resolve()), tenant=tenant, deployment=deployment)
        with _admin(state_dir) as admin:
            admin.register_adapter(spec)
    except (ValueError, RaylaneError) as exc:
        raise _fail(exc) from None
    console.print(f"[green]registered[/green] {name} for {tenant} on {deployment}")


def generate(
    prompt: Annotated[str, typer.Argument(help="Prompt text.")],
    deployment: Annotated[str, typer.Option(help="Deployment to run on.")] = "chat",
    adapter: Annotated[str | None, typer.Option(help="A LoRA adapter registered to your tenant.")] = None,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print tokens as they arrive.")] = False,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 32,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    api_key: Annotated[
        str | None, typer.Option(help="API key (default: the cluster file's).", envvar="RAYLANE_API_KEY")
    ] = None,
    router: Annotated[str | None, typer.Option(help="Router HOST:PORT (default: the cluster file's).")] = None,
    state_dir: StateDir = Path(DEFAULT_STATE_DIR),
) -> None:
    """Generate through the router (gRPC), as a client would."""
    from router.client import Client

    cluster = _cluster(state_dir)
    key = _api_key(cluster, api_key)
    kwargs = {"adapter": adapter, "max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    with Client(_router_address(cluster, router), key, timeout_s=120, tls_ca_file=tls_ca_file_from_env()) as client:
        try:
            if stream:
                for chunk in client.generate(deployment, prompt, **kwargs):
                    out.print(chunk.text, end="", soft_wrap=True)
                    sys.stdout.flush()
                out.print()
            else:
                completion = client.complete(deployment, prompt, **kwargs)
                out.print(completion.text)
                console.print(
                    f"[dim]{completion.usage.completion_tokens} tokens, TTFT {completion.ttft_ms:.0f} ms, "
                    f"finish {completion.finish_reason}[/dim]"
                )
        except RaylaneError as exc:
            raise _fail(exc) from None


@bench_app.command("replay")
def bench_replay(
    trace: Annotated[Path, typer.Argument(help="Trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens).")],
    deployment: Annotated[list[str], typer.Option(help="Deployment(s) to spread requests over.")] = ["chat"],  # noqa: B006
    rate_scale: Annotated[float, typer.Option(help="Multiply the trace's arrival rate by this.")] = 1.0,
    duration: Annotated[float, typer.Option(help="Seconds of (scaled) trace to replay.")] = 60.0,
    max_prompt_len: Annotated[int, typer.Option(help="Prompts are scaled so the longest has this many tokens.")] = 256,
    max_output_len: Annotated[int, typer.Option(help="Cap on output lengths.")] = 64,
    vocab_size: Annotated[int, typer.Option(help="Random prompt token ids are drawn below this.")] = 512,
    api_key: Annotated[str | None, typer.Option(envvar="RAYLANE_API_KEY", help="Default: the cluster file's.")] = None,
    report: Annotated[Path | None, typer.Option(help="Also write a PNG report here.")] = None,
    router: Annotated[str | None, typer.Option(help="Router HOST:PORT (default: the cluster file's).")] = None,
    state_dir: StateDir = Path(DEFAULT_STATE_DIR),
) -> None:
    """Replay a trace's arrivals through the router; prints TTFT/TPOT/E2E p50/p99 and throughput as JSON."""
    from router.replay import ReplayTarget

    cluster = _cluster(state_dir)
    key = _api_key(cluster, api_key)
    targets = [ReplayTarget(deployment=d, api_key=key) for d in deployment]
    try:
        summary, _ = run_replay(
            _router_address(cluster, router),
            targets,
            trace,
            rate_scale=rate_scale,
            duration_s=duration,
            max_prompt_len=max_prompt_len,
            max_output_len=max_output_len,
            vocab_size=vocab_size,
            report=report,
        )
    except ValueError as exc:
        raise _fail(exc) from None
    print_summary(summary)
    out.print_json(json.dumps(summary))


def run_replay(
    address: str,
    targets,
    trace: Path,
    *,
    rate_scale: float,
    duration_s: float,
    max_prompt_len: int,
    max_output_len: int,
    vocab_size: int,
    report: Path | None = None,
):
    """Load, window and scale the trace, replay it with a progress bar, and summarise (shared with the demo)."""
    from router.replay import replay, select_window, summarize
    from router.replay_report import write_report_png
    from router.trace import load_trace

    rows = select_window(load_trace(trace), rate_scale=rate_scale, duration_s=duration_s)
    if not rows:
        raise ValueError(f"no trace rows in the first {duration_s}s at rate scale {rate_scale}")
    scale = min(1.0, max_prompt_len / max(r.prompt_len for r in rows))
    rows = [
        dataclasses.replace(
            r, prompt_len=max(1, round(r.prompt_len * scale)), output_len=min(r.output_len, max_output_len)
        )
        for r in rows
    ]
    console.print(
        f"replaying {len(rows)} requests over {duration_s:.0f}s (arrival rate x{rate_scale}, prompts x{scale:.3f}, "
        f"outputs capped at {max_output_len})"
    )
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("requests", total=len(rows))
        records = asyncio.run(
            replay(address, targets, rows, vocab_size=vocab_size, on_done=lambda _: progress.advance(task))
        )
    summary = summarize(records)
    if report is not None:
        write_report_png(records, report)
        console.print(f"report: {report}")
    return summary, records


def print_summary(summary: dict) -> None:
    table = Table(title="replay summary")
    for column in ("target", "ok/total", "errors", "TTFT p50/p99 ms", "TPOT p50/p99 ms", "E2E p50/p99 ms", "out tok/s"):
        table.add_column(column)
    rows = [("all", summary["overall"]), *summary["targets"].items()]
    for name, s in rows:
        table.add_row(
            name,
            f"{s['num_ok']}/{s['num_requests']}",
            ",".join(f"{k}:{v}" for k, v in s["errors"].items()) or "-",
            *(f"{s[m]['p50']} / {s[m]['p99']}" for m in ("ttft_ms", "tpot_ms", "e2e_ms")),
            str(s["output_tokens_per_s"]),
        )
    out.print(table)


def demo(
    workdir: Annotated[Path, typer.Option(help="Models, adapters and cluster state go here.")] = Path("raylane-demo"),
    report: Annotated[Path, typer.Option(help="PNG report: latency CDFs and throughput over time.")] = Path(
        "demo_report.png"
    ),
    duration: Annotated[float, typer.Option(help="Seconds of the Azure trace to replay.")] = 60.0,
    rate_scale: Annotated[float, typer.Option(help="Multiplier on the trace's arrival rate.")] = 2.0,
    trace: Annotated[
        Path | None, typer.Option(help="Azure-format trace CSV (default: the repository's data/traces/ copy).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every decision.")] = False,
) -> None:
    """Bring up a local two-tenant cluster (P/D + mixed, LoRA), replay a real trace through it, report, tear down."""
    from control_plane.demo import DemoConfig, run_demo

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)
    try:
        # Only an explicit --trace overrides the field's default (the repository's copy).
        chosen = {"trace": trace} if trace is not None else {}
        config = DemoConfig(workdir=workdir, report=report, duration_s=duration, rate_scale=rate_scale, **chosen)
    except ValueError as exc:
        raise _fail(exc) from None
    summary = run_demo(config)
    out.print_json(json.dumps(summary))


def register(app: typer.Typer) -> None:
    """Add the cluster commands to the `raylane` app."""
    logging.getLogger("ray").setLevel(logging.WARNING)
    for fn in (up, down, status, deploy, generate, demo):
        app.command()(fn)
    app.add_typer(tenant_app, name="tenant")
    app.add_typer(adapter_app, name="adapter")
    app.add_typer(bench_app, name="bench")
    from control_plane.cli_router import router_app

    app.add_typer(router_app, name="router")
    from control_plane import cli_migrate

    cli_migrate.register(app)
