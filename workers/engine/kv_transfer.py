"""KV handoff between engines at block granularity: what travels, and how blocks are copied."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.engine.detokenizer import DetokenizerState
from workers.engine.sampling_params import SamplingParams

BLOCK_DIM = 3
"""The block axis of an engine's KV cache `[num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim]`."""


@dataclass
class KVExport:
    """A request's KV blocks and everything needed to resume it on another engine.

    No RNG state travels: a seeded request's draw at output index i depends only on its seed and i.

    `kv` is `[num_layers, 2, num_kv_heads, num_blocks, block_size, head_dim]` holding the
    request's blocks `from_block, from_block + 1, ...`; the last block may be partly filled.
    """

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    lora_name: str | None
    priority: int
    num_computed_tokens: int
    """Tokens whose KV is in `kv` (with the blocks before `from_block`)."""
    block_size: int
    from_block: int
    kv: torch.Tensor
    detokenizer_state: DetokenizerState | None = None
    """Text state, so text held back for a possible stop string is neither lost nor repeated."""

    @property
    def num_blocks(self) -> int:
        return int(self.kv.shape[BLOCK_DIM])

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def gather_blocks(kv_cache: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """Copy the given blocks out of an engine's KV cache (a new tensor, safe to ship)."""
    index = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    return kv_cache.index_select(BLOCK_DIM, index)


def scatter_blocks(kv_cache: torch.Tensor, block_ids: list[int], blocks: torch.Tensor) -> None:
    """Write `blocks` (as returned by `gather_blocks`) into the given block ids of `kv_cache`."""
    if blocks.shape[BLOCK_DIM] != len(block_ids):
        raise ValueError(f"{blocks.shape[BLOCK_DIM]} blocks of KV for {len(block_ids)} destination blocks")
    index = torch.tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    kv_cache.index_copy_(BLOCK_DIM, index, blocks.to(kv_cache.device))
