"""Trainer test setup: a config factory over the tiny Llama and the shipped copy/reverse dataset."""

from __future__ import annotations

import pytest
from trainer_helpers import make_config

from workers.trainer.config import TrainConfig


@pytest.fixture
def train_config(tiny_llama):
    """`train_config(**overrides)`: `make_config` on the tiny Llama."""

    def make(**overrides) -> TrainConfig:
        return make_config(overrides.pop("model_path", tiny_llama), **overrides)

    return make
