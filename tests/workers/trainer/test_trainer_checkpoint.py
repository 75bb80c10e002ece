"""Asynchronous DCP checkpoints: bit-exact resume, keep-last-K, and a save cut off mid-write is never loaded."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from workers.trainer.checkpoint import COMPLETE_MARKER, CheckpointWriter, complete_checkpoints, latest_checkpoint
from workers.trainer.trainer import Trainer


def trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    return trainer.state_dict(full=True)["model"]


@pytest.mark.parametrize(("finetune", "learning_rate"), [("full", 3e-3), ("lora", 1e-2)])
def test_resume_from_a_checkpoint_is_bit_exact(train_config, tmp_path, finetune, learning_rate):
    config = train_config(
        finetune=finetune, learning_rate=learning_rate, micro_batch_rows=4, checkpoint={"directory": str(tmp_path)}
    )
    straight = Trainer(config)
    losses = [straight.step().loss for _ in range(3)]
    blocked_s = straight.save_checkpoint()
    assert blocked_s >= 0
    losses += [straight.step().loss for _ in range(3)]  # training goes on while the save persists
    assert straight.wait_for_checkpoints() == 3

    resumed = Trainer(config)
    assert resumed.restore_latest() == 3
    assert resumed.step_count == 3
    assert [resumed.step().loss for _ in range(3)] == losses[3:]
    ours, reference = trainable(resumed), trainable(straight)
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name


def test_periodic_saves_keep_the_last_k(train_config, tmp_path):
    config = train_config(checkpoint={"directory": str(tmp_path), "every_n_steps": 1, "keep_last": 2})
    trainer = Trainer(config)
    reported = [trainer.step().last_checkpoint_step for _ in range(5)]
    assert trainer.wait_for_checkpoints() == 5
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [4, 5]
    assert reported[0] is None and reported[-1] is not None  # steps report the newest checkpoint confirmed so far
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000005"]


def test_a_checkpoint_without_its_marker_is_ignored(train_config, tmp_path):
    config = train_config(finetune="lora", learning_rate=1e-2, checkpoint={"directory": str(tmp_path)})
    trainer = Trainer(config)
    trainer.step()
    trainer.save_checkpoint()
    trainer.wait_for_checkpoints()
    # A later save cut off mid-write: some files, one of them truncated, and no marker.
    torn = tmp_path / "step-00000009"
    shutil.copytree(tmp_path / "step-00000001", torn)
    (torn / COMPLETE_MARKER).unlink()
    data_file = next(torn.glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:10])
    assert latest_checkpoint(tmp_path)[0] == 1
    assert Trainer(config).restore_latest() == 1
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        CheckpointWriter(config.checkpoint).load(torn, trainer.state_dict())


@pytest.mark.slow
def test_a_process_killed_during_an_async_save_leaves_the_last_complete_one(train_config, tmp_path):
    config = train_config(finetune="lora", learning_rate=1e-2, checkpoint={"directory": str(tmp_path / "ckpt")})
    script = textwrap.dedent(
        f"""
        import os, torch
        torch.set_num_threads(1)
        from workers.trainer.config import TrainConfig
        from workers.trainer.trainer import Trainer
        trainer = Trainer(TrainConfig.from_dict({config.to_dict()!r}))
        trainer.step()
        trainer.save_checkpoint()
        trainer.wait_for_checkpoints()
        trainer.step()
        trainer.save_checkpoint()
        os._exit(17)  # dies with the step-2 save still in flight, before it can be confirmed
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=str(_repo_root()), timeout=300, capture_output=True)
    assert done.returncode == 17, done.stderr.decode()[-2000:]
    assert (tmp_path / "ckpt" / "step-00000002").is_dir()
    assert not (tmp_path / "ckpt" / "step-00000002" / COMPLETE_MARKER).exists()
    assert Trainer(config).restore_latest() == 1


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[3]
