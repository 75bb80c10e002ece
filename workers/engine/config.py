"""Configs for the engine: the model (parsed from an HF `config.json`) and the engine itself."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DENSE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM")
SUPPORTED_ARCHITECTURES = DENSE_ARCHITECTURES + MOE_ARCHITECTURES

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
"""Accepted names -> torch attribute; torch loads lazily, so the control plane's specs can use `EngineConfig`."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Turn a dtype name (`float32`, `bf16`, ...) into a torch dtype."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    try:
        return getattr(torch, _DTYPES[name])
    except (KeyError, TypeError):
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


@dataclass(kw_only=True, frozen=True)
class ModelConfig:
    """The architecture facts the engine needs, read from an HF `config.json`."""

    architecture: str
    """HF architecture name, e.g. `LlamaForCausalLM`."""
    vocab_size: int
    """Rows in the embedding and the LM head."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the dense MLP (unused by pure-MoE layers)."""
    num_hidden_layers: int
    """Number of decoder layers."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """KV heads; fewer than query heads means GQA."""
    head_dim: int
    """Per-head width; `hidden_size // num_attention_heads` unless the config says otherwise."""
    max_position_embeddings: int
    """The model's context length."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: dict[str, Any] | None = None
    """HF `rope_scaling` dict; `llama3` and `linear` types are supported."""
    tie_word_embeddings: bool = False
    """The LM head shares the embedding matrix."""
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2 does)."""
    torch_dtype: str = "float32"
    """dtype the checkpoint was saved in."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token, if any."""
    eos_token_id: int | list[int] | None = None
    """End-of-sequence token(s), if any."""
    num_experts: int = 0
    """Routed experts per MoE layer (0 for dense models)."""
    num_experts_per_tok: int = 0
    """Top-k experts each token is routed to."""
    moe_intermediate_size: int = 0
    """Width of each routed expert's MLP."""
    shared_expert_intermediate_size: int = 0
    """Width of Qwen2-MoE's shared expert (0 means none)."""
    norm_topk_prob: bool = True
    """Renormalise the top-k routing weights to sum to 1 (Mixtral always does)."""
    decoder_sparse_step: int = 1
    """Qwen2-MoE: every `decoder_sparse_step`-th layer is MoE."""
    mlp_only_layers: tuple[int, ...] = ()
    """Qwen2-MoE: layers that use a dense MLP even though the model is MoE."""
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The full `config.json`, for fields only one architecture reads."""

    @property
    def is_moe(self) -> bool:
        return self.architecture in MOE_ARCHITECTURES

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` uses routed experts."""
        if not self.is_moe:
            return False
        if self.architecture == "MixtralForCausalLM":
            return True
        if layer_idx in self.mlp_only_layers:
            return False
        return self.num_experts > 0 and (layer_idx + 1) % self.decoder_sparse_step == 0

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K and V one token occupies across all layers."""
        import torch

        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * elem

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"unsupported architectures {archs!r}; raylane supports {list(SUPPORTED_ARCHITECTURES)}")
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // num_heads
        num_experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg.get("intermediate_size") or 0),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=num_heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_theta(cfg)),
            rope_scaling=_rope_scaling(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", cfg.get("qkv_bias", arch.startswith("Qwen2")))),
            torch_dtype=str(dtype),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            num_experts=num_experts,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
            moe_intermediate_size=int(
                cfg.get("moe_intermediate_size") or (cfg.get("intermediate_size") if num_experts else 0) or 0
            ),
            shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", arch == "MixtralForCausalLM")),
            decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
            mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
            raw=cfg,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{path} is not an HF model folder: {config_file} is missing")
        return cls.from_dict(json.loads(config_file.read_text()))


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    # transformers 5 folds rope settings into `rope_parameters`; older configs use `rope_scaling`.
    scaling = cfg.get("rope_scaling")
    if scaling is None:
        params = cfg.get("rope_parameters") or {}
        if params.get("rope_type", "default") != "default":
            scaling = params
    if scaling is None:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return None
    if kind not in ("llama3", "linear"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: llama3, linear")
    return {**scaling, "rope_type": kind}


def _rope_theta(cfg: dict[str, Any]) -> float:
    if "rope_theta" in cfg:
        return cfg["rope_theta"]
    return (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)


MiB = 1 << 20
QUANTIZATIONS = (None, "w4a16")


DEPLOYMENT_FIELDS = (
    "block_size",
    "kv_cache_bytes",
    "max_num_batched_tokens",
    "max_num_seqs",
    "max_loras",
    "max_lora_rank",
    "enable_prefix_caching",
    "short_prompt_tokens",
)
"""The `EngineConfig` fields a deployment sets for its workers: control_plane/spec.py generates `EngineOptions`
(types and defaults) from them, so a field and its default are written here only."""


@dataclass(kw_only=True, frozen=True)
class EngineConfig:
    """How one engine instance runs: memory, batching and adapter limits."""

    model: str
    """Path to an HF-format model folder."""
    dtype: str = "auto"
    """Compute and KV dtype: `auto` (the checkpoint's), `float32`, `bfloat16` or `float16`."""
    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_bytes: int = 256 * MiB
    """Bytes reserved for the KV block pool; the pool never grows past this."""
    max_num_batched_tokens: int = 512
    """Token budget of one step (decodes plus prefill chunks)."""
    max_num_seqs: int = 128
    """Most requests running at once."""
    max_model_len: int | None = None
    """Longest prompt plus output; defaults to the model's context length."""
    enable_prefix_caching: bool = True
    """Reuse full KV blocks across requests that share a prompt prefix."""
    short_prompt_tokens: int = 0
    """LAPS in time: waiting prompts of at most this many tokens start before longer ones; 0 is FCFS."""
    max_loras: int = 4
    """LoRA adapter slots resident at once; the least recently used is evicted."""
    max_lora_rank: int = 16
    """Largest adapter rank accepted."""
    num_threads: int | None = None
    """torch intra-op threads; None leaves torch's setting alone."""
    seed: int = 0
    """Seed for requests that ask for random sampling without their own seed."""
    quantization: str | None = None
    """`w4a16` stores the adaptable linear layers as group-wise int4 (`kernels/quant.py`); None keeps them dense."""
    quantization_group_size: int = 128
    """Input features sharing one int4 scale under `w4a16`; a positive multiple of 8."""

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"block_size ({self.block_size})"
            )
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.short_prompt_tokens < 0:
            raise ValueError(f"short_prompt_tokens must be >= 0 (0 turns LAPS off), got {self.short_prompt_tokens}")
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise ValueError("max_num_seqs cannot exceed max_num_batched_tokens: every running request needs a token")
        if self.max_loras < 0 or self.max_lora_rank <= 0:
            raise ValueError("max_loras must be >= 0 and max_lora_rank > 0")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {sorted(_DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.quantization_group_size <= 0 or self.quantization_group_size % 8:
            raise ValueError(
                f"quantization_group_size must be a positive multiple of 8, got {self.quantization_group_size}"
            )
