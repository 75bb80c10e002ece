"""Trained results serve: a LoRA adapter (PEFT format) and a full fine-tune (HF folder) load in our engine and match
transformers/peft."""

from __future__ import annotations

import json

import pytest
import torch

from tests.workers.engine.test_oracle import assert_matches, hf_greedy, run_engine
from workers.engine.tokenizer import Tokenizer
from workers.trainer.trainer import Trainer


@pytest.fixture(scope="module")
def trained_adapter(tiny_llama, tmp_path_factory):
    from trainer_helpers import DATASET

    from workers.trainer.config import TrainConfig

    config = TrainConfig(
        model_path=str(tiny_llama),
        dataset_path=str(DATASET),
        finetune="lora",
        seq_len=64,
        global_batch_rows=8,
        micro_batch_rows=8,
        learning_rate=1e-2,
    )
    trainer = Trainer(config)
    losses = [trainer.step().loss for _ in range(10)]
    assert losses[-1] < losses[0]
    return trainer.save_result(tmp_path_factory.mktemp("adapter") / "copy-reverse")


def test_the_saved_adapter_is_peft_format(trained_adapter):
    adapter_config = json.loads((trained_adapter / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 8
    assert (trained_adapter / "adapter_model.safetensors").is_file()


def test_the_engine_serves_the_trained_adapter_as_peft_does(tiny_llama, trained_adapter):
    tokenizer = Tokenizer.from_pretrained(tiny_llama)
    prompts = [
        [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
        for text in (
            "copy: river city light\n",
            "reverse: quick brown fox lazy\n",
        )
    ]
    adapters = {"trained": trained_adapter}
    theirs = hf_greedy(tiny_llama, prompts, peft_adapters=adapters, adapter_names=["trained", "trained"])
    _, ours, _ = run_engine(tiny_llama, prompts, lora_paths=adapters, lora_names=["trained", "trained"])
    # transformers stops at the EOS the adapter learned to emit (the model's generation_config names it); the
    # engine runs on with ignore_eos, so compare the steps both took.
    assert_matches([(t[: len(h)], lg[: len(h)]) for (t, lg), (h, _) in zip(ours, theirs, strict=True)], theirs)
    _, base, _ = run_engine(tiny_llama, prompts)
    for (_, logits), (_, base_logits) in zip(ours, base, strict=True):
        assert (logits - base_logits).abs().max() > 1e-2  # training moved the adapter off its zero start
    assert any(t != b for (t, _), (b, _) in zip(ours, base, strict=True))
    assert torch.isfinite(ours[0][1]).all()


def test_a_full_fine_tune_exports_a_model_the_engine_serves(train_config, tiny_llama, tmp_path):
    trainer = Trainer(train_config())
    for _ in range(5):
        trainer.step()
    out = trainer.save_result(tmp_path / "full")
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    prompts = [[1, 311, 308, 315, 28, 460]]
    _, ours, _ = run_engine(out, prompts)
    theirs = hf_greedy(out, prompts)
    assert_matches([(t[: len(h)], lg[: len(h)]) for (t, lg), (h, _) in zip(ours, theirs, strict=True)], theirs)
    _, base, _ = run_engine(tiny_llama, prompts)
    assert (ours[0][1] - base[0][1]).abs().max() > 1e-2
