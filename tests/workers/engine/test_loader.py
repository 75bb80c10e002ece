"""The loader and tokenizer: checkpoint layouts, dtypes, error messages, special tokens, no transformers at runtime."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from workers.engine.config import ModelConfig
from workers.engine.loader import load_model, resolve_dtype
from workers.engine.models import build_model
from workers.engine.tiny import make_tiny_model
from workers.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama") / "m", seed=0)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return make_tiny_model("mixtral", tmp_path_factory.mktemp("mixtral") / "m", seed=0)


def copy_folder_without_weights(src, dst):
    dst.mkdir()
    for file in src.iterdir():
        if not file.name.startswith("model"):
            (dst / file.name).write_bytes(file.read_bytes())
    return dst


def assert_same_parameters(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def test_sharded_checkpoint_loads_like_single(llama_dir, tmp_path):
    tensors = load_file(str(llama_dir / "model.safetensors"))
    sharded = copy_folder_without_weights(llama_dir, tmp_path / "sharded")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / file))
        weight_map.update(dict.fromkeys(keys, file))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_parameters(load_model(llama_dir)[1], load_model(sharded)[1])
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002"):
        load_model(sharded)


def test_transformers5_fused_expert_keys_load_like_per_expert_keys(mixtral_dir, tmp_path):
    """transformers 5 keeps experts stacked in memory (`mlp.experts.gate_up_proj`); we accept that layout too."""
    config = ModelConfig.from_pretrained(mixtral_dir)
    tensors = load_file(str(mixtral_dir / "model.safetensors"))
    fused = {}
    for name, tensor in tensors.items():
        if ".experts." not in name:
            fused[name.replace(".block_sparse_moe.", ".mlp.")] = tensor
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.block_sparse_moe.experts"
        experts = range(config.num_experts)
        fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{p}.{e}.w1.weight"], tensors[f"{p}.{e}.w3.weight"]]) for e in experts]
        )
        fused[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([tensors[f"{p}.{e}.w2.weight"] for e in experts])
    other = copy_folder_without_weights(mixtral_dir, tmp_path / "fused")
    save_file(fused, str(other / "model.safetensors"))
    assert_same_parameters(load_model(mixtral_dir)[1], load_model(other)[1])


def test_missing_unknown_and_misshapen_tensors_are_named(llama_dir, mixtral_dir, tmp_path):
    def write(src, name, tensors):
        folder = copy_folder_without_weights(src, tmp_path / name)
        save_file(tensors, str(folder / "model.safetensors"))
        return folder

    tensors = load_file(str(llama_dir / "model.safetensors"))
    norm = tensors.pop("model.norm.weight")
    with pytest.raises(ValueError, match=r"missing .*model\.norm\.weight"):
        load_model(write(llama_dir, "missing", tensors))
    with pytest.raises(ValueError, match="mystery"):
        load_model(
            write(llama_dir, "unknown", {**tensors, "model.norm.weight": norm, "model.mystery.weight": norm.clone()})
        )
    with pytest.raises(ValueError, match=r"model\.norm\.weight: checkpoint shape \(3,\), model expects \(64,\)"):
        load_model(write(llama_dir, "misshapen", {**tensors, "model.norm.weight": torch.ones(3)}))
    # One expert's up projection (w3) missing leaves its stacked parameter half filled.
    moe = load_file(str(mixtral_dir / "model.safetensors"))
    moe.pop("model.layers.1.block_sparse_moe.experts.3.w3.weight")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.w_gate_up"):
        load_model(write(mixtral_dir, "expert", moe))


def test_tied_checkpoint_that_also_stores_lm_head(tmp_path):
    path = make_tiny_model("llama", tmp_path / "m", tie_word_embeddings=True)
    tensors = load_file(str(path / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    save_file(
        {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, str(path / "model.safetensors")
    )
    _, model = load_model(path)
    assert model.lm_head is None
    hidden = torch.randn(2, 64)
    torch.testing.assert_close(model.compute_logits(hidden), hidden @ tensors["model.embed_tokens.weight"].t())


def test_dtype_resolution(tmp_path):
    path = make_tiny_model("mixtral", tmp_path / "m", dtype="bfloat16")
    config, model = load_model(path)
    assert config.torch_dtype == "bfloat16"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_model(path, dtype="float32")[1].parameters()} == {torch.float32}
    assert {p.dtype for p in load_model(path, dtype=torch.float16)[1].parameters()} == {torch.float16}
    assert resolve_dtype(config, "auto") == resolve_dtype(config, None) == torch.bfloat16
    assert resolve_dtype(ModelConfig.from_dict({**config.raw, "torch_dtype": "float64"}), "auto") == torch.float32
    assert resolve_dtype(ModelConfig.from_dict({**config.raw, "dtype": "float16", "torch_dtype": None}), None) == (
        torch.float16
    )
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(path, dtype="int3")
    assert torch.get_default_dtype() == torch.float32  # building in bf16 must not leak the default


def test_not_a_model_folder_and_unsupported_configs(llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"config\.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported"):
        load_model(tmp_path)
    raw = ModelConfig.from_pretrained(llama_dir).raw
    with pytest.raises(ValueError, match="hidden_act"):
        build_model(ModelConfig.from_dict({**raw, "hidden_act": "gelu"}), torch.float32)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_model(copy_folder_without_weights(llama_dir, tmp_path / "empty"))


def test_sliding_window_limits_max_model_len(tmp_path, caplog):
    mistral = make_tiny_model("mistral", tmp_path / "mistral", sliding_window=128)
    with caplog.at_level("WARNING"):
        _, model = load_model(mistral)
    assert model.max_model_len == 128 and "sliding_window=128" in caplog.text
    # Qwen2 configs carry a window that only applies with use_sliding_window.
    qwen = make_tiny_model("qwen2", tmp_path / "qwen", sliding_window=128, use_sliding_window=False)
    assert load_model(qwen)[1].max_model_len == 512


def test_tokenizer_matches_transformers(llama_dir):
    from transformers import AutoTokenizer

    ours, theirs = Tokenizer.from_pretrained(llama_dir), AutoTokenizer.from_pretrained(llama_dir)
    text = "The quick brown fox, naïve café 東京 😀, jumps over the lazy dog!"
    ids = ours.encode(text)
    assert ids == theirs(text)["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids) == text
    assert ours.eos_token_ids == (theirs.eos_token_id,) == (2,)
    assert ours.bos_token_id == theirs.bos_token_id == 1
    assert ours.vocab_size == 512 and ours.token_to_id("</s>") == 2
    assert ours.decode([1, *ids, 2]) == text  # special tokens are skipped by default


def test_tokenizer_special_ids_fall_back_to_generation_and_model_config(llama_dir, tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((llama_dir / "tokenizer.json").read_bytes())
    assert Tokenizer.from_pretrained(folder).eos_token_ids == ()
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [2, 7], "bos_token_id": 1}))
    tok = Tokenizer.from_pretrained(folder)
    assert tok.eos_token_ids == (2, 7) and tok.bos_token_id == 1
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert Tokenizer.from_pretrained(folder).eos_token_ids == (9,)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<unk>", "special": True}}))
    assert Tokenizer.from_pretrained(folder).eos_token_ids == (0,)
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_runtime_modules_never_import_transformers(llama_dir):
    code = (
        "import sys\n"
        "from workers.engine.loader import load_model\n"
        "from workers.engine.tokenizer import Tokenizer\n"
        f"load_model({str(llama_dir)!r}); Tokenizer.from_pretrained({str(llama_dir)!r}).encode('hi')\n"
        "assert 'transformers' not in sys.modules and 'peft' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
