"""Make small HF-format models (random weights, a real trained BPE tokenizer) and PEFT LoRA adapters.

Model weights cannot be downloaded here, so tests, demos and benchmarks run on these.
Checkpoints use the key names published checkpoints use (per-expert keys for MoE), so
`transformers.AutoModelForCausalLM` and `peft` load them unchanged. Weights are drawn so
logits are well separated: greedy decoding then has no near-ties that fp32 rounding could
flip between batched and unbatched runs.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Iterator
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
    # The benchmark model: 18.4M parameters (tied head), hidden 512, 6 layers, GQA 8/4.
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
"""Special tokens, ids 0, 1, 2 in every tiny tokenizer."""
BOS_TOKEN_ID, EOS_TOKEN_ID = 1, 2
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""A Zephyr-style chat template (written to tokenizer_config.json), so the OpenAI chat endpoint works on tiny models."""
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_config(arch: str, *, preset: str = "tiny", dtype: str = "float32", **overrides: Any) -> dict[str, Any]:
    """An HF `config.json` dict for `arch` at `preset` size, with HF-named `overrides` applied last."""
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
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "torch_dtype": dtype,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        **PRESETS[preset],
    }
    if arch == "mixtral":
        cfg.update(num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0, sliding_window=None)
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
    """Random weights under HF's on-disk checkpoint key names (per-expert keys for MoE)."""
    gen = torch.Generator().manual_seed(seed)

    def linear(out_features: int, in_features: int) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=gen) / in_features**0.5

    def norm(size: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(size, generator=gen)

    def bias(size: int) -> torch.Tensor:
        return 0.1 * torch.randn(size, generator=gen)

    h, d = config.hidden_size, config.head_dim
    q_size, kv_size = config.num_attention_heads * d, config.num_key_value_heads * d
    llama_biases = config.architecture == "LlamaForCausalLM"
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(config.vocab_size, h, generator=gen)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = norm(h)
        w[f"{p}.post_attention_layernorm.weight"] = norm(h)
        for name, out_features in (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)):
            w[f"{p}.self_attn.{name}.weight"] = linear(out_features, h)
            if config.attention_bias:
                w[f"{p}.self_attn.{name}.bias"] = bias(out_features)
        w[f"{p}.self_attn.o_proj.weight"] = linear(h, q_size)
        if llama_biases and config.attention_bias:
            w[f"{p}.self_attn.o_proj.bias"] = bias(h)
        if not config.is_moe_layer(i):
            mlp_bias = bias if llama_biases and config.raw.get("mlp_bias") else None
            w.update(_mlp(f"{p}.mlp", h, config.intermediate_size, linear, mlp_bias))
        elif config.architecture == "MixtralForCausalLM":
            w[f"{p}.block_sparse_moe.gate.weight"] = linear(config.num_experts, h)
            inter = config.moe_intermediate_size
            for e in range(config.num_experts):
                q = f"{p}.block_sparse_moe.experts.{e}"
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


