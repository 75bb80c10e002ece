"""StateStore against a real redis-server and against the embedded one (same tests, both backends)."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import redis

from control_plane.redis_server import EmbeddedRedis
from control_plane.spec import AdapterSpec, DeploymentSpec, PoolSpec, Quota, TenantSpec
from control_plane.state import (
    EVENT_LOG_CAP,
    AlreadyExistsError,
    ConflictError,
    NotFoundError,
    StateError,
    StateStore,
    hash_key,
)


@pytest.fixture(scope="session")
def embedded_redis(tmp_path_factory):
    server = EmbeddedRedis(tmp_path_factory.mktemp("embedded-state"))
    yield server
    server.shutdown()


@pytest.fixture(params=["redis-server", "embedded"])
def redis_url(request) -> str:
    """A flushed Redis: the session's real redis-server, or the session's EmbeddedRedis."""
    if request.param == "redis-server":
        url = request.getfixturevalue("redis_server_url")
    else:
        url = request.getfixturevalue("embedded_redis").url
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest.fixture
def store(redis_url):
    store = StateStore.from_url(redis_url)
    yield store
    store.client.close()


@pytest.fixture
def other_store(redis_url):
    """A second writer on the same Redis, with its own connections."""
    store = StateStore.from_url(redis_url)
    yield store
    store.client.close()


def deployment(name="llama", replicas=1, adapters=()) -> DeploymentSpec:
    return DeploymentSpec(
        name=name, model=f"/models/{name}", pools=(PoolSpec(role="mixed", replicas=replicas),), adapters=adapters
    )


def adapter(name="sql", tenant="acme", deployment="llama") -> AdapterSpec:
    return AdapterSpec(name=name, path=f"/adapters/{name}", tenant=tenant, deployment=deployment)


def test_empty_store(store):
    assert store.ping() and store.version() == 0
    assert store.list_deployments() == [] and store.list_tenants() == [] and store.list_adapters() == []
    snapshot = store.snapshot()
    assert (snapshot.version, snapshot.deployments, snapshot.tenants, snapshot.key_hashes, snapshot.adapters) == (
        0,
        {},
        {},
        {},
        {},
    )
    assert store.get_deployment("llama") is None and store.get_tenant("acme") is None


def test_deployment_versions_and_stale_expected_version(store):
    assert store.put_deployment(deployment(), expected_version=0) == 1
    assert store.put_deployment(deployment(replicas=2)) == 2
    assert store.get_deployment("llama") == (deployment(replicas=2), 2)
    assert store.put_deployment(deployment(replicas=3), expected_version=2) == 3
    with pytest.raises(ConflictError, match="at version 3, not the expected 2"):
        store.put_deployment(deployment(replicas=9), expected_version=2)
    with pytest.raises(ConflictError):
        store.put_deployment(deployment(replicas=9), expected_version=0)
    with pytest.raises(ConflictError, match="at version 0"):
        store.put_deployment(deployment("ghost"), expected_version=1)
    assert store.get_deployment("llama") == (deployment(replicas=3), 3)
    assert store.version() == 3  # failed writes do not count


def test_versions_never_repeat_after_delete(store):
    store.put_deployment(deployment())
    store.put_deployment(deployment())
    assert store.delete_deployment("llama") is True
    assert store.delete_deployment("llama") is False
    assert store.get_deployment("llama") is None
    # Recreating continues the sequence, so a writer holding version 1 or 2 cannot clobber it.
    assert store.put_deployment(deployment(), expected_version=0) == 3
    assert store.version() == 4


def test_list_deployments_sorted(store):
    for name in ("zeta", "alpha", "mid"):
        store.put_deployment(deployment(name))
    assert [d.name for d in store.list_deployments()] == ["alpha", "mid", "zeta"]


def _race_once(monkeypatch, store, racer, *, every_time=False):
    """Make `racer` run after `store` has read (inside WATCH) but before it EXECs."""
    original = store._read_deployment
    calls = []

    def racing_read(conn, name):
        result = original(conn, name)
        if every_time or not calls:
            racer()
        calls.append(name)
        return result

    monkeypatch.setattr(store, "_read_deployment", racing_read)
    return calls


def test_concurrent_writer_retries_a_blind_write(store, other_store, monkeypatch):
    store.put_deployment(deployment())
    calls = _race_once(monkeypatch, store, lambda: other_store.put_deployment(deployment(replicas=5)))
    # The first EXEC fails on WATCH; the retry sees version 2 and writes 3.
    assert store.put_deployment(deployment(replicas=7)) == 3
    assert len(calls) == 2
    assert store.get_deployment("llama") == (deployment(replicas=7), 3)


def test_concurrent_writer_turns_a_conditional_write_into_conflict(store, other_store, monkeypatch):
    store.put_deployment(deployment())
    _race_once(monkeypatch, store, lambda: other_store.put_deployment(deployment(replicas=5)))
    with pytest.raises(ConflictError, match="at version 2, not the expected 1"):
        store.put_deployment(deployment(replicas=7), expected_version=1)
    assert store.get_deployment("llama") == (deployment(replicas=5), 2)


def test_writer_that_always_loses_gives_up(store, other_store, monkeypatch):
    store.put_deployment(deployment())
    store.max_attempts = 3
    calls = _race_once(
        monkeypatch,
        store,
        lambda: other_store.append_event("x") or other_store.put_deployment(deployment()),
        every_time=True,
    )
    with pytest.raises(ConflictError, match="gave up after 3 tries"):
        store.put_deployment(deployment(replicas=7))
    assert len(calls) == 3
    assert store.get_deployment("llama")[0].pools[0].replicas == 1


def test_threads_doing_read_modify_write_lose_no_update(store, other_store):
    store.put_deployment(deployment(replicas=0))
    num_increments = 15

    def bump(s: StateStore) -> None:
        for _ in range(num_increments):
            while True:
                spec, version = s.get_deployment("llama")
                pool = replace(spec.pools[0], replicas=spec.pools[0].replicas + 1)
                try:
                    s.put_deployment(replace(spec, pools=(pool,)), expected_version=version)
                    break
                except ConflictError:
                    continue

    threads = [threading.Thread(target=bump, args=(s,)) for s in (store, other_store)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spec, version = store.get_deployment("llama")
    assert spec.pools[0].replicas == 2 * num_increments and version == 2 * num_increments + 1


def test_tenants(store):
    store.create_tenant(TenantSpec(name="zed", quota=Quota(max_concurrent=2)))
    store.create_tenant(TenantSpec(name="acme"))
    with pytest.raises(AlreadyExistsError, match="tenant 'acme' already exists"):
        store.create_tenant(TenantSpec(name="acme", quota=Quota(max_concurrent=1)))
    assert store.get_tenant("zed") == TenantSpec(name="zed", quota=Quota(max_concurrent=2))
    assert [t.name for t in store.list_tenants()] == ["acme", "zed"]
    assert store.delete_tenant("zed") is True and store.delete_tenant("zed") is False
    assert store.version() == 3


def _all_redis_text(client: redis.Redis) -> str:
    """Every key and value in Redis, as one string."""
    parts = []
    for key in client.scan_iter("*"):
        parts.append(key)
        kind = client.type(key)
        if kind == "hash":
            parts.extend(f"{k}={v}" for k, v in client.hgetall(key).items())
        elif kind == "list":
            parts.extend(client.lrange(key, 0, -1))
        elif kind == "string":
            parts.append(client.get(key))
    return "\n".join(parts)


def test_keys_are_stored_only_as_hashes(store):
    store.create_tenant(TenantSpec(name="acme"))
    key_id, plaintext = store.issue_key("acme")
    assert plaintext.startswith(f"rl-{key_id}-") and len(plaintext) > 40
    assert store.resolve_key(plaintext) == "acme"
    assert store.list_keys("acme") == [key_id]
    dump = _all_redis_text(store.client)
    secret = plaintext.removeprefix(f"rl-{key_id}-")
    assert plaintext not in dump and secret not in dump
    assert hash_key(plaintext) in dump
    assert all(key.startswith("raylane:") for key in store.client.scan_iter("*"))
    assert store.snapshot().key_hashes == {hash_key(plaintext): "acme"}
    assert store.snapshot().resolve_key(plaintext) == "acme"


def test_issue_key_for_unknown_tenant(store):
    with pytest.raises(NotFoundError, match="tenant 'nobody' does not exist"):
        store.issue_key("nobody")


def test_operator_key_is_accepted_once_stored_as_a_hash_and_revocable(store):
    store.create_tenant(TenantSpec(name="acme"))
    store.create_tenant(TenantSpec(name="other"))
    operator_key = "bootstrap-key-from-a-k8s-secret"
    key_id = store.add_key("acme", operator_key)
    assert store.add_key("acme", operator_key) == key_id  # idempotent: a restarted pod adds it again
    assert store.resolve_key(operator_key) == "acme" and store.list_keys("acme") == [key_id]
    assert operator_key not in _all_redis_text(store.client)
    with pytest.raises(ConflictError, match="another tenant"):
        store.add_key("other", operator_key)
    with pytest.raises(StateError, match="at least 16"):
        store.add_key("acme", "short")
    assert store.revoke_key(key_id) and store.resolve_key(operator_key) is None


def test_revoke_key(store):
    store.create_tenant(TenantSpec(name="acme"))
    (kid1, key1), (kid2, key2) = store.issue_key("acme"), store.issue_key("acme")
    assert sorted(store.list_keys("acme")) == sorted([kid1, kid2])
    assert store.revoke_key(kid1) is True
    assert store.revoke_key(kid1) is False
    assert store.resolve_key(key1) is None and store.resolve_key(key2) == "acme"
    assert store.list_keys("acme") == [kid2]
    assert store.resolve_key("rl-nope-nope") is None and store.resolve_key("") is None


def test_adapters_need_tenant_and_deployment(store):
    with pytest.raises(NotFoundError, match="tenant 'acme'"):
        store.register_adapter(adapter())
    store.create_tenant(TenantSpec(name="acme"))
    with pytest.raises(NotFoundError, match="deployment 'llama'"):
        store.register_adapter(adapter())
    store.put_deployment(deployment())
    store.register_adapter(adapter())
    store.register_adapter(replace(adapter(), path="/adapters/sql-v2"))  # the owner may re-point it
    store.create_tenant(TenantSpec(name="rival"))
    with pytest.raises(AlreadyExistsError, match="belongs to tenant 'acme'"):
        store.register_adapter(adapter(tenant="rival"))
    store.register_adapter(adapter("chat", tenant="rival"))
    assert [a.name for a in store.list_adapters()] == ["chat", "sql"]
    assert store.list_adapters(tenant="acme") == [replace(adapter(), path="/adapters/sql-v2")]
    assert store.list_adapters(deployment="other") == []
    assert store.delete_adapter("llama", "sql") is True and store.delete_adapter("llama", "sql") is False
    assert store.list_adapters(deployment="llama") == [adapter("chat", tenant="rival")]


def test_inline_adapters_are_registered_and_validated(store):
    with pytest.raises(NotFoundError, match=r"adapters\[0\].tenant: tenant 'acme' does not exist"):
        store.put_deployment(deployment(adapters=(adapter(),)))
    assert store.version() == 0 and store.get_deployment("llama") is None
    store.create_tenant(TenantSpec(name="acme"))
    store.put_deployment(deployment(adapters=(adapter(), adapter("chat"))))
    store.register_adapter(adapter("extra"))
    assert [a.name for a in store.list_adapters(deployment="llama")] == ["chat", "extra", "sql"]
    # Dropping an inline adapter from the spec unregisters it; the separately registered one stays.
    store.put_deployment(deployment(adapters=(adapter(),)))
    assert [a.name for a in store.list_adapters(deployment="llama")] == ["extra", "sql"]
    # Deleting an inline adapter also takes it out of the spec (a new deployment version).
    assert store.delete_adapter("llama", "sql") is True
    assert store.get_deployment("llama") == (deployment(), 3)


def test_inline_adapter_cannot_take_another_tenants_name(store):
    for name in ("acme", "rival"):
        store.create_tenant(TenantSpec(name=name))
    store.put_deployment(deployment())
    store.register_adapter(adapter(tenant="rival"))
    with pytest.raises(AlreadyExistsError, match="belongs to tenant 'rival'"):
        store.put_deployment(deployment(adapters=(adapter(tenant="acme"),)))


def test_tenant_delete_cascades(store):
    for name in ("acme", "rival"):
        store.create_tenant(TenantSpec(name=name))
    store.put_deployment(deployment(adapters=(adapter(), adapter("chat", tenant="rival"))))
    store.put_deployment(deployment("qwen"))
    store.register_adapter(adapter("extra", deployment="qwen"))
    acme_keys = [store.issue_key("acme") for _ in range(2)]
    _, rival_key = store.issue_key("rival")

    assert store.delete_tenant("acme") is True
    assert all(store.resolve_key(plaintext) is None for _, plaintext in acme_keys)
    assert store.list_keys("acme") == []
    assert store.resolve_key(rival_key) == "rival"
    assert store.list_adapters() == [adapter("chat", tenant="rival")]
    spec, version = store.get_deployment("llama")
    assert spec.adapters == (adapter("chat", tenant="rival"),) and version == 2
    snapshot = store.snapshot()
    assert set(snapshot.tenants) == {"rival"} and set(snapshot.key_hashes.values()) == {"rival"}
    assert set(snapshot.adapters) == {("llama", "chat")}


def test_delete_deployment_drops_its_adapters(store):
    store.create_tenant(TenantSpec(name="acme"))
    store.put_deployment(deployment(adapters=(adapter(),)))
    store.put_deployment(deployment("qwen"))
    store.register_adapter(adapter("extra"))
    store.register_adapter(adapter("keep", deployment="qwen"))
    assert store.delete_deployment("llama") is True
    assert store.list_adapters() == [adapter("keep", deployment="qwen")]


def test_events(store):
    version = store.version()
    store.append_event("worker_replaced", worker_id="w-1", deployment="llama", attempt=2, load=0.5)
    assert store.version() == version  # events are not state
    [event] = store.recent_events()
    assert event["kind"] == "worker_replaced" and event["worker_id"] == "w-1"
    assert event["attempt"] == 2 and event["load"] == 0.5 and event["ts"] > 0
    store.create_tenant(TenantSpec(name="acme"))
    assert [e["kind"] for e in store.recent_events(2)] == ["worker_replaced", "tenant.create"]
    with pytest.raises(StateError, match="'ok'"):
        store.append_event("bad", ok=True)
    with pytest.raises(StateError):
        store.append_event("")
    assert store.recent_events(0) == []


def test_event_log_is_capped(store):
    for i in range(EVENT_LOG_CAP + 10):
        store.append_event("tick", i=i)
    events = store.recent_events(EVENT_LOG_CAP + 100)
    assert len(events) == EVENT_LOG_CAP == 1000
    assert events[0]["i"] == 10 and events[-1]["i"] == EVENT_LOG_CAP + 9


def test_snapshot_matches_reads(store):
    store.create_tenant(TenantSpec(name="acme", quota=Quota(tokens_per_minute=600)))
    store.put_deployment(deployment(adapters=(adapter(),)))
    snapshot = store.snapshot()
    assert snapshot.version == store.version() == 2
    assert snapshot.deployments == {"llama": deployment(adapters=(adapter(),))}
    assert snapshot.tenants == {"acme": TenantSpec(name="acme", quota=Quota(tokens_per_minute=600))}
    assert snapshot.adapters == {("llama", "sql"): adapter()}


def test_prefixes_isolate_stores(store):
    other = StateStore(store.client, prefix="other:")
    other.create_tenant(TenantSpec(name="acme"))
    assert store.list_tenants() == [] and store.version() == 0 and other.version() == 1


def test_corrupt_record_is_a_state_error(store):
    store.client.hset("raylane:tenants", "acme", '{"name": "ACME"}')
    with pytest.raises(StateError, match=r"corrupt record raylane:tenants\[acme\]"):
        store.get_tenant("acme")
