"""Model definitions. `build_model` turns a `ModelConfig` into a model awaiting its weights."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch

from kernels.metadata import AttentionMetadata
from workers.engine.config import ModelConfig
from workers.engine.lora_layers import LoRAContext, LoRALinear
from workers.engine.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from workers.engine.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM


class CausalLM(Protocol):
    """What the engine needs from a model. Every call runs under `torch.inference_mode()`."""

    lora_ctx: LoRAContext
    """Per-step LoRA state shared by all of the model's `LoRALinear`s."""

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        lora_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states `[T, H]` of the packed tokens `input_ids [T]` at `positions [T]`.

        Writes each layer's new K/V into `kv_caches[layer] = (key_cache, value_cache)` at
        `meta.slot_mapping`, then attends over each sequence's cached context. `lora_slots [T]`
        gives each token's adapter slot (-1: base model); None means no token uses an adapter.
        """
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits `[N, V]` for hidden rows `[N, H]`."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors in; `ValueError` on any unknown, misshapen or missing tensor."""
        ...

    def lora_targets(self) -> dict[str, LoRALinear]:
        """Adaptable projections keyed by HF module path, e.g. `model.layers.0.self_attn.q_proj`."""
        ...

    def expert_counts(self) -> dict[int, list[int]]:
        """Routes served per expert since load, keyed by MoE layer index (empty for dense models)."""
        ...

    @property
    def max_model_len(self) -> int:
        """Longest context on which this implementation matches HF (sliding windows are not applied)."""
        ...


MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
}


def build_model(config: ModelConfig, dtype: torch.dtype) -> LlamaForCausalLM:
    """Build the module tree for `config` with parameters in `dtype`; weights come from `load_weights`."""
    model_cls = MODEL_REGISTRY.get(config.architecture)
    if model_cls is None:
        raise ValueError(f"unsupported architecture {config.architecture!r}; supported: {sorted(MODEL_REGISTRY)}")
    hidden_act = config.raw.get("hidden_act", "silu")
    if hidden_act not in ("silu", "swish"):
        raise ValueError(f"hidden_act={hidden_act!r} is not supported; raylane's MLPs are SwiGLU (silu)")
    with _default_dtype(dtype):
        model = model_cls(config, dtype)
    return model.eval()


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Allocating parameters directly in `dtype` avoids a float32 copy of a bf16 model.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