def _mlp(
    prefix: str,
    hidden: int,
    inter: int,
    linear: Callable[[int, int], torch.Tensor],
    bias: Callable[[int], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    w = {
        f"{prefix}.gate_proj.weight": linear(inter, hidden),
        f"{prefix}.up_proj.weight": linear(inter, hidden),
        f"{prefix}.down_proj.weight": linear(hidden, inter),
    }
    if bias is not None:
        w.update({f"{prefix}.gate_proj.bias": bias(inter), f"{prefix}.up_proj.bias": bias(inter)})
        w[f"{prefix}.down_proj.bias"] = bias(hidden)
    return w


def train_tokenizer(vocab_size: int, *, seed: int = 0) -> Tokenizer:
    """A byte-level BPE trained on a generated English-like corpus, with <unk>, <s>, </s> as ids 0, 1, 2.

    Deterministic for a given `(vocab_size, seed)`; its vocabulary has exactly `vocab_size` tokens.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} cannot hold the 256 byte tokens plus {len(SPECIAL_TOKENS)} specials")
    return Tokenizer.from_str(_trained_tokenizer_json(vocab_size, seed))


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int, seed: int) -> str:
    # Cached as JSON: training dominates the cost of building a tiny model, and tests build many.
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed, vocab_size), trainer=trainer)
    return tokenizer.to_str()


_WORD_TEXT = """
the a an of to in and or for with on at by from as is was are were be been has have had it this that these those
cluster request token model worker router prefill decode cache block memory power budget scale train batch queue
latency throughput tenant adapter expert kernel graph ray actor pool node replica migrate stream once upon time
there lived small large quick brown fox jumps over lazy dog river mountain city light dark morning evening weather
rain sun cloud wind story book write read learn teach think make build run walk happy sad strong gentle bright
quiet loud fast slow new old first last good great little long high
"""
_WORDS = tuple(_WORD_TEXT.split())
_EXTRA_TEXT = "naïve café déjà vu — “quotes” 東京 北京 😀 🚀 ✓ 1234567890 () [] {} <> +-*/=%&|^~ ; : , . ! ?"
_ONSET_TEXT = "b c d f g h j k l m n p r s t v w z br st tr pl sh ch th"
_ONSETS = tuple(_ONSET_TEXT.split())
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "", "n", "r", "s", "l", "t")
# The English sentences alone give a BPE of about 770 tokens; bigger vocabularies need more distinct words.
_ENGLISH_VOCAB = 512


def _corpus(seed: int, vocab_size: int, num_sentences: int = 20000) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(num_sentences):
        sentence = " ".join(rng.choices(_WORDS, k=rng.randint(4, 14)))
        yield sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "!", "?", ","])
    yield _EXTRA_TEXT
    if vocab_size > _ENGLISH_VOCAB:
        lexicon = _pseudo_words(vocab_size, rng)
        for _ in range(4 * vocab_size):
            yield " ".join(rng.choices(lexicon, k=rng.randint(4, 10)))


def _pseudo_words(count: int, rng: random.Random) -> list[str]:
    """`count` distinct pronounceable made-up words (names of places, people, things)."""
    words: set[str] = set()
    while len(words) < count:
        syllables = rng.randint(1, 3)
        words.add("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)))
    return sorted(words)


def make_tiny_model(
    arch: str,
    out_dir: str | Path,
    *,
    preset: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
    **overrides: Any,
) -> Path:
    """Write an HF model folder for a random `arch` model and return its path.

    Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
    generation_config.json. `overrides` are HF config keys (`hidden_size`,
    `num_hidden_layers`, `vocab_size`, `rope_scaling`, `tie_word_embeddings`, ...).
    """
    out = Path(out_dir)
    torch_dtype = parse_dtype(dtype)
    cfg = tiny_config(arch, preset=preset, dtype=str(torch_dtype).removeprefix("torch."), **overrides)
    config = ModelConfig.from_dict(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(random_weights(config, seed=seed, dtype=torch_dtype), str(out / "model.safetensors"), {"format": "pt"})
    # One tokenizer per vocabulary size, whatever the weight seed: models of a family share it.
    (out / "tokenizer.json").write_text(_trained_tokenizer_json(config.vocab_size, 0))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS_TOKEN_ID],
        "eos_token": SPECIAL_TOKENS[EOS_TOKEN_ID],
        "unk_token": SPECIAL_TOKENS[0],
        "pad_token": SPECIAL_TOKENS[0],
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "chat_template": TINY_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    generation_config = {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID}
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    return out


def lora_module_shapes(config: ModelConfig, target: str) -> dict[str, tuple[int, int]]:
    """The modules a PEFT adapter with `target` in `target_modules` adapts: HF path -> (in, out) features.

    Routed experts are fused parameters in transformers, not `nn.Linear`s, so PEFT (and
    raylane) adapt only attention, dense MLPs and Qwen2-MoE's shared expert.
    """
    h, d = config.hidden_size, config.head_dim
    q_size, kv_size = config.num_attention_heads * d, config.num_key_value_heads * d
    attention = {"q_proj": (h, q_size), "k_proj": (h, kv_size), "v_proj": (h, kv_size), "o_proj": (q_size, h)}
    if target not in (*attention, "gate_proj", "up_proj", "down_proj"):
        raise ValueError(f"unsupported LoRA target {target!r}; choose from {list(LORA_TARGETS)}")
    shapes = {}
    for i in range(config.num_hidden_layers):
        if target in attention:
            shapes[f"model.layers.{i}.self_attn.{target}"] = attention[target]
            continue
        if not config.is_moe_layer(i):
            path, inter = f"model.layers.{i}.mlp", config.intermediate_size
        elif config.shared_expert_intermediate_size:
            path, inter = f"model.layers.{i}.mlp.shared_expert", config.shared_expert_intermediate_size
        else:
            continue
        shapes[f"{path}.{target}"] = (inter, h) if target == "down_proj" else (h, inter)
    return shapes


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

    Targets with no module in this model (e.g. `gate_proj` in Mixtral) are left out of
    `target_modules`, so PEFT loads the adapter without complaint.
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    config = ModelConfig.from_pretrained(model_dir)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    used_targets = []
    for target in target_modules:
        shapes = lora_module_shapes(config, target)
        if shapes:
            used_targets.append(target)
        for path, (in_features, out_features) in shapes.items():
            key = f"base_model.model.{path}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=gen) / in_features**0.5
            tensors[f"{key}.lora_B.weight"] = 0.5 * torch.randn(out_features, rank, generator=gen) / rank**0.5
    if not tensors:
        raise ValueError(f"none of {list(target_modules)} exists in a {config.architecture}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": used_targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out
