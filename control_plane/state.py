"""The control plane's state in Redis: deployments, tenants, API keys, adapters and an event log.

Layout (all under the prefix, `raylane:` by default):
  version              STRING  global counter, +1 on every state write; routers cache snapshots by it
  deployments          HASH    name -> DeploymentSpec JSON
  deployment_versions  HASH    name -> per-deployment version; kept after a delete so versions never repeat
  tenants              HASH    name -> TenantSpec JSON
  key_hashes           HASH    sha256(plaintext key) -> tenant
  key_ids              HASH    key id -> {"tenant", "hash"} JSON
  adapters             HASH    "<deployment>/<name>" -> AdapterSpec JSON
  events               LIST    event JSON, oldest first, capped at EVENT_LOG_CAP
  audit                LIST    admin-call JSON (who, what, when, outcome), oldest first, capped at AUDIT_LOG_CAP

Writes are optimistic: WATCH the keys involved and the version key, read, MULTI, write, INCR version,
EXEC; a WatchError retries a few times, then raises ConflictError. Invariants kept by every write:
each inline adapter of a deployment is also registered, and every adapter's tenant and deployment exist.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import redis
from redis.client import Pipeline

from control_plane.spec import AdapterSpec, DeploymentSpec, SpecError, TenantSpec
from workers import faults

logger = logging.getLogger(__name__)

EVENT_LOG_CAP = 1000
AUDIT_LOG_CAP = 10_000
"""Admin calls kept; a list of its own, so reconcile events never push admin actions out (nor the reverse)."""
KEY_PREFIX = "rl-"

T = TypeVar("T")
Writer = Callable[[Pipeline], None]


class StateError(ValueError):
    """A state-store request that cannot be carried out."""


class NotFoundError(StateError):
    """The named deployment, tenant, key or adapter does not exist."""


class AlreadyExistsError(StateError):
    """The object to create exists already (or its name is taken by another tenant)."""


class ConflictError(StateError):
    """A stale expected_version, or concurrent writers kept winning the race."""


MIN_OPERATOR_KEY_LENGTH = 16
"""Shortest key `add_key` accepts: operator-chosen keys must still resist guessing."""


def hash_key(plaintext: str) -> str:
    """The stored form of an API key. Keys carry 256 random bits, so a fast hash is enough."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class StateSnapshot:
    """A consistent read of the whole store, taken in one MULTI/EXEC."""

    version: int
    """The global version the snapshot was taken at."""
    deployments: dict[str, DeploymentSpec]
    """Deployments by name."""
    tenants: dict[str, TenantSpec]
    """Tenants by name."""
    key_hashes: dict[str, str]
    """sha256 hex of each API key -> tenant name."""
    adapters: dict[tuple[str, str], AdapterSpec]
    """(deployment, adapter name) -> adapter, inline and separately registered alike."""

    def resolve_key(self, plaintext: str) -> str | None:
        """The tenant owning an API key, or None."""
        return self.key_hashes.get(hash_key(plaintext))


def _text(value: Any) -> str:
    # Works with clients made with or without decode_responses.
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _check_event_fields(fields: dict[str, Any]) -> None:
    for key, value in fields.items():
        if key in ("ts", "kind", "action") or isinstance(value, bool) or not isinstance(value, str | int | float):
            raise StateError(
                f"event field {key!r}: must be a str, int or float (and not named ts, kind or action), got {value!r}"
            )


def _adapter_field(deployment: str, name: str) -> str:
    # Names cannot contain '/', so the pair splits back unambiguously.
    return f"{deployment}/{name}"


