"""Model folders: the tiny maker writes real HF format; the loader reads single, sharded and bf16 checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.engine.config import ModelConfig
from workers.engine.loader import load_model
from workers.engine.tiny import make_tiny_model


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "mixtral", "qwen2_moe"])
def test_transformers_loads_tiny_folders(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(arch, tmp_path / arch)
    _, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.decode(tok("Hello cluster")["input_ids"]) == "Hello cluster"
    assert tok.eos_token_id == 2


def test_config_fields(tmp_path):
    path = make_tiny_model(
        "llama",
        tmp_path / "m",
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    )
    config = ModelConfig.from_pretrained(path)
    assert config.tie_word_embeddings and config.rope_scaling["rope_type"] == "llama3"
    assert config.num_key_value_heads < config.num_attention_heads
    _, model = load_model(path)
    assert model.lm_head is None


def test_sharded_checkpoint_loads_like_single(tmp_path):
    path = make_tiny_model("llama", tmp_path / "single")
    tensors = load_file(str(path / "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((path / name).read_bytes())
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / file))
        weight_map.update(dict.fromkeys(keys, file))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, a = load_model(path)
    _, b = load_model(sharded)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)


def test_missing_and_unknown_tensors_are_named(tmp_path):
    path = make_tiny_model("llama", tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    tensors.pop("model.norm.weight")
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing .*model\.norm\.weight"):
        load_model(path)
    tensors["model.norm.weight"] = torch.ones(64)
    tensors["model.layers.0.mystery.weight"] = torch.ones(2)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="mystery"):
        load_model(path)


def test_bf16_checkpoint_and_dtype_override(tmp_path):
    path = make_tiny_model("mixtral", tmp_path / "m", dtype="bfloat16")
    config, model = load_model(path)
    assert config.torch_dtype == "bfloat16" and next(model.parameters()).dtype == torch.bfloat16
    _, model32 = load_model(path, dtype="float32")
    assert next(model32.parameters()).dtype == torch.float32


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported"):
        load_model(tmp_path)
