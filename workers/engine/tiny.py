"""Make small HF-format models (random weights, a real trained BPE tokenizer) and PEFT LoRA adapters.

Model weights cannot be downloaded here, so tests, demos and benchmarks run on these.
Weights are drawn so logits are well separated: greedy decoding then has no near-ties
that fp32 rounding could flip between batched and unbatched runs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from workers.engine.config import ModelConfig, parse_dtype

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds to build and to run; what the tests use.
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 512,
        "max_position_embeddings": 512,
    },
    # The benchmark model: ~18M parameters, hidden 512, 6 layers, GQA 8/4.
    "bench": {
        "hidden_size": 512,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": 1024,
        "vocab_size": 8192,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    },
}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_config(arch: str, *, preset: str = "tiny", dtype: str = "float32", **overrides: Any) -> dict[str, Any]:
    """An HF `config.json` dict for `arch` at `preset` size, with `overrides` applied."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        **PRESETS[preset],
    }
    if arch == "mixtral":
        cfg.update(num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0)
    if arch == "qwen2_moe":
        inter = cfg["intermediate_size"]
        cfg.update(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=inter // 2,
            shared_expert_intermediate_size=inter,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            qkv_bias=True,
        )
    if arch in ("mistral", "qwen2"):
        cfg["sliding_window"] = None
    cfg.update(overrides)
    return cfg


def random_weights(config: ModelConfig, *, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random weights under HF's real checkpoint key names (per-expert keys for MoE)."""
    gen = torch.Generator().manual_seed(seed)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=gen) / in_features**0.5

    def norm(size: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(size, generator=gen)

    h, d = config.hidden_size, config.head_dim
    q_size, kv_size = config.num_attention_heads * d, config.num_key_value_heads * d
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(config.vocab_size, h, generator=gen)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = norm(h)
        w[f"{p}.post_attention_layernorm.weight"] = norm(h)
        for name, out_features in (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)):
            w[f"{p}.self_attn.{name}.weight"] = linear(out_features, h)
            if config.attention_bias:
                w[f"{p}.self_attn.{name}.bias"] = 0.1 * torch.randn(out_features, generator=gen)
        w[f"{p}.self_attn.o_proj.weight"] = linear(h, q_size)
        if not config.is_moe_layer(i):
            w.update(_mlp(f"{p}.mlp", h, config.intermediate_size, linear))
        elif config.architecture == "MixtralForCausalLM":
            w[f"{p}.block_sparse_moe.gate.weight"] = linear(config.num_experts, h)
            for e in range(config.num_experts):
                inter, q = config.moe_intermediate_size, f"{p}.block_sparse_moe.experts.{e}"
                w[f"{q}.w1.weight"], w[f"{q}.w3.weight"] = linear(inter, h), linear(inter, h)
                w[f"{q}.w2.weight"] = linear(h, inter)
        else:
            w[f"{p}.mlp.gate.weight"] = linear(config.num_experts, h)
            for e in range(config.num_experts):
                w.update(_mlp(f"{p}.mlp.experts.{e}", h, config.moe_intermediate_size, linear))
            w.update(_mlp(f"{p}.mlp.shared_expert", h, config.shared_expert_intermediate_size, linear))
            w[f"{p}.mlp.shared_expert_gate.weight"] = linear(1, h)
    w["model.norm.weight"] = norm(h)
    if not config.tie_word_embeddings:
        w["lm_head.weight"] = linear(config.vocab_size, h)
    return {k: v.to(dtype).contiguous() for k, v in w.items()}


def _mlp(prefix: str, hidden: int, inter: int, linear) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.gate_proj.weight": linear(inter, hidden),
        f"{prefix}.up_proj.weight": linear(inter, hidden),
        f"{prefix}.down_proj.weight": linear(hidden, inter),
    }


