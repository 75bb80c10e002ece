"""Our model forward against transformers: same logits for a packed prefill batch and for a decode step.

Each test builds a tiny HF folder, runs a batch of prompts of different lengths through our
model over a paged KV cache (block size 16), and compares every position's logits with
transformers' `model(input_ids)` run one prompt at a time; then it feeds one more token per
sequence as a batched decode step and compares with HF's logits at that position.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kernels.metadata import AttentionMetadata
from workers.engine.loader import load_model
from workers.engine.models.moe import SparseMoE, route_topk
from workers.engine.tiny import make_tiny_lora, make_tiny_model

BLOCK_SIZE = 16
RTOL = 1e-4
PROMPT_LENGTHS = (5, 17, 33)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def paged_meta(starts: list[int], query_lens: list[int], num_decodes: int) -> AttentionMetadata:
    """Metadata for sequences that own blocks `[i * bps, (i + 1) * bps)`, each with `starts[i]` tokens cached."""
    blocks_per_seq = 4
    seq_lens = [s + q for s, q in zip(starts, query_lens, strict=True)]
    assert max(seq_lens) <= blocks_per_seq * BLOCK_SIZE
    block_tables = torch.arange(len(starts) * blocks_per_seq).view(len(starts), blocks_per_seq)
    slots = [
        i * blocks_per_seq * BLOCK_SIZE + pos
        for i, (seq_len, query_len) in enumerate(zip(seq_lens, query_lens, strict=True))
        for pos in range(seq_len - query_len, seq_len)
    ]
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(qsl, dtype=torch.int64),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64),
        block_tables=block_tables,
        num_decodes=num_decodes,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
        block_size=BLOCK_SIZE,
    )


def empty_kv_caches(config, num_seqs: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (config.num_key_value_heads, 4 * num_seqs, BLOCK_SIZE, config.head_dim)
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(config.num_hidden_layers)]


def random_prompts(vocab_size: int, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]


@torch.inference_mode()
def run_prefill(model, config, prompts, dtype=torch.float32):
    """Prefill all prompts as one packed step over an empty cache; returns the caches and per-prompt logits."""
    kv_caches = empty_kv_caches(config, len(prompts), dtype)
    lens = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(n) for n in lens])
    logits = model.compute_logits(model(ids, positions, kv_caches, paged_meta([0] * len(prompts), lens, 0)))
    return kv_caches, list(logits.split(lens))


@torch.inference_mode()
def run_decode(model, kv_caches, prompts, next_tokens) -> torch.Tensor:
    """One batched decode step: token `next_tokens[i]` at position `len(prompts[i])`."""
    lens = [len(p) for p in prompts]
    meta = paged_meta(lens, [1] * len(prompts), num_decodes=len(prompts))
    return model.compute_logits(model(torch.tensor(next_tokens), torch.tensor(lens), kv_caches, meta))


def prefill_then_decode(model, config, prompts, next_tokens, dtype=torch.float32):
    """Our per-token prefill logits (one tensor per prompt) and one batched decode step's logits."""
    kv_caches, prefill = run_prefill(model, config, prompts, dtype)
    return prefill, run_decode(model, kv_caches, prompts, next_tokens)


@torch.inference_mode()
def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    return hf_model(torch.tensor([tokens])).logits[0].float()


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = RTOL) -> None:
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * theirs.abs().max().item())


def check_against_hf(model_dir, *, dtype=torch.float32):
    config, model = load_model(model_dir, dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = random_prompts(config.vocab_size)
    theirs = [hf_logits(hf, p) for p in prompts]
    next_tokens = [int(t[-1].argmax()) for t in theirs]
    prefill, decode = prefill_then_decode(model, config, prompts, next_tokens)
    for ours, hf_prompt_logits in zip(prefill, theirs, strict=True):
        assert_logits_close(ours, hf_prompt_logits)
    for i, (prompt, token) in enumerate(zip(prompts, next_tokens, strict=True)):
        assert_logits_close(decode[i], hf_logits(hf, [*prompt, token])[-1])
    return config, model, hf, prompts


ARCH_CASES = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    # Positions past the original 16-token context exercise every llama3 frequency band.
    "llama3-rope-tied": ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0, "tie_word_embeddings": True}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-biases-head-dim": ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 32}),
    "qwen2_moe-mixed-layers": ("qwen2_moe", {"mlp_only_layers": [1], "norm_topk_prob": True, "num_experts": 8}),
    "mixtral-top1": ("mixtral", {"num_experts_per_tok": 1, "num_local_experts": 3}),
}


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_prefill_and_decode_logits_match_transformers(tmp_path, case):
    arch, overrides = ARCH_CASES[case]
    check_against_hf(make_tiny_model(arch, tmp_path / case, seed=3, **overrides))


