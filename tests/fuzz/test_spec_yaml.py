"""Deployment YAML (what `raylane apply` reads) and tenant specs under random input: a valid spec, or a
`ValueError` whose message says what is wrong; never another exception, and never slow.
"""

from __future__ import annotations

import time

import pytest
import yaml
from fuzz_budget import InputCounter, fuzz_settings
from hypothesis import event, given
from hypothesis import strategies as st

from control_plane.spec import DeploymentSpec, TenantSpec

pytestmark = pytest.mark.fuzz

FUZZ = fuzz_settings(num_tests=2)
SLOW_S = 10.0
"""A spec that takes longer than this to load or refuse is a hang in the making (a parse of at most 64 KB; the
worst input takes ~2 s on an idle core)."""

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=24), st.dates(), st.binary(max_size=8)
)
ANY = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def _or_any(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(strategy, strategy, ANY)


POOL = st.fixed_dictionaries(
    {"role": _or_any(st.sampled_from(["mixed", "prefill", "decode", "both"]))},
    optional={
        "replicas": _or_any(st.integers(-2, 10)),
        "num_cpus": _or_any(st.floats()),
        "num_gpus": _or_any(st.floats()),
    },
)
DEPLOYMENT = st.fixed_dictionaries(
    {
        "name": _or_any(st.sampled_from(["chat", "Chat", "-x", "a" * 64])),
        "model": _or_any(st.text(min_size=1, max_size=40)),
        "pools": _or_any(st.lists(POOL, max_size=3)),
    },
    optional={
        "dtype": _or_any(st.sampled_from(["auto", "float32", "bfloat16", "int4"])),
        "engine": _or_any(
            st.dictionaries(
                st.sampled_from(["block_size", "kv_cache_bytes", "max_num_seqs", "enable_prefix_caching", "nope"]),
                _or_any(st.integers(-1, 2**40)),
                max_size=4,
            )
        ),
        "slo": _or_any(st.dictionaries(st.sampled_from(["ttft_ms_p99", "tpot_ms_p99"]), st.floats(), max_size=2)),
        "adapters": _or_any(
            st.lists(st.dictionaries(st.sampled_from(["name", "path", "tenant", "deployment"]), ANY), max_size=2)
        ),
        "group": _or_any(st.text(max_size=8)),
        "tier": _or_any(st.sampled_from(["", "small", "large", "medium"])),
    },
)
TENANT = st.fixed_dictionaries(
    {"name": _or_any(st.sampled_from(["acme", "ACME", ""]))},
    optional={
        "quota": _or_any(
            st.dictionaries(
                st.sampled_from(["max_concurrent", "tokens_per_minute", "burst_tokens", "nope"]),
                _or_any(st.one_of(st.integers(-1, 2**64), st.floats())),
                max_size=3,
            )
        )
    },
)


def _alias_bomb(levels: int) -> str:
    """Each level refers to the previous one ten times: 10**levels items from a few hundred bytes."""
    anchors = ["&l0 [x,x,x,x,x,x,x,x,x,x]"] + [f"&l{i} [{','.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return f"model: m\npools: [{{role: mixed}}]\nname: [{', '.join(anchors)}]\n"


@st.composite
def yaml_texts(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["shaped", "shaped", "wrapped", "any", "text", "mangled", "nested", "bomb"]))
    if kind == "shaped":
        return yaml.safe_dump(draw(DEPLOYMENT), allow_unicode=draw(st.booleans()))
    if kind == "wrapped":
        return yaml.safe_dump({"deployment": draw(DEPLOYMENT), **draw(st.dictionaries(st.text(max_size=6), ANY))})
    if kind == "any":
        return yaml.safe_dump(draw(ANY))
    if kind == "text":
        return draw(st.text(max_size=400))
    if kind == "nested":
        depth = draw(st.integers(1, 20_000))
        return draw(st.sampled_from(["[" * depth, "{a: " * depth, "- " * depth + "x", "? " * depth]))
    if kind == "bomb":
        return _alias_bomb(draw(st.integers(1, 12)))
    text = yaml.safe_dump(draw(DEPLOYMENT))  # a valid document, hand-edited badly
    at = draw(st.integers(0, len(text)))
    cut = draw(st.integers(0, 8))
    snippet = draw(st.sampled_from(["\t", ":", "- ", "&a ", "*a", "!!python/object:os.system ", "{", "'", "\x00"]))
    return text[:at] + snippet + text[at + cut :]


def test_random_deployment_yaml_is_a_spec_or_a_value_error():
    @FUZZ
    @given(text=yaml_texts())
    def check(text):
        count()
        start = time.monotonic()
        try:
            spec = DeploymentSpec.from_yaml(text)
        except ValueError as exc:
            event("ValueError")
            assert str(exc), f"an empty message for {text!r}"
        else:
            event("valid")
            assert DeploymentSpec.from_dict(spec.to_dict()) == spec
        assert time.monotonic() - start < SLOW_S, f"took {time.monotonic() - start:.1f}s for {text[:200]!r}"

    count = InputCounter("spec-yaml")
    check()
    count.report("deployment")


def test_random_tenant_specs_are_specs_or_value_errors():
    @FUZZ
    @given(data=st.one_of(TENANT, ANY))
    def check(data):
        count()
        try:
            tenant = TenantSpec.from_dict(data)
        except ValueError as exc:
            event("ValueError")
            assert str(exc)
        else:
            event("valid")
            assert TenantSpec.from_dict(tenant.to_dict()) == tenant

    count = InputCounter("spec-yaml")
    check()
    count.report("tenant")
