"""Learned router state in a real Redis: the length predictor survives a router restart, replicas coexist."""

from __future__ import annotations

import time

import pytest
import redis

from control_plane import learned_state
from control_plane.learned_state import MAX_SNAPSHOTS, load_learned, save_learned
from control_plane.state import StateStore
from router.length_predictor import LengthPredictor
from router.policy import RouteRequest


@pytest.fixture
def store(redis_server_url):
    with redis.Redis.from_url(redis_server_url) as client:
        client.flushdb()
    store = StateStore.from_url(redis_server_url)
    yield store
    store.client.close()


def _trained(output_len: int) -> LengthPredictor:
    predictor = LengthPredictor()
    request = RouteRequest(
        request_id="t/1", deployment="chat", tenant="t", num_prompt_tokens_estimate=100, max_tokens=1024
    )
    for _ in range(40):
        predictor.observe(request, output_len)
    return predictor


def test_a_saved_predictor_comes_back_with_what_it_learned(store):
    assert load_learned(store, "length_predictor") is None
    trained = _trained(300)
    save_learned(store, "length_predictor", "10.0.0.1:50051", trained.to_dict())
    restored = LengthPredictor.from_dict(load_learned(store, "length_predictor"))
    request = RouteRequest(
        request_id="t/2", deployment="chat", tenant="t", num_prompt_tokens_estimate=100, max_tokens=1024
    )
    assert restored.predict(request).p50 == pytest.approx(trained.predict(request).p50)
    assert restored.predict(request).p50 != pytest.approx(LengthPredictor().predict(request).p50)
    # Not part of the versioned control state: routers do not re-pull the table because of it.
    assert store.version() == 0


def test_replicas_keep_their_own_snapshot_and_the_freshest_wins(store):
    save_learned(store, "length_predictor", "router-a", _trained(50).to_dict())
    time.sleep(0.01)
    save_learned(store, "length_predictor", "router-b", _trained(900).to_dict())
    assert store.client.hlen("raylane:learned:length_predictor") == 2
    request = RouteRequest(
        request_id="t/2", deployment="chat", tenant="t", num_prompt_tokens_estimate=100, max_tokens=1024
    )
    assert LengthPredictor.from_dict(load_learned(store, "length_predictor")).predict(request).p50 > 500


def test_old_snapshots_are_pruned_and_unreadable_ones_skipped(store, monkeypatch):
    store.client.hset("raylane:learned:length_predictor", "broken", "{not json")
    clock = iter(range(1000, 2000))
    monkeypatch.setattr(learned_state.time, "time", lambda: float(next(clock)))
    for i in range(MAX_SNAPSHOTS + 3):
        save_learned(store, "length_predictor", f"router-{i}", {"n": i})
    fields = store.client.hkeys("raylane:learned:length_predictor")
    assert len(fields) == MAX_SNAPSHOTS and "broken" not in fields and "router-0" not in fields
    assert load_learned(store, "length_predictor") == {"n": MAX_SNAPSHOTS + 2}


@pytest.mark.parametrize("name", ["", "a:b"])
def test_names_are_checked(store, name):
    with pytest.raises(ValueError, match="learned-state name"):
        save_learned(store, name, "router-a", {})
