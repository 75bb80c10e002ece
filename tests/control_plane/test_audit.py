"""The admin audit log and the admin API's failed-authentication lockout, on a real admin gRPC server wired as the
control plane wires it (interceptor with limiter and audit log) over a real Redis; read back through the admin
client and the `raylane audit` command."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
import redis
from typer.testing import CliRunner

from control_plane import state as state_module
from control_plane.admin import AdminServicer
from control_plane.admin_auth import ADMIN_TOKEN_FILE, AdminAuthInterceptor
from control_plane.admin_client import AdminClient
from control_plane.cli import app
from control_plane.cluster import ClusterFile
from control_plane.controller import Controller
from control_plane.spec import AdapterSpec, DeploymentSpec, PoolSpec, Quota, TenantSpec
from control_plane.state import StateStore
from protos.raylane.v1 import control_pb2, control_pb2_grpc
from router.auth_limit import AuthFailureLimiter, AuthLimitConfig
from router.client import AuthenticationError, QuotaExceededError, RaylaneError
from router.grpc_server import start_grpc_server

TOKEN = "admin-token-for-the-audit-tests"
SERVICE = control_pb2.DESCRIPTOR.services_by_name["ControlPlane"]


class AuditedAdminServer:
    """`AdminServicer` behind `AdminAuthInterceptor(limiter=..., audit=servicer.audit)`, on its own loop thread."""

    def __init__(self, store: StateStore, *, max_failures: int = 3) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        servicer = AdminServicer(Controller(store), lambda: ("admin", [], "redis://127.0.0.1:6379/0"))
        self.limiter = AuthFailureLimiter(AuthLimitConfig(max_failures=max_failures, window_s=60), surface="admin")
        interceptor = AdminAuthInterceptor(TOKEN, limiter=self.limiter, audit=servicer.audit)
        start = start_grpc_server(
            lambda server: control_pb2_grpc.add_ControlPlaneServicer_to_server(servicer, server),
            SERVICE.full_name,
            "127.0.0.1",
            0,
            interceptors=[interceptor],
        )
        self.server, port = asyncio.run_coroutine_threadsafe(start, self._loop).result(30)
        self.address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def store(redis_server_url) -> Iterator[StateStore]:
    client = redis.Redis.from_url(redis_server_url, decode_responses=True)
    yield StateStore(client, prefix=f"t{uuid.uuid4().hex}:")
    client.close()


@pytest.fixture
def server(store) -> Iterator[AuditedAdminServer]:
    server = AuditedAdminServer(store)
    yield server
    server.stop()


def _outcome(call) -> str:
    try:
        call()
        return "OK"
    except RaylaneError as exc:
        return exc.code.name


def test_every_mutating_call_is_recorded_with_who_what_when_and_outcome(server, store, caplog):
    start = time.time()
    spec = DeploymentSpec(name="chat", model="/models/chat", pools=(PoolSpec(role="mixed", replicas=1),))
    with AdminClient(server.address, admin_token=TOKEN) as admin, caplog.at_level(logging.INFO):
        admin.create_tenant(TenantSpec(name="acme", quota=Quota(max_concurrent=2, tokens_per_minute=1000)))
        key_id, _ = admin.issue_key("acme")
        admin.apply_deployment(spec)
        admin.register_adapter(AdapterSpec(name="sql", path="/adapters/sql", tenant="acme", deployment="chat"))
        assert admin.revoke_key(key_id)
        migrate = _outcome(lambda: admin.migrate("acme/no-such-request"))
        drain = _outcome(lambda: admin.drain("no-such-worker"))
        assert admin.delete_deployment("chat")
        assert admin.delete_tenant("acme")
        admin.list_tenants()  # reads are not audited
        events = admin.audit_events(limit=100)

    assert [(e.action, e.outcome) for e in events] == [
        ("CreateTenant", "OK"),
        ("IssueApiKey", "OK"),
        ("ApplyDeployment", "OK"),
        ("RegisterAdapter", "OK"),
        ("RevokeApiKey", "OK"),
        ("Migrate", migrate),
        ("Drain", drain),
        ("DeleteDeployment", "OK"),
        ("DeleteTenant", "OK"),
    ]
    assert migrate != "OK" and drain != "OK"  # refused calls are recorded with their status
    assert {(e.peer, e.principal) for e in events} == {("127.0.0.1", "admin-token")}
    assert all(start - 1 <= e.ts <= time.time() + 1 for e in events)
    details = {e.action: dict(e.details) for e in events}
    assert details["IssueApiKey"] == {"tenant": "acme", "key_id": key_id}
    assert details["RevokeApiKey"] == {"key_id": key_id}
    assert details["ApplyDeployment"]["deployment"] == "chat"
    assert details["RegisterAdapter"] == {"adapter": "sql", "tenant": "acme", "deployment": "chat"}
    assert details["Drain"] == {"worker_id": "no-such-worker", "scale_down": "false"}
    # The same entries are in Redis, and each one is a log line.
    assert [e["action"] for e in store.recent_audit(100)] == [e.action for e in events]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("admin audit action=")]
    assert len(lines) == len(events)
    assert (
        f"admin audit action=IssueApiKey peer=127.0.0.1 principal=admin-token outcome=OK key_id={key_id} tenant=acme"
        in lines
    )


def test_refused_admin_calls_are_recorded_and_lock_the_address_out(server, store):
    with AdminClient(server.address, admin_token="not-the-token") as intruder:
        for _ in range(3):
            with pytest.raises(AuthenticationError):
                intruder.issue_key("acme")
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as no_token:
        control_pb2_grpc.ControlPlaneStub(channel).ListTenants(control_pb2.ListTenantsRequest(), timeout=10)
    # The lockout holds for the right token too, with a retry hint.
    assert no_token.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with AdminClient(server.address, admin_token=TOKEN) as admin:
        with pytest.raises(QuotaExceededError) as locked:
            admin.create_tenant(TenantSpec(name="acme"))
        assert locked.value.retry_after_s == pytest.approx(60, abs=1)
        assert store.get_tenant("acme") is None  # refused before it ran

    entries = store.recent_audit(100)
    assert [(e["action"], e["principal"], e["outcome"]) for e in entries] == [
        ("IssueApiKey", "wrong-token", "UNAUTHENTICATED"),
        ("IssueApiKey", "wrong-token", "UNAUTHENTICATED"),
        ("IssueApiKey", "wrong-token", "UNAUTHENTICATED"),
        ("auth_lockout", "wrong-token", "RESOURCE_EXHAUSTED"),
        # The no-token call while locked out is only logged; the admin's own refused call is stored.
        ("CreateTenant", "admin-token", "RESOURCE_EXHAUSTED"),
    ]
    assert {e["peer"] for e in entries} == {"127.0.0.1"}


def test_a_missing_credential_is_recorded_as_principal_none(server, store):
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as refused:
        control_pb2_grpc.ControlPlaneStub(channel).DeleteTenant(control_pb2.DeleteTenantRequest(name="x"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    [entry] = store.recent_audit(10)
    assert (entry["action"], entry["principal"], entry["outcome"]) == ("DeleteTenant", "none", "UNAUTHENTICATED")


def test_the_audit_log_is_bounded(store, monkeypatch):
    monkeypatch.setattr(state_module, "AUDIT_LOG_CAP", 5)
    for i in range(12):
        store.append_audit("CreateTenant", peer="127.0.0.1", principal="admin-token", outcome="OK", tenant=f"t{i}")
    entries = store.recent_audit(100)
    assert [e["tenant"] for e in entries] == [f"t{i}" for i in range(7, 12)]
    assert store.client.llen(f"{store.prefix}audit") == 5


def test_audit_fields_are_checked(store):
    with pytest.raises(ValueError, match="not named ts, kind or action"):
        store.append_audit("CreateTenant", ts="now")
    with pytest.raises(ValueError, match="non-empty"):
        store.append_audit("")


def test_raylane_audit_prints_the_newest_entries(server, tmp_path, monkeypatch):
    monkeypatch.delenv("RAYLANE_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("RAYLANE_TLS_CA_FILE", raising=False)
    ClusterFile(
        admin_address=server.address, router_addresses=[], state_url="", ray_address="", started_ray=False
    ).save(tmp_path)
    (tmp_path / ADMIN_TOKEN_FILE).write_text(TOKEN + "\n")
    with AdminClient(server.address, admin_token=TOKEN) as admin:
        for name in ("alpha", "beta", "gamma"):
            admin.create_tenant(TenantSpec(name=name))
    runner = CliRunner()
    result = runner.invoke(app, ["audit", "--limit", "2", "--json", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(e["action"], e["tenant"], e["outcome"]) for e in entries] == [
        ("CreateTenant", "beta", "OK"),
        ("CreateTenant", "gamma", "OK"),
    ]
    table = runner.invoke(app, ["audit", "--state-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "tenant=alpha" in table.stdout and "admin-token" in table.stdout


def _every_stored_string(store: StateStore) -> str:
    """Every key name and value under the store's prefix, whatever its Redis type, as one text."""
    client = store.client
    parts = []
    for key in client.scan_iter(match=f"{store.prefix}*"):
        parts.append(key)
        kind = client.type(key)
        if kind == "string":
            parts.append(client.get(key))
        elif kind == "hash":
            parts.extend(f"{k}={v}" for k, v in client.hgetall(key).items())
        elif kind == "list":
            parts.extend(client.lrange(key, 0, -1))
        elif kind == "set":
            parts.extend(client.smembers(key))
        else:
            raise AssertionError(f"unexpected Redis type {kind} at {key}")
    return "\n".join(parts)