def test_chunked_prefill_next_to_decodes_matches_transformers(tmp_path):
    """One step holding a decode and a prefill chunk whose prefix is already cached."""
    model_dir = make_tiny_model("qwen2_moe", tmp_path / "m", seed=1)
    config, model = load_model(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    short, long = random_prompts(config.vocab_size, (7, 40), seed=2)
    kv_caches = empty_kv_caches(config, 2, torch.float32)
    with torch.inference_mode():
        # Step 1: all of `short` and the first 20 tokens of `long`.
        meta = paged_meta([0, 0], [7, 20], num_decodes=0)
        ids = torch.tensor(short + long[:20])
        model(ids, torch.cat([torch.arange(7), torch.arange(20)]), kv_caches, meta)
        # Step 2: decode one token of `short`, prefill the remaining 20 tokens of `long`.
        meta = paged_meta([7, 20], [1, 20], num_decodes=1)
        ids = torch.tensor([5, *long[20:]])
        positions = torch.cat([torch.tensor([7]), torch.arange(20, 40)])
        logits = model.compute_logits(model(ids, positions, kv_caches, meta))
    assert_logits_close(logits[0], hf_logits(hf, [*short, 5])[-1])
    assert_logits_close(logits[1:], hf_logits(hf, long)[20:])


@pytest.mark.parametrize(("arch", "renormalize"), [("mixtral", True), ("qwen2_moe", True), ("qwen2_moe", False)])
def test_router_matches_transformers(arch, renormalize):
    from transformers import MixtralConfig, Qwen2MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    if arch == "mixtral":  # Mixtral always renormalises
        router = MixtralTopKRouter(MixtralConfig(hidden_size=16, num_local_experts=6, num_experts_per_tok=2))
    else:
        config = Qwen2MoeConfig(hidden_size=16, num_experts=6, num_experts_per_tok=3, norm_topk_prob=renormalize)
        router = Qwen2MoeTopKRouter(config)
    gen = torch.Generator().manual_seed(0)
    router.weight.data = torch.randn(6, 16, generator=gen)
    x = torch.randn(50, 16, generator=gen)
    logits, hf_weights, hf_ids = router(x)
    weights, ids = route_topk(logits, router.top_k, renormalize=renormalize)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights.float(), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_expert_counts_follow_the_routing(tmp_path, arch):
    """`expert_counts()` is {moe layer index: [routes per expert]} and agrees with HF's router choices."""
    overrides = {"mlp_only_layers": [0]} if arch == "qwen2_moe" else {}
    model_dir = make_tiny_model(arch, tmp_path / arch, seed=2, **overrides)
    config, model = load_model(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_ids: dict[int, list[torch.Tensor]] = {}
    for i, layer in enumerate(hf.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None:
            gate.register_forward_hook(lambda _m, _i, out, i=i: hf_ids.setdefault(i, []).append(out[2]))
    prompts = random_prompts(config.vocab_size)
    for prompt in prompts:
        hf_logits(hf, prompt)
    moe_layers = [0, 1] if arch == "mixtral" else [1]
    assert sorted(hf_ids) == moe_layers
    assert model.expert_counts() == {i: [0] * config.num_experts for i in moe_layers}
    kv_caches, _ = run_prefill(model, config, prompts)
    counts = model.expert_counts()
    for i in moe_layers:
        hf_counts = torch.bincount(torch.cat(hf_ids[i]).flatten(), minlength=config.num_experts)
        assert counts[i] == hf_counts.tolist()
        assert sum(counts[i]) == sum(PROMPT_LENGTHS) * config.num_experts_per_tok
    run_decode(model, kv_caches, prompts, [3] * len(prompts))
    for i in moe_layers:
        assert sum(model.expert_counts()[i]) - sum(counts[i]) == len(prompts) * config.num_experts_per_tok
    model.reset_expert_counts()
    assert all(sum(c) == 0 for c in model.expert_counts().values())
    assert load_model(make_tiny_model("llama", tmp_path / "dense"))[1].expert_counts() == {}


def test_moe_layers_store_stacked_experts(tmp_path):
    model_dir = make_tiny_model("mixtral", tmp_path / "m", seed=0)
    config, model = load_model(model_dir)
    raw = load_file(str(model_dir / "model.safetensors"))
    moe = model.model.layers[1].mlp
    assert isinstance(moe, SparseMoE)
    inter = config.moe_intermediate_size
    prefix = "model.layers.1.block_sparse_moe.experts.2"
    assert torch.equal(moe.w_gate_up[2, :inter], raw[f"{prefix}.w1.weight"])
    assert torch.equal(moe.w_gate_up[2, inter:], raw[f"{prefix}.w3.weight"])
    assert torch.equal(moe.w_down[2], raw[f"{prefix}.w2.weight"])


def test_lora_targets_match_peft_including_shared_expert(tmp_path):
    """Filling our LoRA slots from a PEFT adapter reproduces PEFT's logits (Qwen2-MoE adapts its shared expert)."""
    from peft import PeftModel

    model_dir = make_tiny_model("qwen2_moe", tmp_path / "m", seed=0, mlp_only_layers=[1])
    adapter_dir = make_tiny_lora(model_dir, tmp_path / "lora", rank=4, alpha=8, seed=1)
    config, model = load_model(model_dir)
    targets = model.lora_targets()
    assert "model.layers.0.mlp.shared_expert.down_proj" in targets and "model.layers.1.mlp.up_proj" in targets
    assert not any("experts" in name and "shared" not in name for name in targets)
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    adapted = set()
    for name, layer in targets.items():
        key = f"base_model.model.{name}"
        layer.lora_a = adapter[f"{key}.lora_A.weight"][None]
        layer.lora_b = adapter[f"{key}.lora_B.weight"][None] * (8 / 4)
        adapted.add(key)
    assert adapted == {k.rsplit(".lora_", 1)[0] for k in adapter}
    prompt = random_prompts(config.vocab_size, (12,))[0]
    kv_caches = empty_kv_caches(config, 1, torch.float32)
    with torch.inference_mode():
        hidden = model(
            torch.tensor(prompt),
            torch.arange(12),
            kv_caches,
            paged_meta([0], [12], 0),
            torch.zeros(12, dtype=torch.int64),
        )
        ours = model.compute_logits(hidden)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base = hf_logits(hf.eval(), prompt)
    peft_model = PeftModel.from_pretrained(hf, adapter_dir).eval()
    theirs = hf_logits(peft_model, prompt)
    assert (theirs - base).abs().max() > 0.1  # the adapter really changes the output
    assert_logits_close(ours, theirs)


def test_bf16_model_runs_close_to_fp32(tmp_path):
    model_dir = make_tiny_model("qwen2_moe", tmp_path / "m", seed=0, dtype="bfloat16")
    config, model16 = load_model(model_dir)
    assert {p.dtype for p in model16.parameters()} == {torch.bfloat16}
    _, model32 = load_model(model_dir, dtype="float32")
    prompts = random_prompts(config.vocab_size)
    ours16, decode16 = prefill_then_decode(model16, config, prompts, [3, 4, 5], dtype=torch.bfloat16)
    ours32, decode32 = prefill_then_decode(model32, config, prompts, [3, 4, 5])
    assert decode16.dtype == torch.float32
    for a, b in zip([*ours16, decode16], [*ours32, decode32], strict=True):
        assert_logits_close(a, b, rtol=0.1)
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8
