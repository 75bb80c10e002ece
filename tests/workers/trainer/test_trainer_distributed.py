"""The oracle for data parallelism: N steps on 2 gloo ranks equal N steps on 1 rank with the same global batch.

Each 2-rank run also writes a sharded DCP checkpoint after its first step, which a 1-rank trainer resumes from.
"""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import make_config, run_ranks, run_single

from workers.trainer.trainer import Trainer

NUM_STEPS = 3
RTOL = 1e-5
CASES = [("full", "ddp"), ("lora", "ddp"), ("full", "fsdp")]


def case_config(tiny_llama, checkpoint_dir, finetune: str, parallelism: str):
    # 7 rows in 2-row micro-batches: the ranks get 4 and 3 rows, so accumulation and uneven shares are exercised.
    return make_config(
        tiny_llama,
        finetune=finetune,
        parallelism=parallelism,
        global_batch_rows=7,
        micro_batch_rows=2,
        learning_rate=1e-2,
        checkpoint={"directory": str(checkpoint_dir / f"{finetune}-{parallelism}")},
    )


@pytest.fixture(scope="module")
def two_rank_runs(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("two-ranks")
    configs = [case_config(tiny_llama, root, *case) for case in CASES]
    return dict(zip(CASES, run_ranks(configs, 2, NUM_STEPS, root / "ranks"), strict=True)), root


@pytest.mark.slow
@pytest.mark.parametrize(("finetune", "parallelism"), CASES)
def test_two_ranks_match_one(tiny_llama, two_rank_runs, tmp_path, finetune, parallelism):
    runs, root = two_rank_runs
    ours = runs[finetune, parallelism]
    config = case_config(tiny_llama, root, finetune, parallelism)
    reference = run_single(make_config(**{**config.to_dict(), "checkpoint": {}}), NUM_STEPS)
    assert ours["world_sizes"] == [2] * NUM_STEPS
    assert reference["losses"][-1] < reference["losses"][0]  # the runs moved the weights, so a match means something
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(reference["losses"]), rtol=RTOL, atol=0)
    assert ours["state"].keys() == reference["state"].keys()
    for name, tensor in reference["state"].items():
        torch.testing.assert_close(ours["state"][name], tensor, rtol=RTOL, atol=RTOL * tensor.abs().max().item())

    # DCP reshards on load: the 2-rank checkpoint of step 1 resumes on 1 rank and continues the same run.
    resumed = Trainer(config)
    assert resumed.restore_latest() == 1
    assert resumed.step().loss == pytest.approx(reference["losses"][1], rel=RTOL)
