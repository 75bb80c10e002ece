"""Asynchronous sharded checkpoints with `torch.distributed.checkpoint` (DCP).

A save stages the state to host memory at a step boundary (`dcp.async_save`), then persists it on a background
thread while training goes on. A checkpoint is complete only once its `COMPLETE` marker exists, written by the
coordinator rank after DCP has written every rank's shards and the metadata; a folder without the marker (a save
cut off by a crash) is never loaded. The last `keep_last` complete checkpoints are kept.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from workers.trainer.config import CheckpointConfig

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass(frozen=True)
class PendingSave:
    """A save whose background write has not been confirmed yet."""

    step: int
    """The optimizer step the state belongs to."""
    path: Path
    """Its folder."""
    future: Future
    """DCP's future; done when this rank's part (and, on the coordinator, the metadata) is written."""


def step_dir(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}"


def complete_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint, or None."""
    complete = complete_checkpoints(directory)
    return complete[-1] if complete else None


class CheckpointWriter:
    """Starts asynchronous saves, confirms them (marker, pruning) at later step boundaries, and loads.

    At most one save is in flight: starting another first waits for the previous one, which bounds host memory
    to one staged copy. Collective when distributed: every rank calls `save_async`, `poll` and `wait` at the same
    steps.
    """

    def __init__(self, config: CheckpointConfig) -> None:
        if config.directory is None:
            raise ValueError("checkpoint.directory is not set")
        self.config = config
        self.directory = Path(config.directory)
        self._init_process_group()
        self._pending: PendingSave | None = None
        self.last_complete_step: int | None = None
        """The newest checkpoint this writer confirmed, or found on disk at start."""
        latest = latest_checkpoint(self.directory)
        self.last_complete_step = latest[0] if latest else None

    def _init_process_group(self) -> None:
        # Background writes run collectives; a group of their own keeps them from interleaving with the training
        # all-reduces on the default group.
        self._is_distributed = dist.is_initialized() and dist.get_world_size() > 1
        self._group = dist.new_group(backend="gloo") if self._is_distributed else None
        self._is_coordinator = not dist.is_initialized() or dist.get_rank() == 0

    def save_async(self, step: int, state: dict[str, Any]) -> float:
        """Stage `state` to host memory and persist it in the background; returns the seconds training was blocked."""
        started = time.perf_counter()
        self.wait()
        path = step_dir(self.directory, step)
        if self._is_coordinator:
            # A folder left by a crashed save of this same step must not mix its files with the new ones.
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        if self._is_distributed:
            dist.barrier(group=self._group)
        future = dcp.async_save(
            state, checkpoint_id=str(path), process_group=self._group, no_dist=not self._is_distributed
        )
        self._pending = PendingSave(step=step, path=path, future=future)
        blocked = time.perf_counter() - started
        logger.info("checkpoint save started step=%d path=%s blocked_s=%.4f", step, path, blocked)
        return blocked

    def poll(self) -> int | None:
        """Confirm a finished background save without blocking; returns the newest complete step."""
        if self._pending is not None and self._pending.future.done():
            self._confirm()
        return self.last_complete_step

    def wait(self) -> int | None:
        """Block until the save in flight (if any) is written and confirmed; returns the newest complete step."""
        if self._pending is not None:
            self._pending.future.result()
            self._confirm()
        return self.last_complete_step

    def _confirm(self) -> None:
        pending, self._pending = self._pending, None
        pending.future.result()  # re-raises a failed write: a lost checkpoint must not pass silently
        if self._is_coordinator:
            (pending.path / COMPLETE_MARKER).write_text(f"{pending.step}\n")
            self._prune()
        self.last_complete_step = pending.step
        logger.info("checkpoint complete step=%d path=%s", pending.step, pending.path)

    def _prune(self) -> None:
        complete = complete_checkpoints(self.directory)
        for step, path in complete[: -self.config.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("checkpoint pruned step=%d path=%s", step, path)
        newest = complete[-1][0]
        for child in self.directory.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and int(match.group(1)) < newest and not (child / COMPLETE_MARKER).exists():
                shutil.rmtree(child, ignore_errors=True)
                logger.info("checkpoint incomplete removed path=%s", child)

    def load(self, path: str | Path, state: dict[str, Any]) -> None:
        """Fill `state` (the current state's layout) in place from the checkpoint folder `path`."""
        if not (Path(path) / COMPLETE_MARKER).is_file():
            raise ValueError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
        dcp.load(state, checkpoint_id=str(path), process_group=self._group, no_dist=not self._is_distributed)
        logger.info("checkpoint loaded path=%s", path)
