"""The engine against transformers: same greedy tokens, same per-step logits.

transformers is the oracle. Prompts of different lengths run as one continuous
batch on our side and one by one through `generate` on the HF side.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from tests.workers.engine.calls import make_call
from workers.engine.engine import Engine
from workers.engine.sampling_params import SamplingParams

NUM_NEW_TOKENS = 32
LOGITS_RTOL = 1e-4


def hf_greedy(model_dir, prompts: list[list[int]], *, peft_adapters=None, adapter_names=None):
    """Greedy tokens and per-step logits from transformers `generate`, one prompt at a time."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if peft_adapters:
        from peft import PeftModel

        names = list(peft_adapters)
        model = PeftModel.from_pretrained(model, peft_adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(peft_adapters[name], adapter_name=name)
    model.eval()
    config = GenerationConfig(
        do_sample=False, max_new_tokens=NUM_NEW_TOKENS, eos_token_id=None, pad_token_id=0, bos_token_id=None
    )
    results = []
    for i, prompt in enumerate(prompts):
        kwargs = {}
        if adapter_names is not None:
            kwargs["adapter_names"] = [adapter_names[i] or "__base__"]
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt]),
                generation_config=config,
                output_logits=True,
                return_dict_in_generate=True,
                **kwargs,
            )
        tokens = out.sequences[0, len(prompt) :].tolist()
        logits = torch.stack([step[0] for step in out.logits])
        results.append((tokens, logits))
    return results


def run_engine(model_dir, prompts, *, lora_paths=None, lora_names=None, warmup=(), **engine_kwargs):
    """Greedy tokens and per-step logits from our engine, all prompts in one continuous batch."""
    engine = Engine.from_pretrained(str(model_dir), dtype="float32", **engine_kwargs)
    for name, path in (lora_paths or {}).items():
        engine.add_lora(name, str(path))
    if warmup:
        engine.generate(list(warmup), SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False))
    captured: dict[str, list[torch.Tensor]] = {}
    execute = engine.runner.execute

    def spy(inputs, lora_slots=None):
        logits = execute(inputs, lora_slots)
        for row, rid in enumerate(inputs.sampling_request_ids):
            captured.setdefault(rid, []).append(logits[row].clone())
        return logits

    engine.runner.execute = spy
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, ignore_eos=True, detokenize=False)
    for i, prompt in enumerate(prompts):
        engine.add_request(make_call(f"r{i}", prompt, params, lora_name=(lora_names or [None] * len(prompts))[i]))
    outputs = {}
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                outputs[out.request_id] = out
    return (
        engine,
        [(tokens[f"r{i}"], torch.stack(captured[f"r{i}"])) for i in range(len(prompts))],
        outputs,
    )


def assert_matches(ours, theirs):
    for i, ((tokens, logits), (hf_tokens, hf_logits)) in enumerate(zip(ours, theirs, strict=True)):
        assert tokens == hf_tokens, f"prompt {i}: tokens differ\nours={tokens}\nhf  ={hf_tokens}"
        assert logits.shape == hf_logits.shape
        torch.testing.assert_close(logits, hf_logits, rtol=LOGITS_RTOL, atol=LOGITS_RTOL * hf_logits.abs().max().item())


def random_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def hf_reference(tiny_models):
    cache = {}

    def get(arch, prompts_key, prompts):
        if (arch, prompts_key) not in cache:
            cache[arch, prompts_key] = hf_greedy(tiny_models[arch], prompts)
        return cache[arch, prompts_key]

    return get


PROMPT_LENGTHS = [5, 17, 33, 48]


@pytest.mark.parametrize("arch", ["llama", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize(
    "variant",
    [
        pytest.param({"enable_prefix_caching": False}, id="plain"),
        pytest.param({"enable_prefix_caching": True}, id="prefix-cache"),
        pytest.param({"max_num_batched_tokens": 16, "max_num_seqs": 4}, id="chunked"),
    ],
)
def test_greedy_matches_transformers(tiny_models, hf_reference, arch, variant):
    vocab = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).config.vocab_size
    prompts = random_prompts(vocab, PROMPT_LENGTHS)
    theirs = hf_reference(arch, "mixed-lengths", prompts)
    _, ours, _ = run_engine(tiny_models[arch], prompts, **variant)
    assert_matches(ours, theirs)


def test_prefix_cache_hits_keep_tokens_exact(tiny_models):
    """Prompts sharing a long prefix reuse cached blocks and still match transformers."""
    model_dir = tiny_models["llama"]
    shared = random_prompts(256, [40], seed=3)[0]
    prompts = [shared + tail for tail in random_prompts(256, [3, 9], seed=4)]
    _, ours, outputs = run_engine(model_dir, prompts, enable_prefix_caching=True, warmup=[shared])
    assert_matches(ours, hf_greedy(model_dir, prompts))
    assert [o.num_cached_tokens for o in outputs.values()] == [32, 32]  # two full blocks of 16 each


def test_prefix_cache_reuses_blocks_across_requests(tiny_models):
    model_dir = tiny_models["llama"]
    shared = random_prompts(256, [40], seed=5)[0]
    engine = Engine.from_pretrained(str(model_dir), dtype="float32", enable_prefix_caching=True)
    first = engine.generate([[*shared, 7, 8]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    second = engine.generate([[*shared, 9]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 32  # two full blocks of 16
    assert engine.stats().prefix_cache_hit_rate > 0
    fresh = Engine.from_pretrained(str(model_dir), dtype="float32", enable_prefix_caching=False)
    assert fresh.generate([[*shared, 9]], SamplingParams(max_tokens=4, ignore_eos=True))[0].output_token_ids == (
        second.output_token_ids
    )


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_dense_archs_match_transformers(tmp_path, arch):
    from workers.engine.tiny import make_tiny_model

    model_dir = make_tiny_model(arch, tmp_path / arch, seed=4)
    prompts = random_prompts(256, [6, 21], seed=8)
    _, ours, _ = run_engine(model_dir, prompts)
    assert_matches(ours, hf_greedy(model_dir, prompts))


def test_llama3_rope_scaling_and_tied_embeddings_match_transformers(tmp_path):
    from workers.engine.tiny import make_tiny_model

    model_dir = make_tiny_model(
        "llama",
        tmp_path / "llama3",
        seed=5,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )
    prompts = random_prompts(256, [9, 40], seed=9)  # positions beyond the original 32-token context
    _, ours, _ = run_engine(model_dir, prompts, max_num_batched_tokens=16, max_num_seqs=2)
    assert_matches(ours, hf_greedy(model_dir, prompts))
