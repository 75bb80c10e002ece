"""API key rotation without downtime, on a real local cluster (control plane, router, one tiny-Llama worker).

The procedure the README documents: issue a new key, switch the clients to it, revoke the old one. The client that
switched never sees a failure, a stream the old key opened before the revoke runs to its end, and the old key is
refused within the router's table refresh interval.
"""

from __future__ import annotations

import threading
import time

import pytest

from control_plane.admin_client import admin_client_for
from control_plane.config import ControlPlaneConfig
from control_plane.spec import DeploymentSpec, EngineOptions, PoolSpec, Quota, TenantSpec
from router.client import AuthenticationError, Chunk, Client, RaylaneError
from router.config import RouterConfig

pytestmark = pytest.mark.slow

DEPLOYMENT = "chat"
LONG_STREAM_TOKENS = 400
REFUSAL_SLACK_S = 2.0
"""How late past one table refresh the old key may still pass on a loaded 2-core machine (one refresh RPC)."""


def _wait(predicate, timeout_s: float = 60.0, what: str = "condition", detail=lambda: ""):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} {detail()}")


def _succeeds(client: Client, errors: list[str]) -> bool:
    try:
        client.complete(DEPLOYMENT, "hi", max_tokens=1)
        return True
    except RaylaneError as exc:
        errors.append(f"{exc.code.name}: {exc}")
        return False


@pytest.fixture(scope="module")
def cluster(ray_cluster, tiny_llama, tmp_path_factory):
    from control_plane.cluster import start_control_plane, stop_control_plane

    config = ControlPlaneConfig(
        state_dir=str(tmp_path_factory.mktemp("rotation-state")),
        admin_port=0,
        metrics_port=0,
        router=RouterConfig(port=0, http_port=0, metrics_port=0),
        reconcile_interval_s=0.5,
    )
    handle, info = start_control_plane(config, detached=False)
    admin = admin_client_for(config, info.admin_address, timeout_s=120)
    admin.create_tenant(TenantSpec(name="rotor", quota=Quota(max_concurrent=16, tokens_per_minute=10_000_000)))
    engine = EngineOptions(kv_cache_bytes=8 << 20, max_num_batched_tokens=256, max_num_seqs=16)
    pools = (PoolSpec(role="mixed", replicas=1, num_cpus=0.5),)
    admin.apply_deployment(DeploymentSpec(name=DEPLOYMENT, model=str(tiny_llama), pools=pools, engine=engine))
    _wait(lambda: admin.status().num_healthy_workers >= 1, 180, "a healthy worker")
    yield {"admin": admin, "router": info.router_addresses[0]}
    admin.close()
    stop_control_plane()
    del handle


class _Stream(threading.Thread):
    """One long generation, read to its end; keeps the arrival time of each chunk."""

    def __init__(self, client: Client) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.chunks: list[tuple[float, Chunk]] = []
        self.error: Exception | None = None
        self.started = threading.Event()

    def run(self) -> None:
        try:
            for chunk in self.client.generate(
                DEPLOYMENT, "The cluster scheduler", max_tokens=LONG_STREAM_TOKENS, ignore_eos=True
            ):
                self.chunks.append((time.monotonic(), chunk))
                self.started.set()
        except Exception as exc:
            self.error = exc
            self.started.set()


class _SwitchedClient(threading.Thread):
    """Sends short requests with the new key, back to back, until told to stop; keeps every outcome."""

    def __init__(self, client: Client) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.outcomes: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.client.complete(DEPLOYMENT, "hello there", max_tokens=2, ignore_eos=True)
                self.outcomes.append("OK")
            except RaylaneError as exc:
                self.outcomes.append(f"{exc.code.name}: {exc}")


def test_rotating_a_key_fails_no_request_and_retires_the_old_key_within_a_refresh(cluster):
    admin = cluster["admin"]
    old_id, old_key = admin.issue_key("rotor")
    old = Client(cluster["router"], old_key, timeout_s=120)
    errors: list[str] = []
    _wait(lambda: _succeeds(old, errors), 60, "the deployment routable with the old key", detail=lambda: errors[-3:])
    assert not any("UNAUTHENTICATED" in e for e in errors), errors  # a fresh key works on its first request

    # 1. Issue the new key and switch a client to it at once: its very first request must already pass.
    _, new_key = admin.issue_key("rotor")
    switched = _SwitchedClient(Client(cluster["router"], new_key, timeout_s=120))
    switched.start()
    _wait(
        lambda: switched.outcomes.count("OK") >= 3,
        60,
        "the switched client's first requests",
        detail=lambda: switched.outcomes[:5],
    )
    assert all(o == "OK" for o in switched.outcomes), switched.outcomes[:5]

    # 2. Streams opened with the old key just before the revoke.
    streams = [_Stream(Client(cluster["router"], old_key, timeout_s=120)) for _ in range(2)]
    for stream in streams:
        stream.start()
    for stream in streams:
        assert stream.started.wait(60) and stream.error is None

    # 3. Revoke the old key; a client still holding it is refused within one table refresh.
    revoked_at = time.monotonic()
    assert admin.revoke_key(old_id)
    refused_after = None
    while time.monotonic() - revoked_at < 30:
        try:
            old.complete(DEPLOYMENT, "hi", max_tokens=1)
        except AuthenticationError:
            refused_after = time.monotonic() - revoked_at
            break
        time.sleep(0.05)
    assert refused_after is not None, "the revoked key still worked 30 s later"
    assert refused_after < RouterConfig().table_refresh_s + REFUSAL_SLACK_S

    # 4. The old key's streams finish in full, having produced tokens after the revoke.
    for stream in streams:
        stream.join(120)
        assert not stream.is_alive() and stream.error is None, stream.error
        tokens = [t for _, chunk in stream.chunks for t in chunk.token_ids]
        assert len(tokens) == LONG_STREAM_TOKENS and stream.chunks[-1][1].finish_reason == "length"
        seqs = [chunk.seq for _, chunk in stream.chunks if chunk.token_ids]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # no duplicate, in order
        assert any(at > revoked_at for at, _ in stream.chunks)

    # 5. The switched client kept going across the whole rotation without a single failure.
    time.sleep(0.5)
    switched.stop.set()
    switched.join(60)
    assert switched.outcomes and all(o == "OK" for o in switched.outcomes), switched.outcomes
    actions = [(e.action, e.outcome) for e in admin.audit_events(limit=20)]
    assert ("IssueApiKey", "OK") in actions and ("RevokeApiKey", "OK") in actions
    old.close()
