"""Roofline step-time model for GPUs: max(compute, HBM traffic) + tensor-parallel all-reduce + host overhead.

Peak numbers are datasheet values (dense bf16, no sparsity); the efficiency factors below turn them into what a
serving engine achieves. The model is deliberately simple, like DistServe's and Vidur's analytical baselines:
it is for comparing policies at scale, not for predicting one kernel's latency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sim.cost import StepShape

__all__ = ["GPUS", "MODELS", "GpuSpec", "LinkModel", "ModelSpec", "RooflineCostModel"]

COMPUTE_EFFICIENCY = 0.6
"""Achieved/peak FLOP/s: large bf16 GEMMs in serving engines reach roughly 50-70% of the tensor-core peak."""
MEMORY_EFFICIENCY = 0.8
"""Achieved/peak HBM bandwidth: streaming weight and KV reads in decode kernels reach about 80%."""
NVLINK_EFFICIENCY = 0.7
"""Achieved/peak NVLink bandwidth for NCCL ring all-reduce at the message sizes of one layer."""
ALLREDUCE_LATENCY_S = 8e-6
"""Fixed cost of one NCCL all-reduce launch (a few microseconds on NVLink)."""
STEP_OVERHEAD_S = 1.5e-3
"""Host-side scheduling, sampling and kernel launch per engine step (vLLM-class engines measure 1-3 ms)."""


@dataclass(kw_only=True, frozen=True)
class GpuSpec:
    """Datasheet numbers of one GPU."""

    name: str
    """e.g. `H100`."""
    peak_bf16_flops: float
    """Dense bf16 tensor-core FLOP/s (no 2:4 sparsity)."""
    hbm_bytes_per_s: float
    """Peak HBM bandwidth."""
    hbm_bytes: float
    """HBM capacity."""
    nvlink_bytes_per_s: float
    """NVLink bandwidth per GPU, one direction."""


GPUS: dict[str, GpuSpec] = {
    # H100 SXM5: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, 80 GB, NVLink 4 900 GB/s bidirectional.
    "H100": GpuSpec(
        name="H100", peak_bf16_flops=989e12, hbm_bytes_per_s=3.35e12, hbm_bytes=80e9, nvlink_bytes_per_s=450e9
    ),
    # A100 SXM4 80GB: 312 TFLOP/s dense bf16, 2.039 TB/s HBM2e, NVLink 3 600 GB/s bidirectional.
    "A100": GpuSpec(
        name="A100", peak_bf16_flops=312e12, hbm_bytes_per_s=2.039e12, hbm_bytes=80e9, nvlink_bytes_per_s=300e9
    ),
}


@dataclass(kw_only=True, frozen=True)
class ModelSpec:
    """The parts of a model config that set its cost (from the HF `config.json`)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    total_params: float
    """Every parameter, embeddings included."""
    expert_params: float = 0.0
    """Parameters in MoE expert FFNs, all experts together (0 for dense models)."""
    num_experts: int = 1
    num_experts_per_token: int = 1
    dtype_bytes: int = 2
    """bf16 weights and KV."""

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for one token across all layers: layers x kv_heads x head_dim x 2 x dtype bytes."""
        return self.num_layers * self.num_kv_heads * self.head_dim * 2 * self.dtype_bytes

    @property
    def active_params(self) -> float:
        """Parameters one token touches: shared weights plus its top-k experts."""
        if self.num_experts <= 1:
            return self.total_params
        shared = self.total_params - self.expert_params
        return shared + self.expert_params * self.num_experts_per_token / self.num_experts

    def weight_bytes_read(self, num_tokens: int) -> float:
        """Weight bytes one step streams from HBM: MoE reads only the experts its tokens were routed to."""
        if self.num_experts <= 1:
            return self.total_params * self.dtype_bytes
        # Expected distinct experts hit per layer by num_tokens tokens with uniform top-k routing.
        miss = (1.0 - self.num_experts_per_token / self.num_experts) ** max(num_tokens, 1)
        experts_hit = self.num_experts * (1.0 - miss)
        shared = self.total_params - self.expert_params
        return (shared + self.expert_params * experts_hit / self.num_experts) * self.dtype_bytes


MODELS: dict[str, ModelSpec] = {
    "llama-3-8b": ModelSpec(
        name="llama-3-8b", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
        total_params=8.03e9,
    ),
    "llama-3-70b": ModelSpec(
        name="llama-3-70b", num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8, head_dim=128,
        total_params=70.6e9,
    ),
    # 8 experts of 3 x 4096 x 14336 per layer over 32 layers = 45.1e9 expert params; 12.9e9 active per token.
    "mixtral-8x7b": ModelSpec(
        name="mixtral-8x7b", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
        total_params=46.7e9, expert_params=45.1e9, num_experts=8, num_experts_per_token=2,
    ),
}  # fmt: skip


@dataclass(kw_only=True, frozen=True)
class LinkModel:
    """A KV-transfer link between two workers: a fixed latency plus bytes over bandwidth."""

    bandwidth_bytes_per_s: float = 50e9
    """Default: 400 Gb/s InfiniBand/RoCE between nodes (one NIC per GPU)."""
    latency_s: float = 20e-6
    """Per-transfer setup and RDMA round trip."""

    def __post_init__(self) -> None:
        if not self.bandwidth_bytes_per_s > 0 or self.latency_s < 0:
            raise ValueError(
                f"link needs bandwidth > 0 and latency >= 0, got {self.bandwidth_bytes_per_s}, {self.latency_s}"
            )

    def transfer_time_s(self, num_bytes: float) -> float:
        return self.latency_s + num_bytes / self.bandwidth_bytes_per_s


class RooflineCostModel:
    """Step time of one TP group serving `model` on `gpu`; see the module docstring for the form."""

    def __init__(self, *, gpu: str = "H100", model: str = "llama-3-8b", tp: int = 1) -> None:
        if gpu not in GPUS:
            raise ValueError(f"unknown gpu {gpu!r}; choose one of {', '.join(sorted(GPUS))}")
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; choose one of {', '.join(sorted(MODELS))}")
        if tp not in (1, 2, 4, 8):
            raise ValueError(f"tp must be 1, 2, 4 or 8, got {tp}")
        self.gpu, self.model, self.tp = GPUS[gpu], MODELS[model], tp
        self.name = f"roofline:{gpu}:{model}:tp{tp}"
        self._flops_per_s = self.gpu.peak_bf16_flops * COMPUTE_EFFICIENCY * tp
        self._bytes_per_s = self.gpu.hbm_bytes_per_s * MEMORY_EFFICIENCY * tp
        # QK^T and AV: 2 matmuls x 2 FLOPs x hidden per (query, key) pair per layer.
        self._attn_flops_per_pair = 4.0 * self.model.num_heads * self.model.head_dim * self.model.num_layers

    def kv_capacity_tokens(self, *, memory_utilization: float = 0.9) -> int:
        """Tokens of KV the TP group holds after the weights, at `memory_utilization` of HBM."""
        free = self.gpu.hbm_bytes * self.tp * memory_utilization - self.model.total_params * self.model.dtype_bytes
        if free <= 0:
            raise ValueError(f"{self.model.name} does not fit on {self.tp} x {self.gpu.name}")
        return int(free // self.model.kv_bytes_per_token)

    def allreduce_time_s(self, num_tokens: int) -> float:
        """Two ring all-reduces per layer (after attention, after the MLP) of num_tokens x hidden activations."""
        if self.tp == 1 or num_tokens == 0:
            return 0.0
        message = num_tokens * self.model.hidden_size * self.model.dtype_bytes
        per_reduce = ALLREDUCE_LATENCY_S + 2 * (self.tp - 1) / self.tp * message / (
            self.gpu.nvlink_bytes_per_s * NVLINK_EFFICIENCY
        )
        return 2 * self.model.num_layers * per_reduce

    def step_time_s(self, shape: StepShape) -> float:
        num_tokens = shape.num_prefill_tokens + shape.num_decodes
        if num_tokens == 0:
            return 0.0
        compute, memory, fixed = self._parts(shape.num_prefill_tokens, shape.prefill_attn_work, shape.num_decodes)
        compute += self._attn_flops_per_pair * shape.decode_context_sum / self._flops_per_s
        memory += self.model.kv_bytes_per_token * shape.decode_context_sum / self._bytes_per_s
        return max(compute, memory) + fixed

    def _parts(self, num_prefill_tokens: int, prefill_attn_work: int, num_decodes: int) -> tuple[float, float, float]:
        """(compute s, memory s, fixed s) of a step without its decode-context terms."""
        num_tokens = num_prefill_tokens + num_decodes
        flops = 2.0 * self.model.active_params * num_tokens + self._attn_flops_per_pair * prefill_attn_work
        # Weights once per step, plus the new tokens' KV written.
        traffic = self.model.weight_bytes_read(num_tokens) + self.model.kv_bytes_per_token * num_tokens
        fixed = self.allreduce_time_s(num_tokens) + STEP_OVERHEAD_S
        return flops / self._flops_per_s, traffic / self._bytes_per_s, fixed

    def decode_run_time_s(self, num_decodes: int, context_sum: int, num_steps: int) -> float:
        """Closed form of `num_steps` pure-decode steps; the context sum grows by `num_decodes` per step.

        Each step is max(compute line, memory line) + fixed, both lines affine in the context sum, so the
        sum splits at their crossing into two arithmetic series.
        """
        if num_steps <= 0 or num_decodes <= 0:
            return 0.0
        compute0, memory0, fixed = self._parts(0, 0, num_decodes)
        compute_slope = self._attn_flops_per_pair * num_decodes / self._flops_per_s
        memory_slope = self.model.kv_bytes_per_token * num_decodes / self._bytes_per_s
        compute0 += self._attn_flops_per_pair * context_sum / self._flops_per_s
        memory0 += self.model.kv_bytes_per_token * context_sum / self._bytes_per_s

        def series(start: float, slope: float, first: int, count: int) -> float:
            # sum_{j=first}^{first+count-1} (start + slope * j)
            return count * start + slope * (count * first + count * (count - 1) / 2)

        total = fixed * num_steps
        if compute_slope == memory_slope:
            lead = (compute0, compute_slope) if compute0 >= memory0 else (memory0, memory_slope)
            return total + series(lead[0], lead[1], 0, num_steps)
        # Steps j < cross follow one line, j >= cross the other.
        cross = (memory0 - compute0) / (compute_slope - memory_slope)
        split = min(max(math.ceil(cross), 0), num_steps)
        if compute_slope > memory_slope:  # memory leads early, compute late
            early, late = (memory0, memory_slope), (compute0, compute_slope)
        else:
            early, late = (compute0, compute_slope), (memory0, memory_slope)
        return total + series(*early, 0, split) + series(*late, split, num_steps - split)
