"""The trainer's one config: what to train, on what data, how, and where its checkpoints go."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

FINETUNE_MODES = ("lora", "full")
PARALLELISMS = ("ddp", "fsdp")
DTYPES = ("float32", "bfloat16")


@dataclass(kw_only=True, frozen=True)
class LoraSpec:
    """The PEFT LoRA adapter a `lora` job trains (its `adapter_config.json` on save)."""

    rank: int = 8
    """LoRA rank `r`."""
    alpha: float = 16.0
    """`lora_alpha`; the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter input; 0 keeps runs bit-identical across world sizes."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Module names to adapt; the engine serves adapters on these projections."""

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"lora.rank must be positive, got {self.rank}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"lora.alpha must be a positive finite number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module")


@dataclass(kw_only=True, frozen=True)
class CheckpointConfig:
    """Where and how often asynchronous checkpoints are written."""

    directory: str | None = None
    """Folder holding one `step-NNNNNNNN/` checkpoint per save; None disables checkpoints."""
    every_n_steps: int = 0
    """Start a save after every this many optimizer steps; 0 saves only when asked (`Trainer.save_checkpoint`)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted once a newer one is complete."""

    def __post_init__(self) -> None:
        if self.every_n_steps < 0:
            raise ValueError(f"checkpoint.every_n_steps must be >= 0, got {self.every_n_steps}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        if self.every_n_steps and self.directory is None:
            raise ValueError("checkpoint.every_n_steps needs checkpoint.directory")


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """One training run: model, data, optimisation and checkpoints. Identical on every rank."""

    model_path: str
    """HF-format model folder (config.json, safetensors, tokenizer.json), the same the engine serves."""
    dataset_path: str
    """JSONL file of {"prompt": ..., "completion": ...} objects; loss is taken on completion tokens only."""
    finetune: Literal["lora", "full"] = "lora"
    """`lora` trains a PEFT adapter on a frozen base; `full` trains every weight."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """The adapter, for `finetune="lora"`."""
    seq_len: int = 256
    """Tokens per packed row; several examples share a row, each attending only to itself."""
    global_batch_rows: int = 8
    """Packed rows per optimizer step over all ranks; kept constant when the world size changes."""
    micro_batch_rows: int = 2
    """Rows per forward/backward on one rank; a rank accumulates gradients over its share in such pieces."""
    learning_rate: float = 1e-4
    """Peak AdamW learning rate."""
    warmup_steps: int = 0
    """Linear warmup from 0 to `learning_rate` over this many steps; constant afterwards."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient L2 norm to this; None disables clipping."""
    max_steps: int = 100
    """Optimizer steps in the run."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype: bfloat16 runs the forward under autocast with fp32 master weights and optimizer state."""
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """With more than one rank: DDP (replicated weights) or FSDP2 `fully_shard` (sharded weights and state)."""
    device: str = "cpu"
    """`cpu`, or `cuda` (the rank's current CUDA device)."""
    seed: int = 0
    """Seeds the data order and, with the step and rank, every step's RNG."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Asynchronous checkpoints."""

    def __post_init__(self) -> None:
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.parallelism not in PARALLELISMS:
            raise ValueError(f"parallelism must be one of {PARALLELISMS}, got {self.parallelism!r}")
        for name in ("seq_len", "global_batch_rows", "micro_batch_rows", "max_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be a positive finite number, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.max_grad_norm is not None and (not math.isfinite(self.max_grad_norm) or self.max_grad_norm <= 0):
            raise ValueError(f"max_grad_norm must be a positive finite number or None, got {self.max_grad_norm}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        """Build from plain data (a job file's `train:` section); a bad field is a `ValueError` naming its path."""
        if not isinstance(raw, dict):
            raise ValueError(f"train config must be a mapping, got {type(raw).__name__}")
        raw = dict(raw)
        if "lora" in raw:
            raw["lora"] = _from_dict(LoraSpec, raw["lora"], prefix="lora.")
        if "checkpoint" in raw:
            raw["checkpoint"] = _from_dict(CheckpointConfig, raw["checkpoint"], prefix="checkpoint.")
        if "betas" in raw:
            raw["betas"] = tuple(raw["betas"])
        return _from_dict(cls, raw, prefix="")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _from_dict(cls: type, raw: Any, *, prefix: str) -> Any:
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"unknown field(s) {[prefix + k for k in unknown]}; known: {sorted(names)}")
    if cls is LoraSpec and "target_modules" in raw:
        raw = {**raw, "target_modules": tuple(raw["target_modules"])}
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in raw and _is_required(f))
    if missing:
        raise ValueError(f"missing required field(s) {[prefix + k for k in missing]}")
    return cls(**raw)


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