def train_tokenizer(vocab_size: int, *, seed: int = 0) -> Tokenizer:
    """A byte-level BPE trained on a generated English-like corpus, with <unk>, <s>, </s> as ids 0, 1, 2."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    return tokenizer


_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "and",
    "or",
    "for",
    "with",
    "on",
    "at",
    "by",
    "from",
    "as",
    "is",
    "was",
    "are",
    "were",
    "be",
    "been",
    "has",
    "have",
    "had",
    "it",
    "this",
    "that",
    "these",
    "those",
    "cluster",
    "request",
    "token",
    "model",
    "worker",
    "router",
    "prefill",
    "decode",
    "cache",
    "block",
    "memory",
    "power",
    "budget",
    "scale",
    "train",
    "batch",
    "queue",
    "latency",
    "throughput",
    "tenant",
    "adapter",
    "expert",
    "kernel",
    "graph",
    "ray",
    "actor",
    "pool",
    "node",
    "replica",
    "migrate",
    "stream",
    "once",
    "upon",
    "time",
    "there",
    "lived",
    "small",
    "large",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "river",
    "mountain",
    "city",
    "light",
    "dark",
    "morning",
    "evening",
    "weather",
    "rain",
    "sun",
    "cloud",
    "wind",
    "story",
    "book",
    "write",
    "read",
    "learn",
    "teach",
    "think",
    "make",
    "build",
    "run",
    "walk",
    "happy",
    "sad",
    "strong",
    "gentle",
    "bright",
    "quiet",
    "loud",
    "fast",
    "slow",
    "new",
    "old",
    "first",
    "last",
    "good",
    "great",
    "little",
    "long",
    "high",
]
_EXTRA_TEXT = "naïve café déjà vu — “quotes” 東京 北京 😀 🚀 ✓ 1234567890 () [] {} <> +-*/=%&|^~ ; : , . ! ?"


def _corpus(seed: int, num_sentences: int = 20000):
    rng = random.Random(seed)
    for _ in range(num_sentences):
        words = rng.choices(_WORDS, k=rng.randint(4, 14))
        sentence = " ".join(words)
        yield sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "!", "?", ","])
    yield _EXTRA_TEXT


def make_tiny_model(
    arch: str,
    out_dir: str | Path,
    *,
    preset: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
    **overrides: Any,
) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and friends for a random `arch` model."""
    out = Path(out_dir)
    torch_dtype = parse_dtype(dtype)
    cfg = tiny_config(arch, preset=preset, dtype=str(torch_dtype).removeprefix("torch."), **overrides)
    config = ModelConfig.from_dict(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(random_weights(config, seed=seed, dtype=torch_dtype), str(out / "model.safetensors"), {"format": "pt"})
    tokenizer = train_tokenizer(config.vocab_size, seed=seed)
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
    return out


def make_tiny_lora(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
    target_modules: tuple[str, ...] = LORA_TARGETS,
) -> Path:
    """Write a PEFT LoRA adapter with random, non-zero A and B for the model in `model_dir`.

    MoE layers have no dense MLP, so there only the attention projections are adapted.
    """
    config = ModelConfig.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(seed)
    h, d = config.hidden_size, config.head_dim
    shapes = {
        "q_proj": ("self_attn", h, config.num_attention_heads * d),
        "k_proj": ("self_attn", h, config.num_key_value_heads * d),
        "v_proj": ("self_attn", h, config.num_key_value_heads * d),
        "o_proj": ("self_attn", config.num_attention_heads * d, h),
        "gate_proj": ("mlp", h, config.intermediate_size),
        "up_proj": ("mlp", h, config.intermediate_size),
        "down_proj": ("mlp", config.intermediate_size, h),
    }
    unknown = set(target_modules) - set(shapes)
    if unknown:
        raise ValueError(f"unsupported LoRA targets {sorted(unknown)}; choose from {list(shapes)}")
    targets = [t for t in target_modules if not (config.is_moe and shapes[t][0] == "mlp")]
    tensors = {}
    for i in range(config.num_hidden_layers):
        for name in targets:
            parent, in_features, out_features = shapes[name]
            key = f"base_model.model.model.layers.{i}.{parent}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=gen) / in_features**0.5
            tensors[f"{key}.lora_B.weight"] = 0.5 * torch.randn(out_features, rank, generator=gen) / rank**0.5
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out