class StateStore:
    """Typed access to the control plane's Redis state. Thread-safe: each call uses its own connection."""

    max_attempts = 6
    """Tries of one optimistic write before ConflictError."""

    def __init__(self, client: redis.Redis, *, prefix: str = "raylane:") -> None:
        self._client = client
        self._prefix = prefix
        self._init_keys()

    def _init_keys(self) -> None:
        p = self._prefix
        self._k_version = f"{p}version"
        self._k_deployments = f"{p}deployments"
        self._k_deployment_versions = f"{p}deployment_versions"
        self._k_tenants = f"{p}tenants"
        self._k_key_hashes = f"{p}key_hashes"
        self._k_key_ids = f"{p}key_ids"
        self._k_adapters = f"{p}adapters"
        self._k_events = f"{p}events"
        self._k_audit = f"{p}audit"

    @classmethod
    def from_url(cls, url: str) -> StateStore:
        """A store on the Redis at `url` (redis://, rediss:// or unix://)."""
        return cls(redis.Redis.from_url(url, decode_responses=True))

    @property
    def client(self) -> redis.Redis:
        """The underlying Redis client."""
        return self._client

    @property
    def prefix(self) -> str:
        """Prefix of every key this store owns (`raylane:` by default)."""
        return self._prefix

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def version(self) -> int:
        return int(self._client.get(self._k_version) or 0)

    # ---- the optimistic write loop ---------------------------------------------------------------

    def _transact(self, op: str, watch: tuple[str, ...], plan: Callable[[Pipeline], tuple[T, Writer | None]]) -> T:
        """Run `plan` (reads, then a writer or None for no change) under WATCH, until EXEC succeeds."""
        for attempt in range(self.max_attempts):
            with self._client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self._k_version, *watch)
                    result, writer = plan(pipe)
                    if writer is None:
                        return result
                    pipe.multi()
                    writer(pipe)
                    pipe.incr(self._k_version)
                    faults.hit("state_write", redis.ConnectionError)
                    pipe.execute()
                    return result
                except redis.WatchError:
                    logger.info("state write raced op=%s attempt=%d", op, attempt + 1)
            # Jittered backoff so two writers that keep colliding drift apart.
            time.sleep(random.uniform(0, 0.002 * 2**attempt))
        logger.warning("state write gave up op=%s attempts=%d", op, self.max_attempts)
        raise ConflictError(
            f"{op}: concurrent writers kept changing the state; gave up after {self.max_attempts} tries"
        )

    def _event(self, pipe: Pipeline, kind: str, **fields: str | int | float) -> None:
        pipe.rpush(self._k_events, _dumps({**fields, "ts": time.time(), "kind": kind}))
        pipe.ltrim(self._k_events, -EVENT_LOG_CAP, -1)

    # ---- typed reads (used inside and outside transactions) ---------------------------------------

    def _decode(self, kind: Callable[[Any], T], key: str, raw: Any) -> T:
        try:
            return kind(json.loads(_text(raw)))
        except (ValueError, SpecError) as err:
            raise StateError(f"corrupt record {key}: {err}") from err

    def _read_deployment(self, conn: Any, name: str) -> DeploymentSpec | None:
        raw = conn.hget(self._k_deployments, name)
        return None if raw is None else self._decode(DeploymentSpec.from_dict, f"{self._k_deployments}[{name}]", raw)

    def _decode_all(self, kind: Callable[[Any], T], key: str, raw: dict) -> dict[str, T]:
        return {_text(k): self._decode(kind, f"{key}[{_text(k)}]", v) for k, v in raw.items()}

    def _read_all(self, conn: Any, key: str, kind: Callable[[Any], T]) -> dict[str, T]:
        return self._decode_all(kind, key, conn.hgetall(key))

    def _read_adapters(self, conn: Any, raw: dict | None = None) -> dict[tuple[str, str], AdapterSpec]:
        raw = conn.hgetall(self._k_adapters) if raw is None else raw
        adapters = self._decode_all(AdapterSpec.from_dict, self._k_adapters, raw)
        return {(a.deployment, a.name): a for a in adapters.values()}

    def _read_key_records(self, conn: Any) -> dict[str, dict[str, str]]:
        return {_text(k): json.loads(_text(v)) for k, v in conn.hgetall(self._k_key_ids).items()}

    # ---- deployments --------------------------------------------------------------------------------

    def put_deployment(self, spec: DeploymentSpec, *, expected_version: int | None = None) -> int:
        """Create or replace a deployment and register its inline adapters; returns its new version.

        expected_version: None writes unconditionally; 0 means "must not exist yet"; n means "must be
        at version n". A mismatch raises ConflictError. Inline adapters dropped from the spec are
        unregistered; adapters registered separately are kept.
        """
        if not isinstance(spec, DeploymentSpec):
            raise StateError(f"put_deployment: expected a DeploymentSpec, got {type(spec).__name__}")

        def plan(pipe: Pipeline) -> tuple[int, Writer]:
            old = self._read_deployment(pipe, spec.name)
            current = int(pipe.hget(self._k_deployment_versions, spec.name) or 0)
            if expected_version is not None:
                actual = current if old is not None else 0
                if actual != expected_version:
                    raise ConflictError(
                        f"deployment {spec.name!r} is at version {actual}, not the expected {expected_version}; "
                        "re-read it and apply the change again"
                    )
            adapters = self._read_adapters(pipe)
            for i, adapter in enumerate(spec.adapters):
                if pipe.hget(self._k_tenants, adapter.tenant) is None:
                    raise NotFoundError(f"adapters[{i}].tenant: tenant {adapter.tenant!r} does not exist")
                owner = adapters.get((spec.name, adapter.name))
                if owner is not None and owner.tenant != adapter.tenant:
                    raise AlreadyExistsError(
                        f"adapters[{i}].name: adapter {adapter.name!r} on {spec.name!r} belongs to tenant "
                        f"{owner.tenant!r}"
                    )
            kept = {a.name for a in spec.adapters}
            dropped = [a.name for a in (old.adapters if old else ()) if a.name not in kept]
            version = current + 1

            def write(tx: Pipeline) -> None:
                tx.hset(self._k_deployments, spec.name, _dumps(spec.to_dict()))
                tx.hset(self._k_deployment_versions, spec.name, version)
                for adapter in spec.adapters:
                    tx.hset(self._k_adapters, _adapter_field(spec.name, adapter.name), _dumps(adapter.to_dict()))
                for name in dropped:
                    tx.hdel(self._k_adapters, _adapter_field(spec.name, name))
                self._event(tx, "deployment.put", name=spec.name, version=version)

            return version, write

        watch = (self._k_deployments, self._k_deployment_versions, self._k_tenants, self._k_adapters)
        version = self._transact("put_deployment", watch, plan)
        pools = ",".join(f"{p.role}x{p.replicas}" for p in spec.pools)
        logger.info(
            "deployment put name=%s version=%d pools=%s adapters=%d", spec.name, version, pools, len(spec.adapters)
        )
        return version

    def get_deployment(self, name: str) -> tuple[DeploymentSpec, int] | None:
        """The deployment and its version, or None."""
        with self._client.pipeline(transaction=True) as pipe:
            raw, version = pipe.hget(self._k_deployments, name).hget(self._k_deployment_versions, name).execute()
        if raw is None:
            return None
        return self._decode(DeploymentSpec.from_dict, f"{self._k_deployments}[{name}]", raw), int(version or 0)

    def list_deployments(self) -> list[DeploymentSpec]:
        specs = self._read_all(self._client, self._k_deployments, DeploymentSpec.from_dict)
        return [specs[name] for name in sorted(specs)]

    def delete_deployment(self, name: str) -> bool:
        """Delete a deployment and every adapter registered on it; False when it did not exist."""

        def plan(pipe: Pipeline) -> tuple[bool, Writer | None]:
            if pipe.hget(self._k_deployments, name) is None:
                return False, None
            fields = [_adapter_field(d, a) for d, a in self._read_adapters(pipe) if d == name]

            def write(tx: Pipeline) -> None:
                tx.hdel(self._k_deployments, name)
                if fields:
                    tx.hdel(self._k_adapters, *fields)
                self._event(tx, "deployment.delete", name=name)

            return True, write

        deleted = self._transact("delete_deployment", (self._k_deployments, self._k_adapters), plan)
        logger.info("deployment delete name=%s deleted=%s", name, deleted)
        return deleted

    # ---- tenants ------------------------------------------------------------------------------------

    def create_tenant(self, spec: TenantSpec) -> None:
        if not isinstance(spec, TenantSpec):
            raise StateError(f"create_tenant: expected a TenantSpec, got {type(spec).__name__}")

        def plan(pipe: Pipeline) -> tuple[None, Writer]:
            if pipe.hexists(self._k_tenants, spec.name):
                raise AlreadyExistsError(f"tenant {spec.name!r} already exists")

            def write(tx: Pipeline) -> None:
                tx.hset(self._k_tenants, spec.name, _dumps(spec.to_dict()))
                self._event(tx, "tenant.create", name=spec.name)

            return None, write

        self._transact("create_tenant", (self._k_tenants,), plan)
        quota = spec.quota
        logger.info(
            "tenant created name=%s max_concurrent=%d tokens_per_minute=%d",
            spec.name,
            quota.max_concurrent,
            quota.tokens_per_minute,
        )

    def get_tenant(self, name: str) -> TenantSpec | None:
        raw = self._client.hget(self._k_tenants, name)
        return None if raw is None else self._decode(TenantSpec.from_dict, f"{self._k_tenants}[{name}]", raw)

    def list_tenants(self) -> list[TenantSpec]:
        tenants = self._read_all(self._client, self._k_tenants, TenantSpec.from_dict)
        return [tenants[name] for name in sorted(tenants)]

    def delete_tenant(self, name: str) -> bool:
        """Delete a tenant, revoke its keys and drop its adapters (inline ones leave their deployment's
        spec too, which bumps that deployment's version). False when the tenant did not exist."""

        def plan(pipe: Pipeline) -> tuple[bool, Writer | None]:
            if not pipe.hexists(self._k_tenants, name):
                return False, None
            keys = {kid: rec["hash"] for kid, rec in self._read_key_records(pipe).items() if rec["tenant"] == name}
            adapters = [key for key, a in self._read_adapters(pipe).items() if a.tenant == name]
            rewrites = self._specs_without_adapters(pipe, set(adapters))

            def write(tx: Pipeline) -> None:
                tx.hdel(self._k_tenants, name)
                if keys:
                    tx.hdel(self._k_key_ids, *keys)
                    tx.hdel(self._k_key_hashes, *keys.values())
                if adapters:
                    tx.hdel(self._k_adapters, *(_adapter_field(d, a) for d, a in adapters))
                self._write_specs(tx, rewrites)
                self._event(tx, "tenant.delete", name=name, keys=len(keys), adapters=len(adapters))

            return True, write

        watch = (self._k_tenants, self._k_key_ids, self._k_key_hashes, self._k_adapters, self._k_deployments)
        deleted = self._transact("delete_tenant", watch, plan)
        logger.info("tenant delete name=%s deleted=%s", name, deleted)
        return deleted

    def _specs_without_adapters(self, pipe: Pipeline, doomed: set[tuple[str, str]]) -> list[tuple[DeploymentSpec, int]]:
        """Deployment specs rewritten without the doomed inline adapters, each with its next version."""
        rewrites = []
        for deployment in sorted({d for d, _ in doomed}):
            spec = self._read_deployment(pipe, deployment)
            if spec is None or not any((deployment, a.name) in doomed for a in spec.adapters):
                continue
            kept = tuple(a for a in spec.adapters if (deployment, a.name) not in doomed)
            version = int(pipe.hget(self._k_deployment_versions, deployment) or 0) + 1
            rewrites.append((replace(spec, adapters=kept), version))
        return rewrites

    def _write_specs(self, tx: Pipeline, rewrites: list[tuple[DeploymentSpec, int]]) -> None:
        for spec, version in rewrites:
            tx.hset(self._k_deployments, spec.name, _dumps(spec.to_dict()))
            tx.hset(self._k_deployment_versions, spec.name, version)
            self._event(tx, "deployment.put", name=spec.name, version=version)

    # ---- API keys -----------------------------------------------------------------------------------

    def issue_key(self, tenant: str) -> tuple[str, str]:
        """A new key for `tenant`: (key_id, plaintext). The plaintext is never stored; show it once."""
        key_id = secrets.token_hex(6)
        plaintext = f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"
        self._store_key(tenant, key_id, plaintext)
        return key_id, plaintext

    def add_key(self, tenant: str, plaintext: str) -> str:
        """Accept a key the operator chose (e.g. bootstrapped from a Kubernetes Secret); returns its id.

        Idempotent: adding the same key for the same tenant again changes nothing.
        """
        if len(plaintext) < MIN_OPERATOR_KEY_LENGTH:
            raise StateError(f"an operator-provided key needs at least {MIN_OPERATOR_KEY_LENGTH} characters")
        digest = hash_key(plaintext)
        owner = self.client.hget(self._k_key_hashes, digest)
        if owner is not None:
            if _text(owner) != tenant:
                raise ConflictError("that key already belongs to another tenant")
            return f"op-{digest[:12]}"
        key_id = f"op-{digest[:12]}"
        self._store_key(tenant, key_id, plaintext)
        return key_id

    def _store_key(self, tenant: str, key_id: str, plaintext: str) -> None:
        digest = hash_key(plaintext)

        def plan(pipe: Pipeline) -> tuple[None, Writer]:
            if not pipe.hexists(self._k_tenants, tenant):
                raise NotFoundError(f"tenant {tenant!r} does not exist; create it before issuing keys")
            if pipe.hexists(self._k_key_ids, key_id):
                raise ConflictError(f"key id {key_id!r} collided; issue the key again")

            def write(tx: Pipeline) -> None:
                tx.hset(self._k_key_ids, key_id, _dumps({"tenant": tenant, "hash": digest}))
                tx.hset(self._k_key_hashes, digest, tenant)
                self._event(tx, "key.issue", tenant=tenant, key_id=key_id)

            return None, write

        self._transact("issue_key", (self._k_tenants, self._k_key_ids, self._k_key_hashes), plan)
        logger.info("key issued tenant=%s key_id=%s", tenant, key_id)

    def revoke_key(self, key_id: str) -> bool:
        """Revoke a key by id; False when no such key."""

        def plan(pipe: Pipeline) -> tuple[bool, Writer | None]:
            raw = pipe.hget(self._k_key_ids, key_id)
            if raw is None:
                return False, None
            record = json.loads(_text(raw))

            def write(tx: Pipeline) -> None:
                tx.hdel(self._k_key_ids, key_id)
                tx.hdel(self._k_key_hashes, record["hash"])
                self._event(tx, "key.revoke", tenant=record["tenant"], key_id=key_id)

            return True, write

        revoked = self._transact("revoke_key", (self._k_key_ids, self._k_key_hashes), plan)
        logger.info("key revoke key_id=%s revoked=%s", key_id, revoked)
        return revoked

    def resolve_key(self, plaintext: str) -> str | None:
        """The tenant owning an API key, or None for an unknown or revoked key."""
        # No prefix check: operator-provided keys (`add_key`) may have any form.
        if not isinstance(plaintext, str) or not plaintext:
            return None
        tenant = self._client.hget(self._k_key_hashes, hash_key(plaintext))
        return None if tenant is None else _text(tenant)

    def list_keys(self, tenant: str) -> list[str]:
        """Ids of the tenant's live keys."""
        return sorted(kid for kid, rec in self._read_key_records(self._client).items() if rec["tenant"] == tenant)

    # ---- adapters -----------------------------------------------------------------------------------

    def register_adapter(self, spec: AdapterSpec) -> None:
        """Register (or re-point) an adapter. The name is per deployment and owned by one tenant."""
        if not isinstance(spec, AdapterSpec):
            raise StateError(f"register_adapter: expected an AdapterSpec, got {type(spec).__name__}")
        field = _adapter_field(spec.deployment, spec.name)

        def plan(pipe: Pipeline) -> tuple[None, Writer]:
            if not pipe.hexists(self._k_tenants, spec.tenant):
                raise NotFoundError(f"tenant {spec.tenant!r} does not exist")
            if not pipe.hexists(self._k_deployments, spec.deployment):
                raise NotFoundError(f"deployment {spec.deployment!r} does not exist")
            raw = pipe.hget(self._k_adapters, field)
            if raw is not None:
                owner = self._decode(AdapterSpec.from_dict, f"{self._k_adapters}[{field}]", raw).tenant
                if owner != spec.tenant:
                    raise AlreadyExistsError(
                        f"adapter {spec.name!r} on deployment {spec.deployment!r} belongs to tenant {owner!r}"
                    )

            def write(tx: Pipeline) -> None:
                tx.hset(self._k_adapters, field, _dumps(spec.to_dict()))
                self._event(tx, "adapter.register", deployment=spec.deployment, name=spec.name, tenant=spec.tenant)

            return None, write

        self._transact("register_adapter", (self._k_tenants, self._k_deployments, self._k_adapters), plan)
        logger.info("adapter registered deployment=%s name=%s tenant=%s", spec.deployment, spec.name, spec.tenant)

    def list_adapters(self, *, deployment: str | None = None, tenant: str | None = None) -> list[AdapterSpec]:
        adapters = self._read_adapters(self._client)
        return [
            adapters[key]
            for key in sorted(adapters)
            if deployment in (None, key[0]) and tenant in (None, adapters[key].tenant)
        ]

    def delete_adapter(self, deployment: str, name: str) -> bool:
        """Unregister an adapter (and drop it from its deployment's spec if declared inline there)."""

        def plan(pipe: Pipeline) -> tuple[bool, Writer | None]:
            if not pipe.hexists(self._k_adapters, _adapter_field(deployment, name)):
                return False, None
            rewrites = self._specs_without_adapters(pipe, {(deployment, name)})

            def write(tx: Pipeline) -> None:
                tx.hdel(self._k_adapters, _adapter_field(deployment, name))
                self._write_specs(tx, rewrites)
                self._event(tx, "adapter.delete", deployment=deployment, name=name)

            return True, write

        deleted = self._transact("delete_adapter", (self._k_adapters, self._k_deployments), plan)
        logger.info("adapter delete deployment=%s name=%s deleted=%s", deployment, name, deleted)
        return deleted

    # ---- events and snapshots -----------------------------------------------------------------------

    def append_event(self, kind: str, **fields: str | int | float) -> None:
        """Append to the event log (capped at EVENT_LOG_CAP). Events are not state: the version stays."""
        if not isinstance(kind, str) or not kind:
            raise StateError(f"event kind must be a non-empty string, got {kind!r}")
        _check_event_fields(fields)
        with self._client.pipeline(transaction=True) as pipe:
            self._event(pipe, kind, **fields)
            pipe.execute()

    def append_audit(self, action: str, **fields: str | int | float) -> None:
        """Append one admin call to the audit log (capped at AUDIT_LOG_CAP); like events, not state."""
        if not isinstance(action, str) or not action:
            raise StateError(f"audit action must be a non-empty string, got {action!r}")
        _check_event_fields(fields)
        with self._client.pipeline(transaction=True) as pipe:
            pipe.rpush(self._k_audit, _dumps({**fields, "ts": time.time(), "action": action}))
            pipe.ltrim(self._k_audit, -AUDIT_LOG_CAP, -1)
            pipe.execute()

    def recent_audit(self, n: int = 50) -> list[dict]:
        """The last `n` admin calls, oldest first; each has 'ts' (unix seconds), 'action' and its fields."""
        if n <= 0:
            return []
        return [json.loads(_text(raw)) for raw in self._client.lrange(self._k_audit, -n, -1)]

    def recent_events(self, n: int = 50) -> list[dict]:
        """The last `n` events, oldest first; each has 'ts' (unix seconds), 'kind' and its fields."""
        if n <= 0:
            return []
        return [json.loads(_text(raw)) for raw in self._client.lrange(self._k_events, -n, -1)]

    def snapshot(self) -> StateSnapshot:
        """Everything routers need, read atomically."""
        with self._client.pipeline(transaction=True) as pipe:
            pipe.get(self._k_version)
            for key in (self._k_deployments, self._k_tenants, self._k_key_hashes, self._k_adapters):
                pipe.hgetall(key)
            version, deployments, tenants, key_hashes, adapters = pipe.execute()
        return StateSnapshot(
            version=int(version or 0),
            deployments=self._decode_all(DeploymentSpec.from_dict, self._k_deployments, deployments),
            tenants=self._decode_all(TenantSpec.from_dict, self._k_tenants, tenants),
            key_hashes={_text(k): _text(v) for k, v in key_hashes.items()},
            adapters=self._read_adapters(None, adapters),
        )
