"""The engine's W4A16 option: `load_model(..., quantization="w4a16")` swaps dense projections for int4 ones."""

from __future__ import annotations

import pytest
import torch

from kernels import ops
from workers.engine.config import EngineConfig
from workers.engine.loader import load_model
from workers.engine.lora_layers import LoRALinear
from workers.engine.tiny import make_tiny_model


def test_load_model_quantizes_every_projection(tmp_path):
    model_dir = make_tiny_model("llama", tmp_path / "llama", seed=3)
    _, dense = load_model(model_dir)
    _, quantized = load_model(model_dir, quantization="w4a16", quantization_group_size=32)
    layers = {name: m for name, m in quantized.named_modules() if isinstance(m, LoRALinear)}
    assert layers and all(m.weight is None and m.qweight.dtype == torch.int32 for m in layers.values())
    dense_layers = dict(dense.named_modules())
    for name, layer in layers.items():
        reference = dense_layers[name]
        x = torch.randn(3, layer.in_features)
        expected = x @ ops.dequantize_w4(layer.qweight, layer.scales, 32) + (
            0 if reference.bias is None else reference.bias
        )
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        # The int4 weight stays within half a quantisation step of the dense one.
        step = layer.scales.repeat_interleave(32, 0).t()
        error = (ops.dequantize_w4(layer.qweight, layer.scales, 32).t() - reference.weight).abs()
        assert (error <= step / 2 + 1e-6).all()


def test_quantization_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(model="m", quantization="int8")
    with pytest.raises(ValueError, match="multiple of 8"):
        EngineConfig(model="m", quantization="w4a16", quantization_group_size=12)
    with pytest.raises(ValueError, match="quantization"):
        load_model(tmp_path, quantization="gptq")
