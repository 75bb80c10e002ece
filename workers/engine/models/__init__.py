"""Model definitions. `build_model` turns a `ModelConfig` into a model awaiting its weights."""

from __future__ import annotations

import torch

from workers.engine.config import SUPPORTED_ARCHITECTURES, ModelConfig
from workers.engine.models.causal_lm import CausalLM


def build_model(config: ModelConfig, dtype: torch.dtype) -> CausalLM:
    """Build the module tree for `config` in `dtype`; weights come from `CausalLM.load_weights`."""
    if config.architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {config.architecture!r}")
    return CausalLM(config, dtype).to(dtype).eval()
