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
from workers.engine.models.causal_lm import CausalLM

logger = logging.getLogger(__name__)


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder, single-file or sharded."""
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index} names shards that are missing: {missing}")
        return files
    raise ValueError(f"{path} has no model.safetensors or model.safetensors.index.json")


def iter_weights(files: list[Path], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name).to(dtype)


def load_model(path: str | Path, dtype: torch.dtype | str | None = None) -> tuple[ModelConfig, CausalLM]:
    """Read the config, build the model in `dtype` (the checkpoint's when None) and load its weights."""
    path = Path(path)
    config = ModelConfig.from_pretrained(path)
    if dtype is None:
        # Checkpoints saved in a dtype we do not compute in (e.g. float64) run in float32.
        dtype = config.torch_dtype if config.torch_dtype in ("float32", "bfloat16", "float16") else "float32"
    dtype = parse_dtype(dtype)
    files = checkpoint_files(path)
    model = build_model(config, dtype)
    model.load_weights(iter_weights(files, dtype))
    logger.info(
        "model loaded path=%s arch=%s dtype=%s params=%d shards=%d",
        path,
        config.architecture,
        dtype,
        sum(p.numel() for p in model.parameters()),
        len(files),
    )
    return config, model
