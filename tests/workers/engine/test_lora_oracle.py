"""Multi-LoRA batches against peft's PeftModel: two adapters and the base model in one batch."""

from __future__ import annotations

from tests.workers.engine.test_oracle import assert_matches, hf_greedy, random_prompts, run_engine


def test_mixed_adapter_batch_matches_peft(tiny_llama, tiny_loras):
    prompts = random_prompts(256, [6, 19, 11, 27, 8], seed=11)
    names = ["a", "b", None, "a", "b"]
    theirs = hf_greedy(tiny_llama, prompts, peft_adapters=tiny_loras, adapter_names=names)
    _, ours, _ = run_engine(tiny_llama, prompts, lora_paths=tiny_loras, lora_names=names, max_loras=2)
    assert_matches(ours, theirs)


def test_adapters_change_the_output(tiny_llama, tiny_loras):
    """Guards the oracle test: an adapter that did nothing would pass it trivially."""
    prompt = random_prompts(256, [12], seed=12)[0]
    _, ours, _ = run_engine(tiny_llama, [prompt] * 3, lora_paths=tiny_loras, lora_names=["a", "b", None])
    (_tok_a, logit_a), (_tok_b, logit_b), (_tok_base, logit_base) = ours
    assert (logit_a - logit_base).abs().max() > 1e-2
    assert (logit_b - logit_base).abs().max() > 1e-2


def test_one_slot_serialises_adapters_and_stays_exact(tiny_llama, tiny_loras):
    """With one slot, the scheduler never mixes two adapters in a batch; base requests run alongside."""
    prompts = random_prompts(256, [7, 9, 5], seed=13)
    names = ["a", "b", None]
    theirs = hf_greedy(tiny_llama, prompts, peft_adapters=tiny_loras, adapter_names=names)
    engine, ours, _ = run_engine(tiny_llama, prompts, lora_paths=tiny_loras, lora_names=names, max_loras=1)
    assert_matches(ours, theirs)
    assert engine.lora.num_evictions == 1
