"""A blocking client for the admin service, used by the CLI and the demo."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from control_plane import convert
from control_plane.admin_auth import ADMIN_TOKEN_FILE, admin_token_for, read_admin_token
from control_plane.config import ControlPlaneConfig, admin_token_from_env, tls_ca_file_from_env
from control_plane.spec import AdapterSpec, DeploymentSpec, TenantSpec
from protos.raylane.v1 import control_pb2, control_pb2_grpc
from router.client import open_channel, translate_error

T = TypeVar("T")


def connect_admin(address: str, state_dir: Path, *, timeout_s: float = 30.0) -> AdminClient:
    """An admin client the CLI's way: the token from `RAYLANE_ADMIN_TOKEN`, else `<state_dir>/admin-token`; TLS
    when `RAYLANE_TLS_CA_FILE` names the CA to trust."""
    token = admin_token_from_env()
    if token is None:
        path = state_dir.expanduser() / ADMIN_TOKEN_FILE
        if not path.is_file():
            raise ValueError(f"no admin token: {path} does not exist here; set RAYLANE_ADMIN_TOKEN")
        token = read_admin_token(path)
    return AdminClient(address, admin_token=token, timeout_s=timeout_s, tls_ca_file=tls_ca_file_from_env())


def admin_client_for(config: ControlPlaneConfig, address: str, *, timeout_s: float = 30.0) -> AdminClient:
    """A client of the control plane this process started with `config` (on this node, sharing its state dir)."""
    tls_ca_file = tls_ca_file_from_env() or config.tls_cert_file
    return AdminClient(address, admin_token=admin_token_for(config), timeout_s=timeout_s, tls_ca_file=tls_ca_file)


class AdminClient:
    """Typed calls to `raylane.v1.ControlPlane`; failures raise `router.client.RaylaneError` subclasses."""

    def __init__(
        self, address: str, *, admin_token: str, timeout_s: float = 30.0, tls_ca_file: str | None = None
    ) -> None:
        if not admin_token:
            raise ValueError(
                "an admin token is required (`<state_dir>/admin-token`, --admin-token or RAYLANE_ADMIN_TOKEN)"
            )
        self.address = address
        self._channel = open_channel(address, tls_ca_file)
        self._stub = control_pb2_grpc.ControlPlaneStub(self._channel)
        self._metadata = (("authorization", f"Bearer {admin_token}"),)
        self.timeout_s = timeout_s

    def _call(self, rpc: Callable[..., T], request: Any) -> T:
        try:
            return rpc(request, metadata=self._metadata, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise translate_error(exc) from None

    def apply_deployment(self, spec: DeploymentSpec, expected_version: int = 0) -> int:
        request = control_pb2.ApplyDeploymentRequest(
            spec=convert.deployment_to_proto(spec), expected_version=expected_version
        )
        return self._call(self._stub.ApplyDeployment, request).version

    def delete_deployment(self, name: str) -> bool:
        return self._call(self._stub.DeleteDeployment, control_pb2.DeleteDeploymentRequest(name=name)).deleted

    def list_deployments(self) -> list[DeploymentSpec]:
        response = self._call(self._stub.ListDeployments, control_pb2.ListDeploymentsRequest())
        return [convert.deployment_from_proto(d) for d in response.deployments]

    def list_pools(self, deployment: str = "") -> list[control_pb2.PoolInfo]:
        return list(self._call(self._stub.ListPools, control_pb2.ListPoolsRequest(deployment=deployment)).pools)

    def create_tenant(self, tenant: TenantSpec) -> None:
        request = control_pb2.CreateTenantRequest(tenant=convert.tenant_to_proto(tenant))
        self._call(self._stub.CreateTenant, request)

    def delete_tenant(self, name: str) -> bool:
        return self._call(self._stub.DeleteTenant, control_pb2.DeleteTenantRequest(name=name)).deleted

    def list_tenants(self) -> list[TenantSpec]:
        response = self._call(self._stub.ListTenants, control_pb2.ListTenantsRequest())
        return [convert.tenant_from_proto(t) for t in response.tenants]

    def issue_key(self, tenant: str) -> tuple[str, str]:
        """(key id, API key); the key is shown only now."""
        response = self._call(self._stub.IssueApiKey, control_pb2.IssueApiKeyRequest(tenant=tenant))
        return response.key_id, response.api_key

    def revoke_key(self, key_id: str) -> bool:
        return self._call(self._stub.RevokeApiKey, control_pb2.RevokeApiKeyRequest(key_id=key_id)).revoked

    def register_adapter(self, adapter: AdapterSpec) -> None:
        request = control_pb2.RegisterAdapterRequest(adapter=convert.adapter_to_proto(adapter))
        self._call(self._stub.RegisterAdapter, request)

    def migrate(self, request_id: str, destination_worker_id: str = "") -> control_pb2.MigrationResult:
        """Move a running request live; empty destination lets the control plane pick one."""
        request = control_pb2.MigrateRequest(request_id=request_id, destination_worker_id=destination_worker_id)
        return self._call(self._stub.Migrate, request).result

    def drain(self, worker_id: str, *, scale_down: bool = False, timeout_s: float = 0.0) -> control_pb2.DrainResponse:
        """Move every request off a worker, then stop it (blocks until done; mind the client timeout)."""
        request = control_pb2.DrainRequest(worker_id=worker_id, scale_down=scale_down, timeout_s=timeout_s)
        return self._call(self._stub.Drain, request)

    def audit_events(self, limit: int = 50) -> list[control_pb2.AuditEvent]:
        """The newest `limit` admin-audit entries, oldest first (mutating calls and refused ones)."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        return list(self._call(self._stub.ListAuditEvents, control_pb2.ListAuditEventsRequest(limit=limit)).events)

    def status(self) -> control_pb2.ClusterStatusResponse:
        return self._call(self._stub.ClusterStatus, control_pb2.ClusterStatusRequest())

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
