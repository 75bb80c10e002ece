"""Deployment YAML that once crashed or stalled `DeploymentSpec.from_yaml` (found by tests/fuzz): each is now a
`SpecError` with a message, at once."""

from __future__ import annotations

import time

import pytest

from control_plane.spec import MAX_YAML_CHARS, DeploymentSpec, SpecError


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[a]: 1", "line 1: a key must be a plain value, got list"),
        ("{a: 1}: 2", "line 1: a key must be a plain value, got dict"),
        ("name: chat\n? [pools]\n: 1\n", "line 2: a key must be a plain value, got list"),
    ],
)
def test_a_collection_as_a_mapping_key_is_a_spec_error(text, message):
    # It used to raise TypeError (unhashable type) from the duplicate-key check.
    with pytest.raises(SpecError) as info:
        DeploymentSpec.from_yaml(text)
    assert str(info.value) == message


def test_deeply_nested_yaml_is_a_spec_error_not_a_recursion_error():
    with pytest.raises(SpecError, match="nested too deeply"):
        DeploymentSpec.from_yaml("name: " + "[" * 5000)


def test_an_alias_bomb_is_refused_quickly_with_a_bounded_message():
    # Nine levels of ten aliases each: a 10**9-item list from 300 bytes; quoting it in the error took forever.
    levels = ["&l0 [x,x,x,x,x,x,x,x,x,x]"] + [f"&l{i} [{','.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = f"model: m\npools: [{{role: mixed}}]\nname: [{', '.join(levels)}]\n"
    start = time.monotonic()
    with pytest.raises(SpecError, match="name: must be a string, got list") as info:
        DeploymentSpec.from_yaml(text)
    assert time.monotonic() - start < 2.0
    assert len(str(info.value)) < 1000


def test_a_document_over_the_size_limit_is_refused_before_parsing():
    # PyYAML's scanner is quadratic in flow nesting: 1 MB of `[` held `raylane apply` for minutes.
    start = time.monotonic()
    with pytest.raises(SpecError, match=f"a deployment spec has at most {MAX_YAML_CHARS}"):
        DeploymentSpec.from_yaml("[" * (1024 * 1024))
    assert time.monotonic() - start < 1.0
