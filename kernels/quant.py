"""W4A16 weight-only quantisation: symmetric group-wise int4, packed eight to an int32, plus the reference GEMM.

Layout (shared with the Triton kernel): a linear weight `[N, K]` (out, in) becomes
`qweight [K // 8, N]` int32, whose nibble j of row i holds input feature `8 * i + j`
stored as `q + 8` (q in [-7, 7]), and `scales [K // group_size, N]` in the activation dtype.
K-major packing lets one tile load eight K rows per int32 and unpack them with shifts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PACK = 8
"""int4 values per int32."""
_ZERO = 8
_QMAX = 7


@dataclass(kw_only=True, frozen=True)
class W4A16Weight:
    """One quantised linear weight."""

    qweight: torch.Tensor
    """`[K // 8, N]` int32, eight int4 codes per element along K."""
    scales: torch.Tensor
    """`[K // group_size, N]` per-group scales in the activation dtype."""
    group_size: int
    """Input features sharing one scale."""

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * PACK

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]


def check_group_size(in_features: int, group_size: int) -> None:
    """Raise `ValueError` unless `group_size` packs evenly and divides `in_features`."""
    if group_size <= 0 or group_size % PACK:
        raise ValueError(f"group_size must be a positive multiple of {PACK}, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not a multiple of group_size {group_size}")


def quantize_w4(weight: torch.Tensor, group_size: int = 128, dtype: torch.dtype | None = None) -> W4A16Weight:
    """Quantise a `[N, K]` weight to symmetric int4 with one scale per `group_size` inputs and pack it."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    check_group_size(in_features, group_size)
    dtype = dtype or weight.dtype
    groups = weight.detach().to(torch.float32).t().reshape(in_features // group_size, group_size, out_features)
    # Scales are rounded to the activation dtype first so quantise and dequantise use the same value.
    scales = (groups.abs().amax(dim=1) / _QMAX).clamp_min(torch.finfo(torch.float16).tiny).to(dtype)
    codes = torch.round(groups / scales.to(torch.float32)[:, None, :]).clamp(-_QMAX, _QMAX) + _ZERO
    codes = codes.to(torch.int32).reshape(in_features // PACK, PACK, out_features)
    shifts = (torch.arange(PACK, dtype=torch.int32, device=weight.device) * 4)[None, :, None]
    packed = (codes << shifts).sum(dim=1, dtype=torch.int64)
    # Codes in the top nibble overflow int32's sign bit; wrap them as two's complement.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return W4A16Weight(qweight=packed.contiguous(), scales=scales.contiguous(), group_size=group_size)


def dequantize_w4(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The `[K, N]` weight (transposed) in the scales' dtype."""
    packed_rows, out_features = qweight.shape
    shifts = (torch.arange(PACK, dtype=torch.int32, device=qweight.device) * 4)[None, :, None]
    codes = (qweight[:, None, :] >> shifts) & 0xF
    values = (codes - _ZERO).reshape(packed_rows * PACK, out_features).to(scales.dtype)
    return values * scales.repeat_interleave(group_size, dim=0)


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x [..., K] @ dequant(W) -> [..., N]` in x's dtype, dequantising the whole weight (reference)."""
    out = x @ dequantize_w4(qweight, scales, group_size).to(x.dtype)
    return out if bias is None else out + bias
