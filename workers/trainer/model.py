"""The trainable model: a transformers causal LM (the engine's own model is inference-only), optionally under a
PEFT LoRA adapter, wrapped for data parallelism (DDP) or sharding (FSDP2), and its export in HF/PEFT format."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM
from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401 - packing relies on it; fail early

from workers.trainer.config import TrainConfig

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
"""Copied beside an exported full model so the engine (and transformers) load it as they load the base."""


def require_model_folder(model_path: str | Path) -> Path:
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model_path {path} is not an HF model folder (no config.json)")
    return path


def load_trainable_model(config: TrainConfig) -> torch.nn.Module:
    """The base model in fp32 (master weights), under a fresh LoRA adapter for `finetune="lora"`."""
    path = require_model_folder(config.model_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    model.to(config.device)
    if config.finetune == "lora":
        spec = config.lora
        peft_config = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=list(spec.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, peft_config)
        except ValueError as e:
            raise ValueError(f"lora.target_modules={list(spec.target_modules)}: {e}") from None
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("trainer model loaded path=%s finetune=%s trainable_params=%d", path, config.finetune, num_trainable)
    return model


def wrap_for_parallelism(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """DDP or FSDP2 over the default process group when it has more than one rank; the model itself otherwise."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    if config.parallelism == "ddp":
        device_ids = [torch.device(config.device).index or 0] if config.device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=device_ids)
    # One FSDP unit per decoder layer, so only one layer's full weights exist at a time, plus the root.
    for module in list(model.modules()):
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module)
    fully_shard(model)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers/PEFT model inside a DDP wrapper (FSDP2 shards in place and has no wrapper)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def full_model_state(model: torch.nn.Module, *, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Every rank must call this (FSDP2 gathers); every rank gets the full, unsharded tensors on CPU."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def save_trained(model: torch.nn.Module, config: TrainConfig, out_dir: str | Path, *, is_writer: bool) -> Path | None:
    """Write the trained result: a PEFT adapter folder (lora) or an HF model folder with its tokenizer (full).

    Collective under FSDP2: call it on every rank; only the writer rank touches the disk.
    """
    out = Path(out_dir)
    inner = unwrap(model)
    state = full_model_state(model, trainable_only=config.finetune == "lora")
    if not is_writer:
        return None
    out.mkdir(parents=True, exist_ok=True)
    # PEFT's save_pretrained renames in-memory adapter keys to the on-disk format the engine's LoRA loader reads.
    inner.save_pretrained(out, state_dict=state, safe_serialization=True)
    if not isinstance(inner, PeftModel):
        for name in TOKENIZER_FILES:
            source = Path(config.model_path) / name
            if source.is_file() and not (out / name).exists():
                shutil.copyfile(source, out / name)
    logger.info("trainer saved result kind=%s path=%s tensors=%d", config.finetune, out, len(state))
    return out
