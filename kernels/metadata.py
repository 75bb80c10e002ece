"""The batch layout every attention op reads. Built once per step by the model runner."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where a packed batch's tokens sit in the paged KV cache.

    The step's tokens are packed as `[T]`, sequence after sequence. The first
    `num_decodes` sequences have exactly one query token each (decodes); the rest are
    prefill chunks of any length that attend to their cached prefix and causally to
    themselves. The KV cache of one layer is a pair of tensors shaped
    `[num_kv_heads, num_blocks, block_size, head_dim]` (head-major, so one head's block
    is contiguous and gathered rows are contiguous per head).
    """

    slot_mapping: torch.Tensor
    """[T] int64: `block_id * block_size + offset` where each new token's K/V is written."""
    query_start_loc: torch.Tensor
    """[S+1] int64: cumulative query lengths; sequence i owns tokens [qsl[i], qsl[i+1])."""
    seq_lens: torch.Tensor
    """[S] int64: context length of each sequence including this step's tokens."""
    block_tables: torch.Tensor
    """[S, max_blocks] int64: block ids of each sequence, padded with 0."""
    num_decodes: int
    """Leading sequences that have exactly one query token."""
    query_start_loc_cpu: list[int]
    """`query_start_loc` as a Python list, so prefill loops avoid `.item()`."""
    seq_lens_cpu: list[int]
    """`seq_lens` as a Python list."""
    block_size: int
    """Tokens per KV block."""

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes
