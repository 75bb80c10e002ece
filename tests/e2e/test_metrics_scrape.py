"""Prometheus metrics end to end: scrape a real local cluster before and after known requests, check exact deltas.

One cluster for the module: the control plane (metrics on a free port) with its router (HTTP front and metrics
port on free ports), one mixed worker on the tiny Llama, tenant `alice` with a LoRA adapter, and tenant `tight`
whose one-token budget refuses its second request.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from control_plane.admin_client import admin_client_for
from control_plane.config import ControlPlaneConfig
from control_plane.spec import AdapterSpec, DeploymentSpec, EngineOptions, PoolSpec, Quota, TenantSpec
from router.client import Client, QuotaExceededError
from router.config import RouterConfig
from router.worker_metrics import WORKER_LABELS

pytestmark = pytest.mark.slow

DEPLOYMENT = "metered"
MAX_TOKENS = 4
ADAPTER = "alice-lora"

Samples = Mapping[tuple[str, frozenset], float]
"""(sample name, its labels) -> value, as one scrape exported them."""


def _wait(predicate: Callable[[], object], timeout_s: float = 60.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def scrape(address: str) -> Samples:
    response = httpx.get(f"http://{address}/metrics", timeout=10)
    response.raise_for_status()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of `name`'s samples whose labels include `labels` (0 when there is none)."""
    wanted = set(labels.items())
    return sum(value for (sample, have), value in samples.items() if sample == name and wanted <= have)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


@pytest.fixture(scope="module")
def cluster(ray_cluster, tiny_llama, tiny_loras, tmp_path_factory):
    from control_plane.cluster import start_control_plane, stop_control_plane

    config = ControlPlaneConfig(
        state_dir=str(tmp_path_factory.mktemp("metrics-state")),
        admin_port=0,
        metrics_port=-1,  # free ports: other clusters on this machine may hold 9090/9091
        router=RouterConfig(port=0, http_port=-1, metrics_port=-1),
        reconcile_interval_s=0.5,
    )
    handle, info = start_control_plane(config, detached=False)
    admin = admin_client_for(config, info.admin_address)
    admin.create_tenant(TenantSpec(name="alice", quota=Quota(max_concurrent=8, tokens_per_minute=1_000_000)))
    # A one-token bucket: the first request is admitted against the full bucket, its usage drives it negative.
    admin.create_tenant(TenantSpec(name="tight", quota=Quota(max_concurrent=1, tokens_per_minute=1)))
    keys = {name: admin.issue_key(name)[1] for name in ("alice", "tight")}
    engine = EngineOptions(kv_cache_bytes=8 << 20, max_num_batched_tokens=128, max_num_seqs=16)
    pools = (PoolSpec(role="mixed", replicas=1),)
    admin.apply_deployment(DeploymentSpec(name=DEPLOYMENT, model=str(tiny_llama), pools=pools, engine=engine))
    spec = AdapterSpec(name=ADAPTER, path=str(tiny_loras["a"]), tenant="alice", deployment=DEPLOYMENT)
    admin.register_adapter(spec)
    _wait(lambda: admin.status().num_healthy_workers >= 1, timeout_s=120, what="a healthy worker")
    [http_address] = info.router_http_addresses
    [router_metrics_address] = info.router_metrics_addresses
    assert info.metrics_address, "the control plane's metrics endpoint did not start"
    state = {
        "admin": admin,
        "info": info,
        "keys": keys,
        "http": http_address,
        "router_metrics": router_metrics_address,
    }
    # The router refreshes its table in the background: wait until it serves this deployment.
    models = f"http://{http_address}/v1/models"
    headers = {"Authorization": f"Bearer {keys['alice']}"}
    _wait(
        lambda: DEPLOYMENT in {m["id"] for m in httpx.get(models, headers=headers, timeout=10).json()["data"]},
        what="the router to learn the deployment",
    )
    yield state
    admin.close()
    stop_control_plane()
    del handle


