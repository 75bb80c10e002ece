"""`Trainer`: one optimizer step at a time over packed prompt/completion rows, on one rank of a job.

Plain torch: the caller (a train-pool actor, a test, a script) sets up `torch.distributed` first when the job has
more than one rank; the trainer then runs DDP or FSDP2 over the default group.

Exactness across world sizes and micro-batch splits: every rank knows the whole global batch (the row order is a
function of the seed), so each micro-batch's summed token loss is divided by the global batch's target-token count,
and multiplied by the world size to undo the data-parallel gradient average. The gradient is then the same mean
token loss gradient whatever the split, up to float summation order.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from workers.engine.tokenizer import Tokenizer
from workers.trainer.checkpoint import CheckpointWriter, latest_checkpoint
from workers.trainer.config import TrainConfig
from workers.trainer.data import IGNORE_INDEX, BatchOrder, micro_batches, pack_examples, rank_share, read_examples
from workers.trainer.model import (
    load_trainable_model,
    require_model_folder,
    save_trained,
    unwrap,
    wrap_for_parallelism,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepMetrics:
    """What one optimizer step did; the same on every rank."""

    step: int
    """Optimizer steps done, this one included."""
    loss: float
    """Mean token loss over the global batch's completion tokens."""
    grad_norm: float
    """Global gradient L2 norm before clipping."""
    learning_rate: float
    """Learning rate this step used."""
    num_tokens: int
    """Non-padding tokens in the global batch."""
    num_target_tokens: int
    """Tokens that carried loss."""
    step_s: float
    """Wall time of the step."""
    tokens_per_s: float
    """`num_tokens / step_s`."""
    world_size: int
    """Ranks that ran the step."""
    last_checkpoint_step: int | None
    """Newest complete checkpoint, if any."""


