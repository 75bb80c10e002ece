from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PoolSpec(_message.Message):
    __slots__ = ("role", "replicas", "num_cpus", "num_gpus")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    NUM_CPUS_FIELD_NUMBER: _ClassVar[int]
    NUM_GPUS_FIELD_NUMBER: _ClassVar[int]
    role: str
    replicas: int
    num_cpus: float
    num_gpus: float
    def __init__(self, role: _Optional[str] = ..., replicas: _Optional[int] = ..., num_cpus: _Optional[float] = ..., num_gpus: _Optional[float] = ...) -> None: ...

class EngineOptions(_message.Message):
    __slots__ = ("block_size", "kv_cache_bytes", "max_num_batched_tokens", "max_num_seqs", "max_loras", "max_lora_rank", "enable_prefix_caching", "short_prompt_tokens")
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_LORAS_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    ENABLE_PREFIX_CACHING_FIELD_NUMBER: _ClassVar[int]
    SHORT_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    block_size: int
    kv_cache_bytes: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_loras: int
    max_lora_rank: int
    enable_prefix_caching: bool
    short_prompt_tokens: int
    def __init__(self, block_size: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., max_loras: _Optional[int] = ..., max_lora_rank: _Optional[int] = ..., enable_prefix_caching: _Optional[bool] = ..., short_prompt_tokens: _Optional[int] = ...) -> None: ...

class SloTargets(_message.Message):
    __slots__ = ("ttft_ms_p99", "tpot_ms_p99")
    TTFT_MS_P99_FIELD_NUMBER: _ClassVar[int]
    TPOT_MS_P99_FIELD_NUMBER: _ClassVar[int]
    ttft_ms_p99: float
    tpot_ms_p99: float
    def __init__(self, ttft_ms_p99: _Optional[float] = ..., tpot_ms_p99: _Optional[float] = ...) -> None: ...

class AdapterSpec(_message.Message):
    __slots__ = ("name", "path", "tenant", "deployment")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    tenant: str
    deployment: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., tenant: _Optional[str] = ..., deployment: _Optional[str] = ...) -> None: ...

class DeploymentSpec(_message.Message):
    __slots__ = ("name", "model", "dtype", "pools", "adapters", "engine", "slo", "group", "tier")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    dtype: str
    pools: _containers.RepeatedCompositeFieldContainer[PoolSpec]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterSpec]
    engine: EngineOptions
    slo: SloTargets
    group: str
    tier: str
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., dtype: _Optional[str] = ..., pools: _Optional[_Iterable[_Union[PoolSpec, _Mapping]]] = ..., adapters: _Optional[_Iterable[_Union[AdapterSpec, _Mapping]]] = ..., engine: _Optional[_Union[EngineOptions, _Mapping]] = ..., slo: _Optional[_Union[SloTargets, _Mapping]] = ..., group: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

class ApplyDeploymentRequest(_message.Message):
    __slots__ = ("spec", "expected_version")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    spec: DeploymentSpec
    expected_version: int
    def __init__(self, spec: _Optional[_Union[DeploymentSpec, _Mapping]] = ..., expected_version: _Optional[int] = ...) -> None: ...

class ApplyDeploymentResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class DeleteDeploymentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteDeploymentResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class ListDeploymentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDeploymentsResponse(_message.Message):
    __slots__ = ("deployments",)
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[DeploymentSpec]
    def __init__(self, deployments: _Optional[_Iterable[_Union[DeploymentSpec, _Mapping]]] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "role", "state", "num_running", "num_waiting", "kv_blocks_used", "kv_blocks_total", "output_tokens_per_s", "adapters", "num_migrations_started", "num_migrations_committed", "num_migrations_aborted", "migration_bytes_moved", "migration_last_downtime_ms", "draining")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NUM_MIGRATIONS_STARTED_FIELD_NUMBER: _ClassVar[int]
    NUM_MIGRATIONS_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    NUM_MIGRATIONS_ABORTED_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_LAST_DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: str
    state: str
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    output_tokens_per_s: float
    adapters: _containers.RepeatedScalarFieldContainer[str]
    num_migrations_started: int
    num_migrations_committed: int
    num_migrations_aborted: int
    migration_bytes_moved: int
    migration_last_downtime_ms: float
    draining: bool
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[str] = ..., state: _Optional[str] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., output_tokens_per_s: _Optional[float] = ..., adapters: _Optional[_Iterable[str]] = ..., num_migrations_started: _Optional[int] = ..., num_migrations_committed: _Optional[int] = ..., num_migrations_aborted: _Optional[int] = ..., migration_bytes_moved: _Optional[int] = ..., migration_last_downtime_ms: _Optional[float] = ..., draining: _Optional[bool] = ...) -> None: ...

class PoolInfo(_message.Message):
    __slots__ = ("deployment", "role", "desired_replicas", "workers")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DESIRED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    role: str
    desired_replicas: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, deployment: _Optional[str] = ..., role: _Optional[str] = ..., desired_replicas: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class ListPoolsRequest(_message.Message):
    __slots__ = ("deployment",)
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    def __init__(self, deployment: _Optional[str] = ...) -> None: ...

class ListPoolsResponse(_message.Message):
    __slots__ = ("pools",)
    POOLS_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[PoolInfo]
    def __init__(self, pools: _Optional[_Iterable[_Union[PoolInfo, _Mapping]]] = ...) -> None: ...

class Quota(_message.Message):
    __slots__ = ("max_concurrent", "tokens_per_minute", "burst_tokens")
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    BURST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_concurrent: int
    tokens_per_minute: int
    burst_tokens: int
    def __init__(self, max_concurrent: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., burst_tokens: _Optional[int] = ...) -> None: ...

