"""Packing keeps examples apart, labels cover completions only, and the batch order is exact and world-size free."""

from __future__ import annotations

import json

import pytest
import torch
from trainer_helpers import DATASET
from transformers import AutoModelForCausalLM

from workers.engine.tokenizer import Tokenizer
from workers.trainer.data import IGNORE_INDEX, BatchOrder, micro_batches, pack_examples, rank_share, read_examples


@pytest.fixture(scope="module")
def examples(tiny_llama):
    return read_examples(DATASET, Tokenizer.from_pretrained(tiny_llama))


def test_a_packed_row_gives_each_example_its_own_logits(tiny_llama, examples):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    rows = pack_examples(examples[:3], seq_len=96)
    assert rows.num_rows == 1  # all three share the row
    with torch.no_grad():
        packed = model(input_ids=rows.input_ids, position_ids=rows.position_ids, use_cache=False).logits[0]
        start = 0
        for example in examples[:3]:
            tokens = example.prompt_ids + example.completion_ids
            alone = model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + len(tokens)], alone, rtol=1e-5, atol=1e-5)
            start += len(tokens)


def test_labels_are_the_next_completion_tokens_only(examples):
    rows = pack_examples(examples[:3], seq_len=96)
    expected = []
    for example in examples[:3]:
        targets = [IGNORE_INDEX] * len(example.prompt_ids) + example.completion_ids
        expected += [*targets[1:], IGNORE_INDEX]
    expected += [IGNORE_INDEX] * (96 - len(expected))
    assert rows.labels[0].tolist() == expected
    assert int(rows.num_tokens[0]) == sum(len(e.prompt_ids) + len(e.completion_ids) for e in examples[:3])


def test_examples_never_straddle_rows(examples):
    rows = pack_examples(examples, seq_len=64)
    # A new example starts where the position restarts; every example must start and end inside one row.
    starts = int((rows.position_ids[:, :] == 0).logical_and(rows.input_ids == examples[0].prompt_ids[0]).sum())
    assert starts == len(examples)
    assert int(rows.num_tokens.sum()) == sum(len(e.prompt_ids) + len(e.completion_ids) for e in examples)


def test_each_row_is_consumed_once_per_epoch_whatever_the_world_size():
    order = BatchOrder(num_rows=50, global_batch_rows=6, seed=3)
    epoch = [row for cursor in range(order.batches_per_epoch) for row in order.global_batch(cursor)]
    assert len(epoch) == len(set(epoch)) == 48  # 8 full batches; the 2-row tail waits for the next epoch's order
    assert order.global_batch(order.batches_per_epoch) != order.global_batch(0)  # a new permutation per epoch
    batch = order.global_batch(5)
    for world_size in (1, 2, 3, 4, 6):
        shares = [rank_share(batch, rank, world_size) for rank in range(world_size)]
        assert [row for share in shares for row in share] == batch
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert micro_batches(batch, 4) == [batch[:4], batch[4:]]
    with pytest.raises(ValueError, match="cannot feed"):
        rank_share(batch, 0, 7)


def test_bad_dataset_lines_are_named(tmp_path, tiny_llama):
    tokenizer = Tokenizer.from_pretrained(tiny_llama)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_examples(bad, tokenizer)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not JSON"):
        read_examples(bad, tokenizer)
    bad.write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        read_examples(bad, tokenizer)