class Trainer:
    """Causal-LM fine-tuning (LoRA or full) with AdamW, clipping, gradient accumulation and async checkpoints."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self._init_topology()
        self._init_data()
        self._init_model()
        self._init_checkpoints()
        self.step_count = 0
        """Optimizer steps done; also the data cursor (global batch `step_count` is next)."""

    def _init_topology(self) -> None:
        self.is_distributed = dist.is_initialized()
        self.rank = dist.get_rank() if self.is_distributed else 0
        self.world_size = dist.get_world_size() if self.is_distributed else 1

    def _init_data(self) -> None:
        tokenizer = Tokenizer.from_pretrained(require_model_folder(self.config.model_path))
        self.rows = pack_examples(read_examples(self.config.dataset_path, tokenizer), self.config.seq_len)
        self.order = BatchOrder(
            num_rows=self.rows.num_rows, global_batch_rows=self.config.global_batch_rows, seed=self.config.seed
        )
        if self.world_size > self.config.global_batch_rows:
            raise ValueError(f"world size {self.world_size} exceeds global_batch_rows={self.config.global_batch_rows}")

    def _init_model(self) -> None:
        # The adapter's initial A matrices are random: seeding makes every rank and every restart draw the same.
        torch.manual_seed(self.config.seed)
        self.model = wrap_for_parallelism(load_trainable_model(self.config), self.config)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=self.config.learning_rate,
            betas=self.config.betas,
            weight_decay=self.config.weight_decay,
        )

    def _init_checkpoints(self) -> None:
        has_directory = self.config.checkpoint.directory is not None
        self.checkpoints = CheckpointWriter(self.config.checkpoint) if has_directory else None

    @property
    def is_finished(self) -> bool:
        """True once `max_steps` optimizer steps are done; `step()` itself does not stop there."""
        return self.step_count >= self.config.max_steps

    def learning_rate(self, step: int) -> float:
        """Linear warmup over `warmup_steps`, then constant: a pure function of the step, so no scheduler state."""
        warmup = self.config.warmup_steps
        return self.config.learning_rate * min(1.0, (step + 1) / warmup) if warmup else self.config.learning_rate

    def step(self) -> StepMetrics:
        """Run one optimizer step over the next global batch (collective: every rank calls it)."""
        started = time.perf_counter()
        last_checkpoint = self.checkpoints.poll() if self.checkpoints else None
        # Every step's randomness (LoRA dropout) is a function of (seed, step, rank): nothing to carry on resume.
        torch.manual_seed(self.config.seed * 1_000_003 + self.step_count * 1009 + self.rank)
        rows = self.order.global_batch(self.step_count)
        num_targets = int((self.rows.labels[rows] != IGNORE_INDEX).sum())
        micros = micro_batches(rank_share(rows, self.rank, self.world_size), self.config.micro_batch_rows)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for index, micro in enumerate(micros):
            with self._gradient_sync(index == len(micros) - 1):
                token_loss = self._forward_loss(micro)
                (token_loss * (self.world_size / max(num_targets, 1))).backward()
            loss_sum += token_loss.detach().double().cpu()
        if self.is_distributed:
            dist.all_reduce(loss_sum)
        grad_norm = self._clip_gradients()
        lr = self.learning_rate(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.step_count += 1
        every = self.config.checkpoint.every_n_steps
        if self.checkpoints and every and self.step_count % every == 0:
            self.save_checkpoint()
        step_s = time.perf_counter() - started
        num_tokens = int(self.rows.num_tokens[rows].sum())
        metrics = StepMetrics(
            step=self.step_count,
            loss=float(loss_sum) / max(num_targets, 1),
            grad_norm=grad_norm,
            learning_rate=lr,
            num_tokens=num_tokens,
            num_target_tokens=num_targets,
            step_s=step_s,
            tokens_per_s=num_tokens / step_s,
            world_size=self.world_size,
            last_checkpoint_step=last_checkpoint,
        )
        logger.info(
            "train step step=%d loss=%.5f grad_norm=%.4f lr=%.3g tokens=%d tokens_per_s=%.1f world=%d",
            metrics.step,
            metrics.loss,
            metrics.grad_norm,
            lr,
            num_tokens,
            metrics.tokens_per_s,
            self.world_size,
        )
        return metrics

    def _forward_loss(self, micro: list[int]) -> torch.Tensor:
        """Summed cross-entropy over the micro-batch's target tokens."""
        device = self.config.device
        input_ids = self.rows.input_ids[micro].to(device)
        position_ids = self.rows.position_ids[micro].to(device)
        labels = self.rows.labels[micro].to(device)
        is_bf16 = self.config.dtype == "bfloat16"
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=is_bf16):
            # No attention mask and no cache: transformers reads the restarting position_ids as packed sequences.
            logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        return F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    def _gradient_sync(self, is_last_micro_batch: bool):
        """Reduce gradients across ranks only on a rank's last micro-batch of the step."""
        if isinstance(self.model, DistributedDataParallel) and not is_last_micro_batch:
            return self.model.no_sync()
        if isinstance(self.model, FSDPModule):
            self.model.set_requires_gradient_sync(is_last_micro_batch)
        return contextlib.nullcontext()

    def _clip_gradients(self) -> float:
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.config.max_grad_norm, norm)
        return float(norm)

    # --- state: checkpoints and in-memory hand-over -------------------------------------------------------------

    def _state_options(self, *, full: bool, loading: bool = False) -> StateDictOptions:
        # A LoRA job's base weights are frozen and come from model_path again: only the adapter is state. Loading
        # such a state cannot be strict (the base keys are absent); `load_state_dict` checks the keys itself.
        frozen = self.config.finetune == "lora"
        return StateDictOptions(
            full_state_dict=full, cpu_offload=full, ignore_frozen_params=frozen, strict=not (frozen and loading)
        )

    def state_dict(self, *, full: bool = False) -> dict[str, Any]:
        """Model (trainable part), optimizer and progress. `full=True` gathers unsharded CPU tensors on every rank
        (the form to hand to a trainer of another world size); otherwise the local shards DCP saves."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self._state_options(full=full))
        return {"model": model_state, "optim": optim_state, "progress": {"step": torch.tensor(self.step_count)}}

    def load_state_dict(self, state: dict[str, Any], *, full: bool = False) -> None:
        """Restore what `state_dict(full=...)` returned, whatever world size produced it."""
        expected = {name for name, p in unwrap(self.model).named_parameters() if p.requires_grad}
        if set(state["model"]) != expected:
            missing, unexpected = sorted(expected - set(state["model"])), sorted(set(state["model"]) - expected)
            raise ValueError(f"state does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=self._state_options(full=full, loading=True),
        )
        self.step_count = int(state["progress"]["step"])

    def save_checkpoint(self) -> float:
        """Start an asynchronous checkpoint of the current step; returns the seconds the caller was blocked."""
        if self.checkpoints is None:
            raise ValueError("checkpoint.directory is not set")
        return self.checkpoints.save_async(self.step_count, self.state_dict())

    def restore_latest(self) -> int | None:
        """Load the newest complete checkpoint, if any; returns its step."""
        if self.checkpoints is None:
            return None
        latest = latest_checkpoint(self.checkpoints.directory)
        if latest is None:
            return None
        state = self.state_dict()
        self.checkpoints.load(latest[1], state)
        self.load_state_dict(state)
        logger.info("trainer restored step=%d path=%s", latest[0], latest[1])
        return latest[0]

    def wait_for_checkpoints(self) -> int | None:
        """Block until the checkpoint in flight is complete; returns the newest complete step."""
        return self.checkpoints.wait() if self.checkpoints else None

    def save_result(self, out_dir: str | Path) -> Path | None:
        """Write the adapter (lora) or the model (full) in PEFT/HF format; rank 0 writes, every rank must call."""
        return save_trained(self.model, self.config, out_dir, is_writer=self.rank == 0)
