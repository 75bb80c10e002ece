"""Tiny model folders shared by the engine tests (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.engine.tiny import make_tiny_lora, make_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """fp32 tiny checkpoints of every supported architecture, keyed by arch name."""
    root = tmp_path_factory.mktemp("tiny-models")
    paths = {}
    for arch in ("llama", "mixtral", "qwen2_moe"):
        paths[arch] = root / arch
        make_tiny_model(arch, paths[arch], seed=0, dtype="float32")
    return paths


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def tiny_loras(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """Two PEFT adapters for the tiny Llama with different ranks."""
    root = tmp_path_factory.mktemp("tiny-loras")
    paths = {"a": root / "a", "b": root / "b"}
    make_tiny_lora(tiny_llama, paths["a"], rank=8, alpha=16, seed=1)
    make_tiny_lora(tiny_llama, paths["b"], rank=4, alpha=4, seed=2)
    return paths
