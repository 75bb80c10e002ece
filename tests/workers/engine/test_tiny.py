"""The tiny model maker writes folders transformers and peft load as if they were published checkpoints."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from workers.engine.config import ModelConfig
from workers.engine.models import build_model
from workers.engine.tiny import PRESETS, make_tiny_lora, make_tiny_model, tiny_config, train_tokenizer

ARCHES = ["llama", "mistral", "qwen2", "mixtral", "qwen2_moe"]
EXPERT_KEYS = {
    "mixtral": "model.layers.0.block_sparse_moe.experts.3.w1.weight",
    "qwen2_moe": "model.layers.0.mlp.experts.3.gate_proj.weight",
}


@pytest.mark.parametrize("arch", ARCHES)
def test_transformers_loads_and_resaves_the_same_checkpoint(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(arch, tmp_path / arch)
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected, mismatched or error keys
    assert type(model).__name__ == json.loads((path / "config.json").read_text())["architectures"][0]
    ours = load_file(str(path / "model.safetensors"))
    if arch in EXPERT_KEYS:
        assert EXPERT_KEYS[arch] in ours
    # transformers writes exactly our key names back: the on-disk format is HF's own.
    model.save_pretrained(tmp_path / "resaved")
    resaved = load_file(str(tmp_path / "resaved" / "model.safetensors"))
    assert resaved.keys() == ours.keys()
    assert all(torch.equal(resaved[k], ours[k]) for k in ours)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.decode(tok("Hello cluster")["input_ids"]) == "Hello cluster"
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = load_file(str(make_tiny_model("qwen2", tmp_path / "a", seed=7) / "model.safetensors"))
    b = load_file(str(make_tiny_model("qwen2", tmp_path / "b", seed=7) / "model.safetensors"))
    c = load_file(str(make_tiny_model("qwen2", tmp_path / "c", seed=8) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])
    assert "model.layers.0.self_attn.q_proj.bias" in a  # Qwen2's q/k/v bias
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "c" / "tokenizer.json").read_text()


def test_overrides_and_dtype_reach_the_folder(tmp_path):
    path = make_tiny_model("llama", tmp_path / "m", dtype="bf16", hidden_size=32, num_hidden_layers=3, vocab_size=300)
    cfg = json.loads((path / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["torch_dtype"]) == (
        32,
        3,
        300,
        "bfloat16",
    )
    tensors = load_file(str(path / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert tensors["model.embed_tokens.weight"].shape == (300, 32)
    assert json.loads((path / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    with pytest.raises(ValueError, match="unknown arch"):
        make_tiny_model("gpt2", tmp_path / "x")
    with pytest.raises(ValueError, match="unknown preset"):
        tiny_config("llama", preset="huge")


@pytest.mark.parametrize("vocab_size", [300, 512, 2048])
def test_tokenizer_is_a_trained_byte_level_bpe_of_the_requested_size(vocab_size):
    tok = train_tokenizer(vocab_size, seed=1)
    assert tok.get_vocab_size() == vocab_size
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    text = "Once upon a time the router moved a request — déjà vu 😀"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) * (0.8 if vocab_size < 512 else 0.6)  # merges were learned
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(100)


def test_bench_preset_is_the_18m_llama():
    cfg = tiny_config("llama", preset="bench")
    config = ModelConfig.from_dict(cfg)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (512, 6, 8)
    assert (config.num_key_value_heads, config.vocab_size, config.max_position_embeddings) == (4, 8192, 2048)
    num_params = sum(p.numel() for p in build_model(config, torch.float32).parameters())
    assert 17_500_000 < num_params < 19_000_000
    assert train_tokenizer(PRESETS["bench"]["vocab_size"]).get_vocab_size() == 8192


def test_lora_adapter_loads_in_peft_and_changes_outputs(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = make_tiny_lora(
        tiny_llama, tmp_path / "lora", rank=4, alpha=8, seed=3, target_modules=("q_proj", "down_proj")
    )
    config = json.loads((path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    assert set(tensors) == {
        f"base_model.model.model.layers.{i}.{module}.lora_{ab}.weight"
        for i in range(2)
        for module in ("self_attn.q_proj", "mlp.down_proj")
        for ab in "AB"
    }
    assert all(t.abs().mean() > 0.01 for t in tensors.values())  # B too: PEFT's own init would zero it
    ids = torch.tensor([[5, 9, 33, 100]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.inference_mode():
        before = base(ids).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = PeftModel.from_pretrained(base, path).eval()
    assert not [w for w in caught if "adapter" in str(w.message).lower()], [str(w.message) for w in caught]
    with torch.inference_mode():
        after = adapted(ids).logits
    assert (after - before).abs().max() > 0.1


def test_lora_targets_follow_the_architecture(tmp_path):
    mixtral = make_tiny_model("mixtral", tmp_path / "mixtral")
    path = make_tiny_lora(mixtral, tmp_path / "lora", rank=2)
    # Mixtral's MLPs are all routed experts, which PEFT cannot target: attention only.
    assert json.loads((path / "adapter_config.json").read_text())["target_modules"] == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    ]
    assert not any(".mlp." in k for k in load_file(str(path / "adapter_model.safetensors")))
    with pytest.raises(ValueError, match="none of"):
        make_tiny_lora(mixtral, tmp_path / "none", target_modules=("gate_proj",))
    with pytest.raises(ValueError, match="unsupported LoRA target"):
        make_tiny_lora(mixtral, tmp_path / "bad", target_modules=("lm_head",))
    with pytest.raises(ValueError, match="rank"):
        make_tiny_lora(mixtral, tmp_path / "rank", rank=0)
