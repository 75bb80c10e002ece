"""The admin API demands the admin token on every RPC; a tenant's API key never passes. Real gRPC server, real Redis."""

from __future__ import annotations

import asyncio
import stat
import threading
import uuid
from collections.abc import Iterator

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control_plane.admin import AdminServicer
from control_plane.admin_auth import (
    ADMIN_TOKEN_FILE,
    AdminAuthInterceptor,
    load_or_create_admin_token,
    redact_url,
)
from control_plane.admin_client import AdminClient
from control_plane.controller import Controller
from control_plane.spec import Quota, TenantSpec
from control_plane.state import StateStore
from protos.raylane.v1 import control_pb2, control_pb2_grpc
from router.client import AuthenticationError, UnavailableError
from router.grpc_server import start_grpc_server

SERVICE = control_pb2.DESCRIPTOR.services_by_name["ControlPlane"]
TOKEN = "admin-token-for-tests"


class _AdminServer:
    """The real AdminServicer behind the auth interceptor, on a grpc.aio server running in a thread of its own."""

    def __init__(self, store: StateStore, *, tls: tuple[str, str] | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        servicer = AdminServicer(Controller(store), lambda: ("admin", [], "redis://:hunter2@127.0.0.1:6379/0"))
        cert, key = tls or (None, None)
        start = start_grpc_server(
            lambda server: control_pb2_grpc.add_ControlPlaneServicer_to_server(servicer, server),
            SERVICE.full_name,
            "127.0.0.1",
            0,
            tls_cert_file=cert,
            tls_key_file=key,
            interceptors=[AdminAuthInterceptor(TOKEN)],
        )
        self.server, port = asyncio.run_coroutine_threadsafe(start, self._loop).result(30)
        self.address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def store(redis_server_url) -> StateStore:
    client = redis.Redis.from_url(redis_server_url, decode_responses=True)
    return StateStore(client, prefix=f"t{uuid.uuid4().hex}:")


@pytest.fixture
def admin_server(store) -> Iterator[_AdminServer]:
    server = _AdminServer(store)
    yield server
    server.stop()


def _call_every_rpc(address: str, metadata: tuple[tuple[str, str], ...]) -> dict[str, grpc.StatusCode]:
    """Each RPC of the service (from its descriptor: a new one is covered too) with an empty request."""
    codes = {}
    with grpc.insecure_channel(address) as channel:
        for method in SERVICE.methods:
            request_type = control_pb2.DESCRIPTOR.message_types_by_name[method.input_type.name]
            request_class = getattr(control_pb2, request_type.name)
            call = channel.unary_unary(
                f"/{SERVICE.full_name}/{method.name}",
                request_serializer=request_class.SerializeToString,
                response_deserializer=lambda data: data,
            )
            try:
                call(request_class(), metadata=metadata, timeout=10)
                codes[method.name] = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                codes[method.name] = exc.code()
    return codes


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer wrong-token"),),
        (("authorization", TOKEN),),  # the right secret without the Bearer scheme
        (("authorization", "Basic " + TOKEN),),
    ],
    ids=["none", "wrong", "no-scheme", "basic"],
)
def test_every_admin_rpc_refuses_a_caller_without_the_token(admin_server, metadata):
    codes = _call_every_rpc(admin_server.address, metadata)
    assert set(codes) == {m.name for m in SERVICE.methods} and len(codes) >= 13
    assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}


def test_a_tenant_api_key_is_no_admin_credential(admin_server, store):
    store.create_tenant(TenantSpec(name="acme"))
    _, api_key = store.issue_key("acme")
    codes = _call_every_rpc(admin_server.address, (("authorization", f"Bearer {api_key}"),))
    assert set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}
    assert store.get_tenant("acme") is not None  # nothing changed: not even DeleteTenant ran


def test_every_admin_rpc_passes_the_check_with_the_token(admin_server):
    codes = _call_every_rpc(admin_server.address, (("authorization", f"Bearer {TOKEN}"),))
    # Empty requests may be invalid, or name nothing, but none is refused for want of a credential.
    assert grpc.StatusCode.UNAUTHENTICATED not in codes.values()
    assert codes["ListDeployments"] == codes["ListTenants"] == codes["ClusterStatus"] == grpc.StatusCode.OK


def test_the_admin_client_works_with_the_token_and_sees_no_redis_password(admin_server):
    with AdminClient(admin_server.address, admin_token=TOKEN) as admin:
        admin.create_tenant(TenantSpec(name="beta", quota=Quota(max_concurrent=2, tokens_per_minute=1000)))
        assert [t.name for t in admin.list_tenants()] == ["beta"]
        assert admin.status().state_url == "redis://:***@127.0.0.1:6379/0"
    with AdminClient(admin_server.address, admin_token="not-it") as intruder, pytest.raises(AuthenticationError):
        intruder.issue_key("beta")


def test_health_checks_stay_open(admin_server):
    with grpc.insecure_channel(admin_server.address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_token_file_is_created_private_and_reused(tmp_path):
    token = load_or_create_admin_token(tmp_path)
    path = tmp_path / ADMIN_TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 40
    assert load_or_create_admin_token(tmp_path) == token  # a restart keeps it
    assert load_or_create_admin_token(tmp_path, token="given") == "given"
    secret = tmp_path / "mounted"
    secret.write_text("from-a-secret\n")
    assert load_or_create_admin_token(tmp_path, token_file=str(secret)) == "from-a-secret"
    secret.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_or_create_admin_token(tmp_path, token_file=str(secret))


def test_redact_url_hides_only_the_password():
    assert redact_url("redis://user:pw@redis:6379/0") == "redis://user:***@redis:6379/0"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("") == ""


def test_admin_over_tls_works_and_plaintext_fails(store, self_signed_tls):
    cert, key = self_signed_tls
    server = _AdminServer(store, tls=(cert, key))
    try:
        with AdminClient(server.address, admin_token=TOKEN, tls_ca_file=cert) as admin:
            assert admin.list_tenants() == []
        with AdminClient(server.address, admin_token=TOKEN, timeout_s=5) as plaintext, pytest.raises(UnavailableError):
            plaintext.list_tenants()
    finally:
        server.stop()


def test_tls_settings_go_in_pairs():
    from control_plane.config import ControlPlaneConfig
    from router.server import RouterConfig

    with pytest.raises(ValueError, match="go together"):
        ControlPlaneConfig(tls_cert_file="cert.pem")
    with pytest.raises(ValueError, match="go together"):
        RouterConfig(tls_key_file="key.pem")
    assert "s3cret" not in repr(ControlPlaneConfig(admin_token="s3cret"))


def test_the_cli_client_finds_the_token_in_the_state_dir_or_the_environment(admin_server, tmp_path, monkeypatch):
    from control_plane.admin_client import connect_admin

    monkeypatch.delenv("RAYLANE_ADMIN_TOKEN", raising=False)
    with pytest.raises(ValueError, match="RAYLANE_ADMIN_TOKEN"):
        connect_admin(admin_server.address, tmp_path)
    (tmp_path / ADMIN_TOKEN_FILE).write_text(TOKEN + "\n")
    with connect_admin(admin_server.address, tmp_path) as admin:
        assert admin.list_tenants() == []
    monkeypatch.setenv("RAYLANE_ADMIN_TOKEN", "stale")  # the environment wins over the file
    with connect_admin(admin_server.address, tmp_path) as admin, pytest.raises(AuthenticationError):
        admin.list_tenants()
