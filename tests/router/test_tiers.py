"""Complexity-aware tier routing through the router's request path: tier groups, calibration and pinning."""

from __future__ import annotations

import random

import pytest
from inprocess_workers import TableOnly

from control_plane.controller import tier_groups
from control_plane.convert import deployment_from_proto, deployment_to_proto
from control_plane.spec import DeploymentSpec, PoolSpec, SpecError
from router.complexity import TierGroup, TierSelectorConfig
from router.core import GenerateInput, RouterCore
from router.errors import InvalidArgument
from router.quota import QuotaLimits
from router.table import DeploymentRoute, RoutingTable

GROUP = TierGroup(small="math-small", large="math-large")


def core(**tier_config) -> RouterCore:
    table = RoutingTable(
        deployments={name: DeploymentRoute(name=name) for name in ("math-small", "math-large", "chat")},
        tenants={"t": QuotaLimits(max_concurrent=8, tokens_per_minute=1_000_000)},
        groups={"math": GROUP},
    )
    return RouterCore(TableOnly(table), tiers=TierSelectorConfig(**tier_config))


def easy_prompt(rng: random.Random) -> str:
    return rng.choice(["hello there", "thanks!", "what is the capital of France", "translate 'cat' to German"])


def hard_prompt(rng: random.Random) -> str:
    a, b, c = (rng.randint(1000, 99999) for _ in range(3))
    return f"Prove step by step that (({a} * {b}) mod {c}) ^ 2 = x, then derive the integral of x^3 and explain why."


def test_a_group_routes_hard_prompts_large_at_the_calibrated_share():
    router = core(target_large_share=0.3, min_samples=20, recalibrate_every=1)
    rng = random.Random(0)
    picks = []
    for i in range(300):
        is_hard = rng.random() < 0.3
        prompt = hard_prompt(rng) if is_hard else easy_prompt(rng)
        _, route = router.prepare("t", GenerateInput(deployment="math", prompt=prompt, request_id=f"r{i}"))
        picks.append((is_hard, route.deployment))
    settled = picks[50:]
    large_share = sum(d == "math-large" for _, d in settled) / len(settled)
    assert 0.2 <= large_share <= 0.4
    hard = [d for is_hard, d in settled if is_hard]
    easy = [d for is_hard, d in settled if not is_hard]
    assert sum(d == "math-large" for d in hard) / len(hard) >= 0.9
    # Calibration holds the share, so when fewer hard prompts arrive than the target, some easy ones go large.
    assert sum(d == "math-large" for d in easy) / len(easy) <= 0.2


def test_a_request_may_pin_its_tier_and_token_prompts_go_small():
    router = core()
    _, route = router.prepare("t", GenerateInput(deployment="math", prompt="hello", tier="large"))
    assert route.deployment == "math-large"
    _, route = router.prepare("t", GenerateInput(deployment="math", prompt_token_ids=(5, 6, 7)))
    assert route.deployment == "math-small"
    # Naming a tier's deployment directly bypasses the selector.
    _, route = router.prepare("t", GenerateInput(deployment="math-large", prompt=hard_prompt(random.Random(1))))
    assert route.deployment == "math-large"


@pytest.mark.parametrize(
    "inp, match",
    [
        (GenerateInput(deployment="chat", prompt="hi", tier="large"), "applies to tier groups"),
        (GenerateInput(deployment="math", prompt="hi", tier="huge"), "tier must be"),
        (GenerateInput(deployment="nope", prompt="hi"), "^unknown deployment .nope.$"),
    ],
)
def test_bad_tier_requests_are_invalid_arguments(inp, match):
    with pytest.raises(InvalidArgument, match=match):
        core().prepare("t", inp)


def _spec(name: str, group: str = "", tier: str = "") -> DeploymentSpec:
    return DeploymentSpec(name=name, model="/m", pools=(PoolSpec(role="mixed"),), group=group, tier=tier)


def test_tier_groups_need_one_small_and_one_large_deployment():
    deployments = {
        s.name: s
        for s in (
            _spec("a-small", "a", "small"),
            _spec("a-large", "a", "large"),
            _spec("b-small", "b", "small"),  # no large tier
            _spec("c-1", "c", "small"),
            _spec("c-2", "c", "small"),  # two smalls
            _spec("d-small", "a-small", "small"),  # a group named like a deployment
            _spec("d-large", "a-small", "large"),
        )
    }
    assert tier_groups(deployments) == {"a": TierGroup(small="a-small", large="a-large")}


def test_group_and_tier_are_validated_and_survive_the_wire():
    with pytest.raises(SpecError, match="tier"):
        _spec("x", "g", "")
    with pytest.raises(SpecError, match="tier"):
        _spec("x", "g", "medium")
    with pytest.raises(SpecError, match="group"):
        _spec("x", "", "small")
    with pytest.raises(SpecError, match="differ"):
        _spec("x", "x", "small")
    spec = _spec("x-large", "x", "large")
    assert deployment_from_proto(deployment_to_proto(spec)) == spec
    assert DeploymentSpec.from_dict(spec.to_dict()) == spec
    plain = _spec("y")
    assert "group" not in plain.to_dict() and deployment_from_proto(deployment_to_proto(plain)) == plain
