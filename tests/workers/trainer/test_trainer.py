"""Single-process training: learning, accumulation, clipping, bf16, bad configs and the in-memory state hand-over."""

from __future__ import annotations

import pytest
import torch

from workers.trainer.config import TrainConfig
from workers.trainer.trainer import Trainer


def trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.state_dict(full=True)["model"].items()}


@pytest.mark.parametrize(("finetune", "learning_rate"), [("full", 3e-3), ("lora", 1e-2)])
def test_loss_falls_on_the_copy_reverse_task(train_config, finetune, learning_rate):
    trainer = Trainer(train_config(finetune=finetune, learning_rate=learning_rate, micro_batch_rows=4))
    losses = [trainer.step().loss for _ in range(30)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.75 * first, f"{finetune}: loss went from {first:.3f} to {last:.3f}"


def test_accumulation_equals_one_big_batch(train_config):
    big = Trainer(train_config(micro_batch_rows=8))
    # 3 micro-batches of 3, 3 and 2 rows: uneven pieces must still sum to the big batch's gradient.
    accumulated = Trainer(train_config(micro_batch_rows=3))
    for _ in range(3):
        a, b = big.step(), accumulated.step()
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    ours, reference = trainable(accumulated), trainable(big)
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-5 * tensor.abs().max().item())


def test_clipping_bounds_the_update_norm(train_config):
    clipped = Trainer(train_config(max_grad_norm=0.05))
    metrics = clipped.step()
    assert metrics.grad_norm > 0.05  # the pre-clip norm is reported, and clipping had work to do
    assert gradient_norm(clipped) == pytest.approx(0.05, rel=1e-4)
    unclipped = Trainer(train_config(max_grad_norm=None))
    assert unclipped.step().grad_norm == pytest.approx(metrics.grad_norm, rel=1e-6)
    assert gradient_norm(unclipped) == pytest.approx(metrics.grad_norm, rel=1e-4)


def gradient_norm(trainer: Trainer) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in trainer.params])).item()


def test_bfloat16_autocast_trains_with_fp32_master_weights(train_config):
    trainer = Trainer(train_config(dtype="bfloat16"))
    losses = [trainer.step().loss for _ in range(8)]
    assert all(p.dtype == torch.float32 for p in trainer.params)
    assert losses[-1] < losses[0]
    reference = Trainer(train_config()).step().loss
    assert losses[0] == pytest.approx(reference, rel=2e-2)  # the same loss to bf16 precision


def test_metrics_report_the_step(train_config):
    trainer = Trainer(train_config(warmup_steps=4, max_steps=1))
    assert not trainer.is_finished
    metrics = trainer.step()
    assert trainer.is_finished
    assert metrics.step == 1 and metrics.world_size == 1
    assert metrics.learning_rate == pytest.approx(3e-3 / 4)
    assert 0 < metrics.num_target_tokens < metrics.num_tokens <= 8 * 64
    assert metrics.tokens_per_s > 0 and metrics.last_checkpoint_step is None


def test_state_hand_over_continues_the_same_run(train_config):
    """The in-memory form a resize would pass on: a fresh trainer loaded with it continues identically."""
    config = train_config(finetune="lora", learning_rate=1e-2)
    straight = Trainer(config)
    straight_losses = [straight.step().loss for _ in range(4)]
    first = Trainer(config)
    losses = [first.step().loss for _ in range(2)]
    second = Trainer(config)
    second.load_state_dict(first.state_dict(full=True), full=True)
    losses += [second.step().loss for _ in range(2)]
    assert losses == straight_losses
    for name, tensor in trainable(straight).items():
        assert torch.equal(trainable(second)[name], tensor), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"finetune": "qlora"}, "finetune"),
        ({"lora": {"rank": 0}}, "lora.rank"),
        ({"lora": {"ranks": 4}}, "lora.ranks"),
        ({"checkpoint": {"keep_last": 0}}, "checkpoint.keep_last"),
        ({"micro_batch_rows": 0}, "micro_batch_rows"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm"),
        ({"epochs": 3}, "epochs"),
    ],
)
def test_bad_config_is_a_value_error_naming_the_field(train_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        train_config(**overrides)


def test_missing_inputs_are_value_errors(train_config, tmp_path):
    with pytest.raises(ValueError, match="missing required field"):
        TrainConfig.from_dict({"dataset_path": "x.jsonl"})
    with pytest.raises(ValueError, match="does not exist"):
        Trainer(train_config(dataset_path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(ValueError, match="not an HF model folder"):
        Trainer(train_config(model_path=str(tmp_path)))
    with pytest.raises(ValueError, match="exceeds the dataset"):
        Trainer(train_config(global_batch_rows=100_000))


@pytest.mark.parametrize("job_file", ["lora-sft.yaml", "full-finetune.yaml"])
def test_example_jobs_train(tiny_llama, tmp_path, job_file):
    """The shipped job files' `train:` sections are valid configs that train (model and checkpoints set here)."""
    import yaml
    from trainer_helpers import DATASET

    raw = yaml.safe_load((DATASET.parent / job_file).read_text())["job"]["train"]
    raw["model_path"] = str(tiny_llama)
    raw["dataset_path"] = str(DATASET.parent / raw["dataset_path"])
    raw["checkpoint"]["directory"] = str(tmp_path)
    trainer = Trainer(TrainConfig.from_dict(raw))
    assert trainer.config.finetune == ("lora" if "lora" in job_file else "full")
    assert trainer.step().loss > 0
