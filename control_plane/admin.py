"""The admin gRPC service (`raylane.v1.ControlPlane`): desired state in, cluster status out.

Writes go to the state store only; the reconcile loop makes the cluster follow. Every call
runs its blocking work (Redis, Ray) in a thread so the server's event loop stays responsive.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

import grpc
import redis

from control_plane import convert
from control_plane.admin_auth import redact_url
from control_plane.audit import ADMIN_PRINCIPAL, AUDITED_CALLS, AuditLog
from control_plane.controller import Controller, PoolInfo
from control_plane.spec import SpecError
from control_plane.state import AlreadyExistsError, ConflictError, NotFoundError, StateError
from protos.raylane.v1 import control_pb2, control_pb2_grpc
from router.auth_limit import peer_host
from router.servicer import MALFORMED, tolerant_parser
from workers.messages import MigrationReport

logger = logging.getLogger(__name__)

_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (ConflictError, grpc.StatusCode.ABORTED),
    (SpecError, grpc.StatusCode.INVALID_ARGUMENT),
    (StateError, grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
)
DEFAULT_AUDIT_LIMIT = 50
"""Audit entries `ListAuditEvents` returns when the request names no limit."""
MAX_AUDIT_LIMIT = 10_000
"""The most one `ListAuditEvents` returns (the log keeps as many)."""
STATE_DOWN_RETRY_MS = 1000
"""Retry hint sent while the state store is unreachable (the control plane restarts an embedded one within ~1 s)."""


async def _abort_state_unavailable(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    # Redis down is an outage the supervisor heals, not a bug: say so, and when to try again.
    logger.warning("admin call refused method=%s status=UNAVAILABLE reason=state store unreachable: %r", method, exc)
    context.set_trailing_metadata((("retry-after-ms", str(STATE_DOWN_RETRY_MS)),))
    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{method}: the state store is unreachable; retry shortly")


def _handled(method: Callable) -> Callable:
    """Run the call's body in a thread and turn known errors into status codes; never leak a traceback. A mutating
    call (`AUDITED_CALLS`) goes to the audit log with its outcome, whatever that is."""
    describe = AUDITED_CALLS.get(method.__name__)

    @functools.wraps(method)
    async def wrapper(self: AdminServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request is MALFORMED:
            logger.info("admin call refused method=%s status=INVALID_ARGUMENT reason=unparsable body", method.__name__)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method.__name__}: the request body does not parse")
        outcome, response = grpc.StatusCode.CANCELLED.name, None
        try:
            response = await asyncio.to_thread(method, self, request)
            outcome = "OK"
            return response
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            outcome = grpc.StatusCode.UNAVAILABLE.name
            await _abort_state_unavailable(context, method.__name__, exc)
        except Exception as exc:
            code = next((c for cls, c in _STATUS if isinstance(exc, cls)), None)
            outcome = (code or grpc.StatusCode.INTERNAL).name
            if code is None:
                logger.exception("admin call failed method=%s", method.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed: {type(exc).__name__}")
            logger.info("admin call refused method=%s status=%s reason=%s", method.__name__, code.name, exc)
            await context.abort(code, str(exc))
        finally:
            if describe is not None:
                details = describe(request, response)
                peer = peer_host(context.peer() or "")
                await asyncio.to_thread(
                    self.audit.record, method.__name__, peer=peer, principal=ADMIN_PRINCIPAL, outcome=outcome, **details
                )

    return wrapper


def pool_to_proto(info: PoolInfo) -> control_pb2.PoolInfo:
    workers = []
    for w in info.workers:
        message = control_pb2.WorkerInfo(worker_id=w.worker_id, role=w.role, state=w.state)
        if w.stats is not None:
            s = w.stats
            message.num_running = s.num_running
            message.num_waiting = s.num_waiting
            message.kv_blocks_used = s.kv_blocks_used
            message.kv_blocks_total = s.kv_blocks_total
            message.output_tokens_per_s = s.output_tokens_per_s
            message.adapters.extend(s.adapters)
            m = s.migration
            message.num_migrations_started = m.num_started
            message.num_migrations_committed = m.num_committed
            message.num_migrations_aborted = m.num_aborted
            message.migration_bytes_moved = m.bytes_moved
            message.migration_last_downtime_ms = m.last_downtime_ms
        message.draining = w.is_draining
        workers.append(message)
    return control_pb2.PoolInfo(
        deployment=info.deployment, role=info.role, desired_replicas=info.desired_replicas, workers=workers
    )


def migration_to_proto(report: MigrationReport) -> control_pb2.MigrationResult:
    return control_pb2.MigrationResult(
        request_id=report.request_id,
        source_id=report.source_id,
        destination_id=report.destination_id,
        outcome=report.outcome,
        reason=report.reason,
        num_stages=report.num_stages,
        num_blocks_copied=report.num_blocks_copied,
        bytes_moved=report.bytes_moved,
        downtime_ms=report.downtime_ms,
        total_ms=report.total_ms,
    )


def add_admin_servicer(servicer: AdminServicer, server: grpc.aio.Server) -> None:
    """`add_ControlPlaneServicer_to_server`, except that unparsable request bytes reach the method as `MALFORMED`
    (so they get INVALID_ARGUMENT, not grpc's UNKNOWN naming the parser's exception)."""
    service = control_pb2.DESCRIPTOR.services_by_name["ControlPlane"]
    handlers = {
        m.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, m.name),
            request_deserializer=tolerant_parser(getattr(control_pb2, m.input_type.name).FromString),
            response_serializer=getattr(control_pb2, m.output_type.name).SerializeToString,
        )
        for m in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class AdminServicer(control_pb2_grpc.ControlPlaneServicer):
    """`addresses()` returns (admin address, router addresses, state URL) for ClusterStatus."""

    def __init__(self, controller: Controller, addresses: Callable[[], tuple[str, list[str], str]]) -> None:
        self.controller = controller
        self.store = controller.store
        self._addresses = addresses
        self.audit = AuditLog(controller.store)
        """Where mutating calls are recorded; the auth interceptor records refusals in it too."""

    @_handled
    def ApplyDeployment(self, request):
        spec = convert.deployment_from_proto(request.spec)
        version = self.store.put_deployment(spec, expected_version=request.expected_version or None)
        self.store.append_event("deployment_applied", name=spec.name, version=version)
        logger.info("deployment applied name=%s version=%d pools=%s", spec.name, version, [p.role for p in spec.pools])
        return control_pb2.ApplyDeploymentResponse(version=version)

    @_handled
    def DeleteDeployment(self, request):
        deleted = self.store.delete_deployment(request.name)
        if deleted:
            self.store.append_event("deployment_deleted", name=request.name)
        return control_pb2.DeleteDeploymentResponse(deleted=deleted)

    @_handled
    def ListDeployments(self, request):
        specs = self.store.list_deployments()
        return control_pb2.ListDeploymentsResponse(deployments=[convert.deployment_to_proto(s) for s in specs])

    @_handled
    def ListPools(self, request):
        infos = self.controller.pool_infos(request.deployment)
        return control_pb2.ListPoolsResponse(pools=[pool_to_proto(i) for i in infos])

    @_handled
    def CreateTenant(self, request):
        tenant = convert.tenant_from_proto(request.tenant)
        self.store.create_tenant(tenant)
        self.store.append_event("tenant_created", name=tenant.name)
        return control_pb2.CreateTenantResponse()

    @_handled
    def DeleteTenant(self, request):
        return control_pb2.DeleteTenantResponse(deleted=self.store.delete_tenant(request.name))

    @_handled
    def ListTenants(self, request):
        return control_pb2.ListTenantsResponse(tenants=[convert.tenant_to_proto(t) for t in self.store.list_tenants()])

    @_handled
    def IssueApiKey(self, request):
        key_id, api_key = self.store.issue_key(request.tenant)
        self.store.append_event("key_issued", tenant=request.tenant, key_id=key_id)
        return control_pb2.IssueApiKeyResponse(key_id=key_id, api_key=api_key)

    @_handled
    def RevokeApiKey(self, request):
        revoked = self.store.revoke_key(request.key_id)
        if revoked:
            self.store.append_event("key_revoked", key_id=request.key_id)
        return control_pb2.RevokeApiKeyResponse(revoked=revoked)

    @_handled
    def RegisterAdapter(self, request):
        adapter = convert.adapter_from_proto(request.adapter)
        self.store.register_adapter(adapter)
        self.store.append_event("adapter_registered", name=adapter.name, tenant=adapter.tenant)
        return control_pb2.RegisterAdapterResponse()

    @_handled
    def ClusterStatus(self, request):
        admin, routers, state_url = self._addresses()
        infos = self.controller.pool_infos()
        workers = [w for info in infos for w in info.workers]
        stats = self.controller.stats
        return control_pb2.ClusterStatusResponse(
            router_addresses=routers,
            admin_address=admin,
            state_url=redact_url(state_url),
            num_deployments=len(self.store.list_deployments()),
            num_tenants=len(self.store.list_tenants()),
            num_workers=len(workers),
            num_healthy_workers=sum(w.state == "healthy" for w in workers),
            reconcile=control_pb2.ReconcileStats(
                num_loops=stats.num_loops,
                last_loop_ms=stats.last_loop_ms,
                num_errors=stats.num_errors,
                num_workers_replaced=stats.num_workers_replaced,
                num_rebalance_migrations=stats.num_rebalance_migrations,
                num_rebalance_committed=stats.num_rebalance_committed,
            ),
            pools=[pool_to_proto(i) for i in infos],
        )

    @_handled
    def Migrate(self, request):
        if not request.request_id:
            raise ValueError("request_id is required (as routers name it: <tenant>/<request id>)")
        report = self.controller.triggers.migrate(request.request_id, request.destination_worker_id)
        self.store.append_event(
            "request_migrated", request_id=report.request_id, destination=report.destination_id, outcome=report.outcome
        )
        return control_pb2.MigrateResponse(result=migration_to_proto(report))

    @_handled
    def Drain(self, request):
        if not request.worker_id:
            raise ValueError("worker_id is required")
        if request.timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0 (0: the default), got {request.timeout_s}")
        report = self.controller.triggers.drain(
            request.worker_id, scale_down=request.scale_down, timeout_s=request.timeout_s
        )
        return control_pb2.DrainResponse(
            migrations=[migration_to_proto(m) for m in report.migrations],
            num_remaining=report.num_remaining,
            stopped=report.stopped,
        )

    @_handled
    def ListAuditEvents(self, request):
        limit = request.limit or DEFAULT_AUDIT_LIMIT
        if limit > MAX_AUDIT_LIMIT:
            raise ValueError(f"limit must be <= {MAX_AUDIT_LIMIT}, got {limit}")
        return control_pb2.ListAuditEventsResponse(events=[audit_to_proto(e) for e in self.store.recent_audit(limit)])


def audit_to_proto(entry: dict) -> control_pb2.AuditEvent:
    fixed = ("ts", "action", "peer", "principal", "outcome")
    return control_pb2.AuditEvent(
        ts=float(entry.get("ts", 0.0)),
        action=str(entry.get("action", "")),
        peer=str(entry.get("peer", "")),
        principal=str(entry.get("principal", "")),
        outcome=str(entry.get("outcome", "")),
        details={k: str(v) for k, v in entry.items() if k not in fixed},
    )
