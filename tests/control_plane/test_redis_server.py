"""EmbeddedRedis: AOF persistence across a clean stop/start and a crash, and `connect()`."""

from __future__ import annotations

import os
import signal

import pytest

from control_plane.redis_server import RDB_FILENAME, EmbeddedRedis, EmbeddedRedisError, _is_alive, connect, redact_url
from control_plane.spec import AdapterSpec, DeploymentSpec, PoolSpec, Quota, TenantSpec
from control_plane.state import StateError, StateStore


def populate(store: StateStore) -> dict[str, str]:
    """Write one of everything; returns plaintext key -> tenant."""
    store.create_tenant(TenantSpec(name="acme", quota=Quota(tokens_per_minute=600, burst_tokens=900)))
    store.create_tenant(TenantSpec(name="rival"))
    sql = AdapterSpec(name="sql", path="/adapters/sql", tenant="acme", deployment="llama")
    pools = (PoolSpec(role="prefill", replicas=2), PoolSpec(role="decode", replicas=3, num_gpus=0.5))
    store.put_deployment(DeploymentSpec(name="llama", model="/models/llama", pools=pools, adapters=(sql,)))
    store.put_deployment(DeploymentSpec(name="qwen", model="/models/qwen", pools=(PoolSpec(role="mixed"),)))
    store.put_deployment(DeploymentSpec(name="qwen", model="/models/qwen-v2", pools=(PoolSpec(role="mixed"),)))
    store.register_adapter(AdapterSpec(name="chat", path="/adapters/chat", tenant="rival", deployment="qwen"))
    keys = {store.issue_key(tenant)[1]: tenant for tenant in ("acme", "acme", "rival")}
    revoked_id, revoked = store.issue_key("rival")
    store.revoke_key(revoked_id)
    keys[revoked] = None
    store.append_event("note", text="before restart")
    return keys


def assert_restored(store: StateStore, before, keys: dict[str, str]) -> None:
    assert store.snapshot() == before
    assert store.get_deployment("qwen")[1] == 2
    for plaintext, tenant in keys.items():
        assert store.resolve_key(plaintext) == tenant
    assert store.recent_events(1)[0]["text"] == "before restart"


def test_data_survives_a_clean_restart(tmp_path):
    with EmbeddedRedis(tmp_path) as server:
        client = server.client()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert server.url.startswith("unix://")
        store = StateStore(client)
        keys = populate(store)
        before = store.snapshot()
        client.close()
    assert not server.is_running and not _is_alive(server.pid)
    server.shutdown()  # idempotent
    with pytest.raises(EmbeddedRedisError, match="shut down"):
        server.client()
    # The AOF, not an RDB snapshot, carries the data.
    assert server.aof_path.stat().st_size > 0
    assert not (server.data_dir / RDB_FILENAME).exists()

    with EmbeddedRedis(tmp_path) as again:
        assert again.pid != server.pid
        assert_restored(StateStore(again.client()), before, keys)


def test_data_survives_a_killed_server(tmp_path):
    server = EmbeddedRedis(tmp_path)
    store = StateStore(server.client())
    keys = populate(store)
    before = store.snapshot()
    # SIGKILL skips every shutdown hook: only what the AOF already holds can come back.
    os.kill(server.pid, signal.SIGKILL)
    store.client.close()
    server.shutdown()  # tidies up after the dead server
    with EmbeddedRedis(tmp_path) as again:
        assert_restored(StateStore(again.client()), before, keys)


def test_second_instance_attaches_to_the_running_server(tmp_path):
    with EmbeddedRedis(tmp_path) as first:
        StateStore(first.client()).create_tenant(TenantSpec(name="acme"))
        second = EmbeddedRedis(tmp_path)
        assert second.pid == first.pid
        assert StateStore(second.client()).get_tenant("acme") == TenantSpec(name="acme")


def test_connect_embedded_then_external(tmp_path):
    store, embedded = connect(None, tmp_path)
    try:
        assert embedded is not None and store.ping()
        store.create_tenant(TenantSpec(name="acme"))
        external, none = connect(embedded.url, tmp_path / "unused")
        assert none is None and external.get_tenant("acme") == TenantSpec(name="acme")
        assert not (tmp_path / "unused").exists()
    finally:
        embedded.shutdown()


def test_connect_to_unreachable_redis_fails_clearly(tmp_path):
    with pytest.raises(StateError, match=r"cannot reach Redis at redis://u:\*\*\*@127.0.0.1:1/0"):
        connect("redis://u:secret@127.0.0.1:1/0", tmp_path)


def test_redact_url():
    assert redact_url("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("unix:///tmp/redis.sock") == "unix:///tmp/redis.sock"