def test_api_keys_are_stored_only_as_hashes_anywhere_in_redis(server, store):
    from control_plane.controller import routing_table
    from control_plane.state import hash_key

    with AdminClient(server.address, admin_token=TOKEN) as admin:
        admin.create_tenant(TenantSpec(name="acme"))
        issued = [admin.issue_key("acme") for _ in range(3)]
        admin.revoke_key(issued[0][0])
    operator_key = "operator-chosen-key-" + uuid.uuid4().hex
    store.add_key("acme", operator_key)
    plaintexts = [key for _, key in issued] + [operator_key]

    stored = _every_stored_string(store)
    assert f"{store.prefix}audit" in stored and f"{store.prefix}events" in stored  # the logs were searched too
    for plaintext in plaintexts:
        secret = plaintext.rsplit("-", 1)[-1]  # the random part alone must not leak either
        assert plaintext not in stored and secret not in stored
    for plaintext in plaintexts[1:]:
        assert hash_key(plaintext) in stored
    # Routers get hashes only, and resolve a key by hashing what the client sent.
    table = routing_table(store.snapshot())
    assert all(len(h) == 64 and set(h) <= set("0123456789abcdef") for h in table.key_hashes)
    assert table.tenant_for_key(plaintexts[1]) == "acme"
    assert table.tenant_for_key(plaintexts[0]) is None  # revoked
    assert table.tenant_for_key(plaintexts[1][:-1] + "x") is None


def test_the_cluster_config_carries_the_lockout_settings(monkeypatch):
    from control_plane.config import ControlPlaneConfig

    monkeypatch.setenv("RAYLANE_AUTH_LIMIT__MAX_FAILURES", "4")
    config = ControlPlaneConfig.load(auth_limit={"window_s": 15.0})
    assert config.auth_limit == AuthLimitConfig(max_failures=4, window_s=15.0)
    with pytest.raises(ValueError, match=r"auth_limit\.max_failures: max_failures must be an integer >= 0"):
        ControlPlaneConfig.from_dict({"auth_limit": {"max_failures": -2}})