class Tenant(_message.Message):
    __slots__ = ("name", "quota")
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    name: str
    quota: Quota
    def __init__(self, name: _Optional[str] = ..., quota: _Optional[_Union[Quota, _Mapping]] = ...) -> None: ...

class CreateTenantRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: Tenant
    def __init__(self, tenant: _Optional[_Union[Tenant, _Mapping]] = ...) -> None: ...

class CreateTenantResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeleteTenantRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteTenantResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants",)
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[Tenant]
    def __init__(self, tenants: _Optional[_Iterable[_Union[Tenant, _Mapping]]] = ...) -> None: ...

class IssueApiKeyRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class IssueApiKeyResponse(_message.Message):
    __slots__ = ("key_id", "api_key")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    api_key: str
    def __init__(self, key_id: _Optional[str] = ..., api_key: _Optional[str] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class RevokeApiKeyResponse(_message.Message):
    __slots__ = ("revoked",)
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: bool
    def __init__(self, revoked: _Optional[bool] = ...) -> None: ...

class RegisterAdapterRequest(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterSpec
    def __init__(self, adapter: _Optional[_Union[AdapterSpec, _Mapping]] = ...) -> None: ...

class RegisterAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MigrationResult(_message.Message):
    __slots__ = ("request_id", "source_id", "destination_id", "outcome", "reason", "num_stages", "num_blocks_copied", "bytes_moved", "downtime_ms", "total_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_COPIED_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    source_id: str
    destination_id: str
    outcome: str
    reason: str
    num_stages: int
    num_blocks_copied: int
    bytes_moved: int
    downtime_ms: float
    total_ms: float
    def __init__(self, request_id: _Optional[str] = ..., source_id: _Optional[str] = ..., destination_id: _Optional[str] = ..., outcome: _Optional[str] = ..., reason: _Optional[str] = ..., num_stages: _Optional[int] = ..., num_blocks_copied: _Optional[int] = ..., bytes_moved: _Optional[int] = ..., downtime_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class MigrateRequest(_message.Message):
    __slots__ = ("request_id", "destination_worker_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    destination_worker_id: str
    def __init__(self, request_id: _Optional[str] = ..., destination_worker_id: _Optional[str] = ...) -> None: ...

class MigrateResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: MigrationResult
    def __init__(self, result: _Optional[_Union[MigrationResult, _Mapping]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("worker_id", "scale_down", "timeout_s")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SCALE_DOWN_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    scale_down: bool
    timeout_s: float
    def __init__(self, worker_id: _Optional[str] = ..., scale_down: _Optional[bool] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("migrations", "num_remaining", "stopped")
    MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_REMAINING_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    migrations: _containers.RepeatedCompositeFieldContainer[MigrationResult]
    num_remaining: int
    stopped: bool
    def __init__(self, migrations: _Optional[_Iterable[_Union[MigrationResult, _Mapping]]] = ..., num_remaining: _Optional[int] = ..., stopped: _Optional[bool] = ...) -> None: ...

class ClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReconcileStats(_message.Message):
    __slots__ = ("num_loops", "last_loop_ms", "num_errors", "num_workers_replaced", "num_rebalance_migrations", "num_rebalance_committed")
    NUM_LOOPS_FIELD_NUMBER: _ClassVar[int]
    LAST_LOOP_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_ERRORS_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_REPLACED_FIELD_NUMBER: _ClassVar[int]
    NUM_REBALANCE_MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_REBALANCE_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    num_loops: int
    last_loop_ms: float
    num_errors: int
    num_workers_replaced: int
    num_rebalance_migrations: int
    num_rebalance_committed: int
    def __init__(self, num_loops: _Optional[int] = ..., last_loop_ms: _Optional[float] = ..., num_errors: _Optional[int] = ..., num_workers_replaced: _Optional[int] = ..., num_rebalance_migrations: _Optional[int] = ..., num_rebalance_committed: _Optional[int] = ...) -> None: ...

class ClusterStatusResponse(_message.Message):
    __slots__ = ("router_addresses", "admin_address", "state_url", "num_deployments", "num_tenants", "num_workers", "num_healthy_workers", "reconcile", "pools")
    ROUTER_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    ADMIN_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_URL_FIELD_NUMBER: _ClassVar[int]
    NUM_DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    NUM_TENANTS_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    NUM_HEALTHY_WORKERS_FIELD_NUMBER: _ClassVar[int]
    RECONCILE_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    router_addresses: _containers.RepeatedScalarFieldContainer[str]
    admin_address: str
    state_url: str
    num_deployments: int
    num_tenants: int
    num_workers: int
    num_healthy_workers: int
    reconcile: ReconcileStats
    pools: _containers.RepeatedCompositeFieldContainer[PoolInfo]
    def __init__(self, router_addresses: _Optional[_Iterable[str]] = ..., admin_address: _Optional[str] = ..., state_url: _Optional[str] = ..., num_deployments: _Optional[int] = ..., num_tenants: _Optional[int] = ..., num_workers: _Optional[int] = ..., num_healthy_workers: _Optional[int] = ..., reconcile: _Optional[_Union[ReconcileStats, _Mapping]] = ..., pools: _Optional[_Iterable[_Union[PoolInfo, _Mapping]]] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("ts", "action", "peer", "principal", "outcome", "details")
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    ts: float
    action: str
    peer: str
    principal: str
    outcome: str
    details: _containers.ScalarMap[str, str]
    def __init__(self, ts: _Optional[float] = ..., action: _Optional[str] = ..., peer: _Optional[str] = ..., principal: _Optional[str] = ..., outcome: _Optional[str] = ..., details: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ...) -> None: ...