def _http_completion(cluster, prompt: str) -> dict:
    response = httpx.post(
        f"http://{cluster['http']}/v1/completions",
        headers={"Authorization": f"Bearer {cluster['keys']['alice']}"},
        json={"model": DEPLOYMENT, "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_request_metrics_move_by_exact_amounts(cluster):
    """3 gRPC and 2 HTTP completions of alice, one admitted and one refused request of tight."""
    router = cluster["info"].router_addresses[0]
    before = scrape(cluster["http"])
    prompt_tokens = 0
    with Client(router, cluster["keys"]["alice"], timeout_s=60) as client:
        for i in range(3):
            done = client.complete(DEPLOYMENT, f"gRPC request number {i} says", max_tokens=MAX_TOKENS, ignore_eos=True)
            assert done.finish_reason == "length" and done.usage.completion_tokens == MAX_TOKENS
            prompt_tokens += done.usage.prompt_tokens
    for i in range(2):
        body = _http_completion(cluster, f"an HTTP request, the {i}th, asks")
        assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == MAX_TOKENS
        prompt_tokens += body["usage"]["prompt_tokens"]
    with Client(router, cluster["keys"]["tight"], timeout_s=60) as client:
        tight = client.complete(DEPLOYMENT, "the tight tenant", max_tokens=MAX_TOKENS, ignore_eos=True)
        with pytest.raises(QuotaExceededError):
            client.complete(DEPLOYMENT, "over budget", max_tokens=MAX_TOKENS, ignore_eos=True)
    after = scrape(cluster["http"])

    alice = {"deployment": DEPLOYMENT, "tenant": "alice"}
    assert delta(before, after, "raylane_request_success_total", **alice, finished_reason="length") == 5
    assert delta(before, after, "raylane_request_success_total", **alice) == 5  # no other finish reason
    assert delta(before, after, "raylane_prompt_tokens_total", **alice) == prompt_tokens
    assert delta(before, after, "raylane_generation_tokens_total", **alice) == 5 * MAX_TOKENS
    assert delta(before, after, "raylane_requests_total", **alice, status="OK") == 5
    assert delta(before, after, "raylane_requests_total", **alice) == 5

    tight_labels = {"deployment": DEPLOYMENT, "tenant": "tight"}
    assert delta(before, after, "raylane_prompt_tokens_total", **tight_labels) == tight.usage.prompt_tokens
    assert delta(before, after, "raylane_requests_total", **tight_labels, status="OK") == 1
    assert delta(before, after, "raylane_requests_total", **tight_labels, status="RESOURCE_EXHAUSTED") == 1
    assert delta(before, after, "raylane_admission_rejections_total", **tight_labels, reason="quota") == 1
    assert delta(before, after, "raylane_admission_rejections_total") == 1

    # Histograms are by deployment: alice's 5 and tight's admitted one; the refused request never queued or ran.
    for histogram in (
        "raylane_time_to_first_token_seconds",
        "raylane_e2e_request_latency_seconds",
        "raylane_request_queue_time_seconds",
    ):
        assert delta(before, after, f"{histogram}_count", deployment=DEPLOYMENT) == 6, histogram
        assert delta(before, after, f"{histogram}_sum", deployment=DEPLOYMENT) > 0, histogram
    # At most MAX_TOKENS - 1 gaps per request (fewer when a chunk carries several tokens).
    itl = delta(before, after, "raylane_inter_token_latency_seconds_count", deployment=DEPLOYMENT)
    assert 0 <= itl <= 6 * (MAX_TOKENS - 1)
    assert delta(before, after, "raylane_routing_decisions_total", deployment=DEPLOYMENT, pool="mixed") == 6


def test_router_metrics_port_serves_the_same_registry(cluster):
    http, port = scrape(cluster["http"]), scrape(cluster["router_metrics"])
    worker_names = {name for name, _ in http if name.startswith(_WORKER_PREFIXES)}
    request_path = {key: value for key, value in http.items() if key[0] not in worker_names}
    assert any(name == "raylane_requests_total" for name, _ in request_path)
    assert request_path == {key: value for key, value in port.items() if key[0] not in worker_names}


_WORKER_PREFIXES = (
    "raylane_num_requests_",
    "raylane_kv_cache_usage_perc",
    "raylane_prefix_cache_",
    "raylane_num_preemptions",
    "raylane_lora_adapters_loaded",
    "raylane_migration",
)


def test_worker_gauges_carry_the_worker_labels_and_kv_returns_to_zero(cluster):
    [pool] = cluster["admin"].list_pools(DEPLOYMENT)
    [worker] = pool.workers
    labels = {"deployment": DEPLOYMENT, "pool": "mixed", "worker": worker.worker_id}
    assert set(labels) == set(WORKER_LABELS)
    gauges = ("raylane_num_requests_running", "raylane_num_requests_waiting", "raylane_kv_cache_usage_perc")

    def with_gauges() -> Samples | None:
        now = scrape(cluster["http"])
        return now if all((name, frozenset(labels.items())) in now for name in gauges) else None

    # Present once the router has pulled this worker's stats (it placed requests on it, or soon will).
    before = _wait(with_gauges, timeout_s=30, what="the worker's gauges with its labels")

    # The same 40-token prompt twice: the second finds its full blocks in the prefix cache.
    prompt = list(range(100, 140))
    usages = []
    with Client(cluster["info"].router_addresses[0], cluster["keys"]["alice"], timeout_s=60) as client:
        for _ in range(2):
            usages.append(client.complete(DEPLOYMENT, prompt, max_tokens=MAX_TOKENS, ignore_eos=True).usage)
        done = client.complete(DEPLOYMENT, "with an adapter", adapter=ADAPTER, max_tokens=MAX_TOKENS, ignore_eos=True)
        usages.append(done.usage)
    queries = sum(u.prompt_tokens for u in usages)
    hits = sum(u.cached_prompt_tokens for u in usages)
    assert usages[1].cached_prompt_tokens > 0, usages

    # The router pulls worker stats periodically: wait for a pull after the requests.
    def settled() -> Samples | None:
        now = scrape(cluster["http"])
        is_idle = total(now, "raylane_kv_cache_usage_perc", **labels) == 0.0
        is_counted = delta(before, now, "raylane_prefix_cache_queries_total", **labels) == queries
        return now if is_idle and is_counted else None

    after = _wait(settled, timeout_s=30, what="the worker's stats to show the requests, idle")
    assert delta(before, after, "raylane_prefix_cache_hits_total", **labels) == hits
    assert total(after, "raylane_num_requests_running", **labels) == 0
    assert total(after, "raylane_num_requests_waiting", **labels) == 0
    assert total(after, "raylane_lora_adapters_loaded", **labels) == 1
    assert ("raylane_num_preemptions_total", frozenset(labels.items())) in after


def test_control_plane_metrics_show_reconcile_steps_and_the_pool(cluster):
    address = cluster["info"].metrics_address
    first = scrape(address)
    pool = {"deployment": DEPLOYMENT, "pool": "mixed"}
    assert total(first, "raylane_pool_desired_workers", **pool) == 1
    assert total(first, "raylane_pool_workers", **pool, state="healthy") == 1
    # Two reconcile passes at 0.5 s apart.
    _wait(
        lambda: delta(first, scrape(address), "raylane_reconcile_step_duration_seconds_count") > 0,
        timeout_s=10,
        what="another reconcile step",
    )


def test_router_serve_with_tls_and_its_own_metrics_port(cluster, ray_cluster, self_signed_tls, tmp_path):
    """`raylane router serve --metrics-port=-1` with TLS: HTTPS with the CA works, plain HTTP does not; metrics
    stay plain HTTP on their own port and count this router's requests only."""
    cert, key = self_signed_tls
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = ray_cluster.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "control_plane.cli", "router", "serve", "--address", address]
    command += ["--host", "127.0.0.1", "--port", str(port), "--http-port=-1", "--metrics-port=-1"]
    command += ["--tls-cert", cert, "--tls-key", key, "--wait-for-ray", "30"]
    log_path = tmp_path / "router.log"
    with log_path.open("w") as log:
        # COLUMNS: rich would wrap the start line at 80 columns.
        env = {**os.environ, "PYTHONPATH": os.getcwd(), "COLUMNS": "500"}
        router = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = _wait(lambda: _started_line(log_path, router), timeout_s=90, what="the router to start")
        match = re.search(r"HTTP: https://(\S+)/v1; metrics: http://(\S+)/metrics", line)
        assert match, line
        http_address, metrics_address = match.groups()
        request = {"model": DEPLOYMENT, "prompt": "over TLS", "max_tokens": MAX_TOKENS, "ignore_eos": True}
        headers = {"Authorization": f"Bearer {cluster['keys']['alice']}"}
        url = f"https://{http_address}/v1/completions"
        trusting = ssl.create_default_context(cafile=cert)
        response = httpx.post(url, json=request, headers=headers, verify=trusting, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == MAX_TOKENS
        with pytest.raises(httpx.TransportError):
            httpx.post(f"http://{http_address}/v1/completions", json=request, headers=headers, timeout=10)
        with pytest.raises(httpx.ConnectError):  # nor HTTPS that does not trust the router's CA
            httpx.post(url, json=request, headers=headers, timeout=10)
        samples = scrape(metrics_address)
        alice = {"deployment": DEPLOYMENT, "tenant": "alice"}
        assert total(samples, "raylane_requests_total", **alice) == 1
        assert total(samples, "raylane_requests_total", **alice, status="OK") == 1
        assert total(samples, "raylane_generation_tokens_total", **alice) == MAX_TOKENS
    finally:
        router.send_signal(signal.SIGTERM)
        assert router.wait(timeout=30) == 0, log_path.read_text()


def _started_line(log_path, router: subprocess.Popen) -> str | None:
    assert router.poll() is None, log_path.read_text()
    return next((line for line in log_path.read_text().splitlines() if "router serving" in line), None)
