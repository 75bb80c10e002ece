"""Load an HF-format model folder: `config.json` plus `model.safetensors` or a sharded index."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from workers.engine.config import ModelConfig, parse_dtype
from workers.engine.models import build_model
from workers.engine.models.llama import LlamaForCausalLM
from workers.engine.quant import quantize_linear_layers

logger = logging.getLogger(__name__)

_COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder, single-file or sharded (in index order)."""
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} names shards that are missing: {missing}")
        return files
    raise ValueError(f"{path} has no model.safetensors or model.safetensors.index.json")


def iter_weights(files: list[Path], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of `files` as `(name, tensor in dtype)`, one at a time so memory stays one tensor deep."""
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name).to(dtype)


def resolve_dtype(config: ModelConfig, dtype: torch.dtype | str | None) -> torch.dtype:
    """`dtype`, or for None / `auto` the checkpoint's own dtype (float32 when we cannot compute in it)."""
    if dtype is None or dtype == "auto":
        # e.g. float64 or int8-quantised checkpoints are computed in float32.
        return parse_dtype(config.torch_dtype if config.torch_dtype in _COMPUTE_DTYPES else "float32")
    return parse_dtype(dtype)


def load_model(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    *,
    quantization: str | None = None,
    quantization_group_size: int = 128,
) -> tuple[ModelConfig, LlamaForCausalLM]:
    """Read the config, build the model in `dtype` (None or `auto`: the checkpoint's) and load its weights.

    `quantization="w4a16"` then stores its linear layers as group-wise int4 (`EngineConfig.quantization`).
    """
    if quantization not in (None, "w4a16"):
        raise ValueError(f"quantization must be None or 'w4a16', got {quantization!r}")
    path = Path(path)
    config = ModelConfig.from_pretrained(path)
    torch_dtype = resolve_dtype(config, dtype)
    files = checkpoint_files(path)
    model = build_model(config, torch_dtype)
    model.load_weights(iter_weights(files, torch_dtype))
    if quantization == "w4a16":
        quantize_linear_layers(model, group_size=quantization_group_size)
    logger.info(
        "model loaded path=%s arch=%s dtype=%s params=%d shards=%d",
        path,
        config.architecture,
        torch_dtype,
        sum(p.numel() for p in model.parameters()),  # w4a16 codes are buffers, not counted
        len(files),
    )
    return config, model
