"""Trainer test helpers: the shipped dataset, and a `Trainer` run on every rank of a gloo group spawned by
`torch.multiprocessing` (CPU, one thread per rank)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.trainer.config import TrainConfig
from workers.trainer.trainer import Trainer

DATASET = Path(__file__).resolve().parents[3] / "examples" / "jobs" / "copy_reverse.jsonl"
"""The shipped copy/reverse dataset every trainer test trains on."""


def make_config(model_path: Path, **overrides) -> TrainConfig:
    """A small full fine-tune of `model_path` on the shipped dataset; overrides are `TrainConfig` fields."""
    fields = {
        "model_path": str(model_path),
        "dataset_path": str(DATASET),
        "finetune": "full",
        "seq_len": 64,
        "global_batch_rows": 8,
        "micro_batch_rows": 8,
        "learning_rate": 3e-3,
        "max_steps": 40,
        **overrides,
    }
    return TrainConfig.from_dict(fields)


def run_ranks(configs: list[TrainConfig], world_size: int, num_steps: int, workdir: Path) -> list[dict]:
    """Train each config for `num_steps` on `world_size` gloo ranks, one after another in one spawn (starting
    processes dominates the cost); returns rank 0's losses, grad norms and full trainable state per config."""
    workdir.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_main, args=(configs, world_size, num_steps, str(workdir)), nprocs=world_size, join=True)
    return torch.load(workdir / "rank0.pt")


def run_single(config: TrainConfig, num_steps: int) -> dict:
    trainer = Trainer(config)
    return _train(trainer, num_steps)


def _train(trainer: Trainer, num_steps: int) -> dict:
    """Train; with a checkpoint directory, also save (sharded, asynchronously) after the first step."""
    metrics = [trainer.step()]
    if trainer.checkpoints is not None:
        trainer.save_checkpoint()
    metrics += [trainer.step() for _ in range(num_steps - 1)]
    trainer.wait_for_checkpoints()
    return {
        "losses": [m.loss for m in metrics],
        "grad_norms": [m.grad_norm for m in metrics],
        "world_sizes": [m.world_size for m in metrics],
        "state": trainer.state_dict(full=True)["model"],
    }


def _rank_main(rank: int, configs: list[TrainConfig], world_size: int, num_steps: int, workdir: str) -> None:
    torch.set_num_threads(1)
    init = f"file://{workdir}/rendezvous"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    try:
        results = [_train(Trainer(config), num_steps) for config in configs]
        if rank == 0:
            torch.save(results, Path(workdir) / "rank0.pt")
    finally:
        dist.destroy_process_group()
