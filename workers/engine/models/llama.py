"""Dense decoders: Llama, Mistral and Qwen2 share one module tree under HF's parameter names.

`LlamaForCausalLM` is also the base of the MoE models (models/moe.py): they override
only how a layer's MLP is built and how checkpoint keys map onto parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from kernels import ops
from kernels.metadata import AttentionMetadata
from workers.engine.config import ModelConfig
from workers.engine.lora_layers import LoRAContext, LoRALinear
from workers.engine.models.layers import Attention, DecoderLayer, DenseMLP, RMSNorm

logger = logging.getLogger(__name__)

WeightTarget = tuple[str, tuple[int, slice] | None]
"""(parameter name, None) or, for one expert's slice of a stacked parameter, (name, (expert, row slice))."""

# Checkpoint tensors that are derived state, not weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def sliding_window(config: ModelConfig) -> int | None:
    """The attention window HF applies to this config, or None when attention spans the whole context."""
    raw = config.raw
    if config.architecture.startswith("Qwen2") and not raw.get("use_sliding_window", False):
        return None
    window = raw.get("sliding_window")
    return int(window) if window else None


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm; named `model.*` as in HF checkpoints."""

    def __init__(self, config: ModelConfig, layers: list[DecoderLayer], dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = nn.utils.skip_init(nn.Embedding, config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        cos_sin = ops.rope_cos_sin_cache(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling, dtype
        )
        # A buffer, so `.to(device)` moves it; not persistent, so checkpoints never carry it.
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(self.layers)} layers")
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, positions, self.cos_sin_cache, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Llama (and Mistral): pre-norm GQA decoder, SwiGLU MLPs, optional attention/MLP biases and tied LM head."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.lora_ctx = LoRAContext()
        self._init_model(dtype)
        self._init_lm_head()
        self.requires_grad_(False)
        self._warn_on_sliding_window()

    def _init_model(self, dtype: torch.dtype) -> None:
        layers = [
            DecoderLayer(self.config, self._make_attention(i), self._make_mlp(i))
            for i in range(self.config.num_hidden_layers)
        ]
        self.model = DecoderModel(self.config, layers, dtype)

    def _init_lm_head(self) -> None:
        self.lm_head: nn.Linear | None = None
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.utils.skip_init(nn.Linear, self.config.hidden_size, self.config.vocab_size, bias=False)

    # ---- per-architecture hooks ---------------------------------------------------------------

    def _make_attention(self, layer_idx: int) -> Attention:
        # Llama's `attention_bias` covers all four projections.
        bias = self.config.attention_bias
        return Attention(self.config, self.lora_ctx, qkv_bias=bias, o_bias=bias)

    def _make_mlp(self, layer_idx: int) -> nn.Module:
        bias = bool(self.config.raw.get("mlp_bias", False))
        return DenseMLP(self.config.hidden_size, self.config.intermediate_size, self.lora_ctx, bias=bias)

    def _weight_target(self, name: str) -> WeightTarget:
        """Where checkpoint tensor `name` goes; dense checkpoints use our parameter names verbatim."""
        return name, None

    # ---- the model interface ------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        lora_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states `[T, H]` of the packed tokens; writes their K/V into `kv_caches` on the way."""
        self.lora_ctx.token_slots = lora_slots
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits `[N, V]` for the rows of `hidden` to sample from."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return (hidden @ weight.t()).float()

    def lora_targets(self) -> dict[str, LoRALinear]:
        """Every adaptable projection, keyed by its HF module path (e.g. `model.layers.0.self_attn.q_proj`)."""
        return {name: module for name, module in self.named_modules() if isinstance(module, LoRALinear)}

    def expert_counts(self) -> dict[int, list[int]]:
        """Tokens routed to each expert so far, per MoE layer index; dense models route nothing."""
        return {}

    @property
    def max_model_len(self) -> int:
        """Longest context this implementation reproduces HF exactly on (we do not apply sliding windows)."""
        window = sliding_window(self.config)
        limit = self.config.max_position_embeddings
        return limit if window is None else min(limit, window)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors in; raise `ValueError` on unknown, misshapen or missing ones."""
        params = dict(self.named_parameters())
        num_loaded: dict[str, int] = {}
        for name, tensor in weights:
            if self._is_ignored(name):
                continue
            target, part = self._weight_target(name)
            param = params.get(target)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} does not belong to a {self.config.architecture}")
            dest = param if part is None else param[part[0], part[1]]
            if dest.shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(dest.shape)}")
            dest.copy_(tensor)
            num_loaded[target] = num_loaded.get(target, 0) + dest.numel()
        # Stacked expert parameters arrive in slices, so completeness is counted in elements.
        incomplete = sorted(name for name, p in params.items() if num_loaded.get(name, 0) != p.numel())
        if incomplete:
            raise ValueError(
                f"checkpoint is missing (or repeats) {len(incomplete)} of {len(params)} tensors, e.g. {incomplete[:3]}"
            )

    def _is_ignored(self, name: str) -> bool:
        # Some tied checkpoints still store the LM head; the embedding is the one we use.
        return name.endswith(_IGNORED_SUFFIXES) or (self.lm_head is None and name == "lm_head.weight")

    def _warn_on_sliding_window(self) -> None:
        if self.max_model_len < self.config.max_position_embeddings:
            logger.warning(
                "sliding_window=%d is not applied: outputs match HF only for contexts up to %d tokens",
                self.max_model_len,
                self.max_model_len,
            )


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: Llama with biases on q/k/v (never on o_proj or the MLP)."""

    def _make_attention(self, layer_idx: int) -> Attention:
        return Attention(self.config, self.lora_ctx, qkv_bias=self.config.attention_bias, o_bias=False)

    def _make_mlp(self, layer_idx: int) -> nn.Module:
        return DenseMLP(self.config.hidden_size, self.config.intermediate_size, self.lora_ctx)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama without biases (its sliding window, when set, is reported by `max_model_len`)."""

    def _make_attention(self, layer_idx: int) -> Attention:
        return Attention(self.config, self.lora_ctx, qkv_bias=False, o_bias=False)

    def _make_mlp(self, layer_idx: int) -> nn.Module:
        return DenseMLP(self.config.hidden_size, self.config.intermediate_size, self.lora_ctx)
