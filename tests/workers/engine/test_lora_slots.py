"""LoRAManager: PEFT parsing errors, slot assignment and LRU eviction."""

from __future__ import annotations

import json

import pytest
import torch

from workers.engine.lora import LoRAManager, token_slots
from workers.engine.lora_layers import LoRAContext, LoRALinear
from workers.engine.tiny import make_tiny_lora


def _targets(model_dir) -> dict[str, LoRALinear]:
    from workers.engine.loader import load_model

    _, model = load_model(model_dir)
    return model.lora_targets()


def test_slots_lru_and_fixed_memory(tiny_llama, tiny_loras, tmp_path):
    targets = _targets(tiny_llama)
    manager = LoRAManager(targets, max_loras=2, max_lora_rank=8, dtype=torch.float32)
    before = {name: t.lora_a.data_ptr() for name, t in targets.items()}
    ids = {name: manager.add_adapter(name, path) for name, path in tiny_loras.items()}
    make_tiny_lora(tiny_llama, tmp_path / "c", rank=2, seed=5)
    ids["c"] = manager.add_adapter("c", tmp_path / "c")
    assert manager.activate([ids["a"], ids["b"]]) == {ids["a"]: 0, ids["b"]: 1}
    manager.activate([ids["a"]])  # "b" becomes least recently used
    slots = manager.activate([ids["c"]])
    assert slots == {ids["c"]: 1} and manager.num_evictions == 1
    assert manager.resident_adapters() == ["a", "c"]  # least recently used first; "b" was evicted
    with pytest.raises(ValueError, match="slots"):
        manager.activate(ids.values())
    assert {name: t.lora_a.data_ptr() for name, t in targets.items()} == before


def test_slot_contents_follow_rank_and_scaling(tiny_llama, tiny_loras):
    from safetensors.torch import load_file

    targets = _targets(tiny_llama)
    manager = LoRAManager(targets, max_loras=1, max_lora_rank=16, dtype=torch.float32)
    lora_id = manager.add_adapter("b", tiny_loras["b"])  # rank 4, alpha 4
    manager.activate([lora_id])
    raw = load_file(str(tiny_loras["b"] / "adapter_model.safetensors"))
    q = targets["model.layers.0.self_attn.q_proj"]
    a = raw["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = raw["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(q.lora_a[0, :4], a)
    assert q.lora_a[0, 4:].abs().sum() == 0
    torch.testing.assert_close(q.lora_b[0, :, :4], b * (4 / 4))


def _write_adapter(path, config_updates=None, drop=None):
    path.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none"}
    config.update(config_updates or {})
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_bad_adapters_are_refused(tiny_llama, tiny_loras, tmp_path):
    targets = _targets(tiny_llama)
    manager = LoRAManager(targets, max_loras=1, max_lora_rank=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="max_lora_rank"):
        manager.add_adapter("big", tiny_loras["a"])  # rank 8 > 4
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        manager.add_adapter("none", tmp_path)
    with pytest.raises(ValueError, match="safetensors"):
        manager.add_adapter("nofile", _write_adapter(tmp_path / "nofile"))
    from safetensors.torch import save_file

    odd = _write_adapter(tmp_path / "odd", {"bias": "all"})
    save_file({"x": torch.zeros(1)}, str(odd / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="bias"):
        manager.add_adapter("odd", odd)
    stray = _write_adapter(tmp_path / "stray")
    save_file(
        {
            "base_model.model.model.layers.0.mlp.nope.lora_A.weight": torch.zeros(4, 64),
            "base_model.model.model.layers.0.mlp.nope.lora_B.weight": torch.zeros(64, 4),
        },
        str(stray / "adapter_model.safetensors"),
    )
    with pytest.raises(ValueError, match="cannot adapt"):
        manager.add_adapter("stray", stray)
    assert manager.list_adapters() == []


def test_token_slots_expand_per_request():
    assert token_slots([-1, -1], [3, 1]) is None
    assert token_slots([0, -1, 1], [2, 1, 3]).tolist() == [0, 0, -1, 1, 1, 1]


def test_lora_linear_without_adapters_is_plain_linear():
    layer = LoRALinear(4, 3, bias=True, ctx=LoRAContext())
    torch.nn.init.normal_(layer.weight)
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)
