"""Prompt/completion JSONL, tokenized and packed into fixed-length rows, and a resumable global-batch order.

Packing: examples are laid end to end in rows of `seq_len` tokens. Each example's `position_ids` restart at 0, and
transformers turns restarting positions (with no 2-D attention mask and no KV cache) into a block-diagonal causal
mask, so an example attends only to itself and gets the same logits as it would alone. Labels are shifted here
(`labels[i]` is the token at `i + 1`) and are -100 on prompt tokens, on padding and across example boundaries, so
the loss covers completion tokens (and the closing EOS) only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of a token that carries no loss (`torch.nn.functional.cross_entropy`'s default ignore_index)."""


@dataclass(frozen=True)
class Example:
    """One tokenized training example."""

    prompt_ids: list[int]
    """BOS plus the prompt's tokens: context, no loss."""
    completion_ids: list[int]
    """The completion's tokens plus EOS: the targets."""


@dataclass(frozen=True)
class PackedRows:
    """The whole dataset as packed rows, each tensor `[num_rows, seq_len]`."""

    input_ids: torch.Tensor
    """Token ids (padding is token 0)."""
    position_ids: torch.Tensor
    """Positions restarting at 0 for each example (and for the padding tail)."""
    labels: torch.Tensor
    """The next token where it is a completion token of the same example, else -100."""
    num_tokens: torch.Tensor
    """Non-padding tokens per row, `[num_rows]`."""

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]


def read_examples(path: str | Path, tokenizer: Tokenizer) -> list[Example]:
    """Parse a JSONL file of {"prompt", "completion"} objects; a bad line is a `ValueError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset {path} does not exist")
    if tokenizer.bos_token_id is None or not tokenizer.eos_token_ids:
        raise ValueError("the model's tokenizer must define BOS and EOS tokens to frame examples")
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prompt", "completion")):
            raise ValueError(f"{path}:{number}: expected an object with string 'prompt' and 'completion'")
        prompt = [tokenizer.bos_token_id, *tokenizer.encode(record["prompt"], add_special_tokens=False)]
        completion = [*tokenizer.encode(record["completion"], add_special_tokens=False), tokenizer.eos_token_ids[0]]
        examples.append(Example(prompt_ids=prompt, completion_ids=completion))
    if not examples:
        raise ValueError(f"dataset {path} has no examples")
    return examples


def pack_examples(examples: list[Example], seq_len: int) -> PackedRows:
    """Lay examples end to end in rows of `seq_len` tokens, in order; an example never straddles two rows."""
    rows: list[tuple[list[int], list[int], list[int], int]] = []
    ids: list[int] = []
    positions: list[int] = []
    labels: list[int] = []
    num_truncated = 0
    for example in examples:
        tokens = example.prompt_ids + example.completion_ids
        if len(tokens) > seq_len:
            # Keep the prompt's start and as much completion as fits; a row longer than seq_len cannot exist.
            tokens, num_truncated = tokens[:seq_len], num_truncated + 1
        if len(ids) + len(tokens) > seq_len:
            rows.append(_close_row(ids, positions, labels, seq_len))
            ids, positions, labels = [], [], []
        targets = [IGNORE_INDEX] * len(example.prompt_ids) + list(example.completion_ids)
        ids += tokens
        positions += range(len(tokens))
        # labels[i] predicts tokens[i + 1]; the last token of an example predicts nothing.
        labels += [*targets[1 : len(tokens)], IGNORE_INDEX]
    if ids:
        rows.append(_close_row(ids, positions, labels, seq_len))
    if num_truncated:
        logger.warning("dataset examples truncated count=%d seq_len=%d", num_truncated, seq_len)
    packed = PackedRows(
        input_ids=torch.tensor([r[0] for r in rows], dtype=torch.long),
        position_ids=torch.tensor([r[1] for r in rows], dtype=torch.long),
        labels=torch.tensor([r[2] for r in rows], dtype=torch.long),
        num_tokens=torch.tensor([r[3] for r in rows], dtype=torch.long),
    )
    logger.info("dataset packed examples=%d rows=%d seq_len=%d", len(examples), packed.num_rows, seq_len)
    return packed


def _close_row(ids: list[int], positions: list[int], labels: list[int], seq_len: int):
    pad = seq_len - len(ids)
    return ids + [0] * pad, positions + list(range(pad)), labels + [IGNORE_INDEX] * pad, len(ids)


@dataclass(frozen=True)
class BatchOrder:
    """Which rows form global batch number `cursor`: a fresh seeded permutation per epoch, incomplete tails dropped.

    The order depends only on (seed, num_rows, global_batch_rows), never on the world size, so a job resized
    mid-run keeps consuming the same rows in the same steps, each once per epoch.
    """

    num_rows: int
    """Rows in the dataset."""
    global_batch_rows: int
    """Rows per global batch."""
    seed: int
    """Seeds each epoch's permutation."""

    def __post_init__(self) -> None:
        if self.global_batch_rows > self.num_rows:
            raise ValueError(
                f"global_batch_rows={self.global_batch_rows} exceeds the dataset's {self.num_rows} packed rows"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // self.global_batch_rows

    def global_batch(self, cursor: int) -> list[int]:
        """Row indices of global batch `cursor` (0-based, counted across epochs)."""
        epoch, index = divmod(cursor, self.batches_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        permutation = torch.randperm(self.num_rows, generator=generator)
        start = index * self.global_batch_rows
        return permutation[start : start + self.global_batch_rows].tolist()


def rank_share(rows: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a global batch; shares differ by at most one row."""
    if world_size > len(rows):
        raise ValueError(f"a global batch of {len(rows)} rows cannot feed {world_size} ranks")
    base, extra = divmod(len(rows), world_size)
    start = rank * base + min(rank, extra)
    return rows[start : start + base + (1 if rank < extra else 0)]


def micro_batches(rows: list[int], micro_batch_rows: int) -> list[list[int]]:
    """Split a rank's share into micro-batches of at most `micro_batch_rows` rows."""
    return [rows[i : i + micro_batch_rows] for i in range(0, len(rows), micro_batch_rows)]
