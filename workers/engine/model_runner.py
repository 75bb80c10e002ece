"""Turns a scheduled step into model inputs, runs the model, and returns the logits to sample from."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kernels.metadata import AttentionMetadata
from workers.engine.config import ModelConfig

if TYPE_CHECKING:
    from workers.engine.scheduler import ScheduledRequest

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    """Model inputs for one step, built from the scheduler's output."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    """Row of the last token of every request that completes this step (and so samples)."""
    sampling_request_ids: list[str]
    """Request ids in the order of `logits_indices`."""


def allocate_kv_cache(
    model_config: ModelConfig, *, num_blocks: int, block_size: int, dtype: torch.dtype, device: str = "cpu"
) -> torch.Tensor:
    """One tensor for all layers: [num_layers, 2 (K, V), num_kv_heads, num_blocks, block_size, head_dim]."""
    shape = (
        model_config.num_hidden_layers,
        2,
        model_config.num_key_value_heads,
        num_blocks,
        block_size,
        model_config.head_dim,
    )
    return torch.zeros(shape, dtype=dtype, device=device)


def num_blocks_for_budget(
    model_config: ModelConfig, *, kv_cache_bytes: int, block_size: int, dtype: torch.dtype
) -> int:
    """How many KV blocks fit in `kv_cache_bytes`."""
    num_blocks = kv_cache_bytes // (model_config.kv_bytes_per_token(dtype) * block_size)
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_bytes={kv_cache_bytes} holds no block of {block_size} tokens "
            f"({model_config.kv_bytes_per_token(dtype) * block_size} bytes each); raise kv_cache_bytes"
        )
    return int(num_blocks)


def build_step_inputs(scheduled: Sequence[ScheduledRequest], *, block_size: int) -> StepInputs:
    """Pack the scheduled requests (decodes first, as the scheduler orders them) into flat tensors."""
    num_seqs = len(scheduled)
    query_lens = np.fromiter((s.num_new_tokens for s in scheduled), dtype=np.int64, count=num_seqs)
    starts = np.fromiter((s.num_computed_tokens for s in scheduled), dtype=np.int64, count=num_seqs)
    seq_lens = starts + query_lens
    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(query_lens, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])

    max_blocks = max(len(s.block_ids) for s in scheduled)
    block_tables = np.zeros((num_seqs, max_blocks), dtype=np.int64)
    input_ids = np.empty(num_tokens, dtype=np.int64)
    num_decodes = 0
    for i, s in enumerate(scheduled):
        block_tables[i, : len(s.block_ids)] = s.block_ids
        lo, hi = query_start_loc[i], query_start_loc[i + 1]
        start = int(starts[i])
        input_ids[lo:hi] = s.request.all_token_ids[start : start + int(query_lens[i])]
        if query_lens[i] == 1 and num_decodes == i:
            num_decodes += 1

    # Token t of sequence i sits at position starts[i] + (t - qsl[i]).
    seq_of_token = np.repeat(np.arange(num_seqs), query_lens)
    positions = starts[seq_of_token] + (np.arange(num_tokens) - query_start_loc[seq_of_token])
    slot_mapping = block_tables[seq_of_token, positions // block_size] * block_size + positions % block_size

    completes = np.fromiter(
        (s.num_computed_tokens + s.num_new_tokens == s.request.num_tokens for s in scheduled),
        dtype=bool,
        count=num_seqs,
    )
    logits_indices = query_start_loc[1:][completes] - 1
    meta = AttentionMetadata(
        slot_mapping=torch.from_numpy(slot_mapping),
        query_start_loc=torch.from_numpy(query_start_loc),
        seq_lens=torch.from_numpy(seq_lens),
        block_tables=torch.from_numpy(block_tables),
        num_decodes=num_decodes,
        query_start_loc_cpu=query_start_loc.tolist(),
        seq_lens_cpu=seq_lens.tolist(),
        block_size=block_size,
    )
    return StepInputs(
        input_ids=torch.from_numpy(input_ids),
        positions=torch.from_numpy(positions),
        meta=meta,
        logits_indices=torch.from_numpy(logits_indices),
        sampling_request_ids=[s.request.request_id for s, done in zip(scheduled, completes, strict=True) if done],
    )


class ModelRunner:
    """Owns the model and its KV cache; runs one packed step at a time."""

    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, kv_cache: torch.Tensor, block_size: int):
        self.model = model
        self.model_config = model_config
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.kv_caches = [(kv_cache[i, 0], kv_cache[i, 1]) for i in range(model_config.num_hidden_layers)]

    @torch.inference_mode()
    def execute(self, inputs: StepInputs, lora_slots: torch.Tensor | None = None) -> torch.Tensor:
        """Run the model over the packed tokens; return float32 logits for the sampling rows only."""
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, lora_slots)
        if inputs.logits_indices.numel() == 0:
            return hidden.new_empty((0, self.model_config.vocab_size), dtype=torch.float32)
        return self.model.compute_logits(hidden[inputs.logits_indices])
