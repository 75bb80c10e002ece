"""Triton kernels vs the baseline a user would otherwise run, on one GPU, in one run.

    python bench/kernels.py                      # batches 1, 16, 64; fp16
    python bench/kernels.py --batches 1,16 --context 4096 --peak-gbs 3350

Each kernel is timed against its baseline at Llama-3-8B-like sizes (hidden 4096, 32 heads,
8 KV heads, head_dim 128) and Mixtral-like MoE sizes (8 experts, top-2, ffn 14336):
paged decode vs SDPA on a contiguous copy of the same KV; prefill vs causal SDPA; fused
MoE vs the per-expert torch loop; multi-LoRA vs the per-adapter torch loop (8 adapters,
rank 16); W4A16 vs an fp16 `torch.matmul`. Decode rows also report achieved memory
bandwidth (K+V bytes read / time) as a fraction of the device's peak.

Both sides are timed eagerly (Python and launch overhead included) and replayed from a CUDA graph (GPU time
only, as an engine that captures its decode step sees it); `speedup` uses the graph pair when both capture.

stdout is exactly one JSON object. Without a CUDA GPU it prints `{"error": ...}` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kernels import ops  # noqa: E402
from kernels.metadata import AttentionMetadata  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 4096, 32, 8, 128, 14336
EXPERTS, TOP_K, MOE_FFN = 8, 2, 14336
NUM_ADAPTERS, LORA_RANK = 8, 16
BLOCK_SIZE = 16
# Peak DRAM bandwidth in GB/s by device-name fragment (vendor datasheets); --peak-gbs overrides.
PEAK_GBS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100": 1555.0}
TARGETS = {"paged_decode": 0.9, "fused_moe@64": 3.0, "multi_lora": 3.0, "w4a16@1-16": 2.5}


def time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds per call, launch overhead included (triton's do_bench flushes L2 between runs)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def time_graph_ms(fn: Callable[[], object]) -> float | None:
    """Median milliseconds per replay of `fn` captured in a CUDA graph: GPU time without the Python and launch
    overhead, as an engine that replays graphs sees it. None when `fn` cannot be captured (it syncs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile and autotune outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        torch.cuda.synchronize()
        return None
    return time_ms(graph.replay)


def time_both(ours: Callable[[], object], baseline: Callable[[], object]) -> dict:
    """Eager and CUDA-graph timings of both sides; the headline pair is the graph one when both capture."""
    times = {
        "ours_eager_ms": time_ms(ours),
        "baseline_eager_ms": time_ms(baseline),
        "ours_graph_ms": time_graph_ms(ours),
        "baseline_graph_ms": time_graph_ms(baseline),
    }
    is_graph = times["ours_graph_ms"] is not None and times["baseline_graph_ms"] is not None
    mode = "graph" if is_graph else "eager"
    return {"ours": times[f"ours_{mode}_ms"], "baseline": times[f"baseline_{mode}_ms"], "timing": mode, **times}


def _row(kernel: str, batch: int, times: dict, baseline: str, **extra: object) -> dict:
    rounded = {k: None if v is None else round(v, 4) for k, v in times.items() if k.endswith("_ms")}
    return {
        "kernel": kernel,
        "batch": batch,
        "ours_ms": round(times["ours"], 4),
        "baseline": baseline,
        "baseline_ms": round(times["baseline"], 4),
        "speedup": round(times["baseline"] / times["ours"], 3),
        "timing": times["timing"],
        **rounded,
        **extra,
    }


def _randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # Drawn on the CPU: a CUDA-graph capture that fails (an op that syncs) leaves the CUDA generator unusable.
    return torch.randn(*shape).to("cuda", dtype)


def _paged_kv(batch: int, context: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A block pool with each sequence's blocks scattered at random, plus the contiguous copy."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    key_cache = _randn(KV_HEADS, num_blocks, BLOCK_SIZE, HEAD_DIM, dtype=dtype)
    value_cache = _randn(*key_cache.shape, dtype=dtype)
    tables = torch.randperm(num_blocks).cuda().view(batch, blocks_per_seq)
    dense_k = key_cache[:, tables].permute(1, 0, 2, 3, 4).reshape(batch, KV_HEADS, -1, HEAD_DIM)[:, :, :context]
    dense_v = value_cache[:, tables].permute(1, 0, 2, 3, 4).reshape(batch, KV_HEADS, -1, HEAD_DIM)[:, :, :context]
    return key_cache, value_cache, tables, dense_k.contiguous(), dense_v.contiguous()


def bench_decode(batch: int, context: int, dtype: torch.dtype, peak_gbs: float) -> dict:
    key_cache, value_cache, tables, dense_k, dense_v = _paged_kv(batch, context, dtype)
    query = _randn(batch, HEADS, HEAD_DIM, dtype=dtype)
    seq_lens = torch.full((batch,), context, device="cuda", dtype=torch.int64)
    scale = HEAD_DIM**-0.5
    q4 = query[:, :, None]
    times = time_both(
        lambda: ops.paged_decode_attention(
            query, key_cache, value_cache, tables, seq_lens, scale, backend="triton", max_seq_len=context
        ),
        lambda: F.scaled_dot_product_attention(q4, dense_k, dense_v, scale=scale, enable_gqa=True),
    )
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * dense_k.element_size()
    return _row(
        "paged_decode",
        batch,
        times,
        "sdpa_unpaged",
        context=context,
        bandwidth_fraction=round(kv_bytes / (times["ours"] * 1e-3) / (peak_gbs * 1e9), 3),
        baseline_bandwidth_fraction=round(kv_bytes / (times["baseline"] * 1e-3) / (peak_gbs * 1e9), 3),
        target=TARGETS["paged_decode"],
    )


def bench_prefill(batch: int, length: int, dtype: torch.dtype) -> dict:
    key_cache, value_cache, tables, dense_k, dense_v = _paged_kv(batch, length, dtype)
    query = _randn(batch * length, HEADS, HEAD_DIM, dtype=dtype)
    qsl = [i * length for i in range(batch + 1)]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(batch * length, dtype=torch.int64, device="cuda"),
        query_start_loc=torch.tensor(qsl, device="cuda"),
        seq_lens=torch.full((batch,), length, device="cuda", dtype=torch.int64),
        block_tables=tables,
        num_decodes=0,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=[length] * batch,
        block_size=BLOCK_SIZE,
    )
    scale = HEAD_DIM**-0.5
    q4 = query.view(batch, length, HEADS, HEAD_DIM).transpose(1, 2)
    times = time_both(
        lambda: ops.paged_attention(query, key_cache, value_cache, meta, scale, backend="triton"),
        lambda: F.scaled_dot_product_attention(q4, dense_k, dense_v, is_causal=True, scale=scale, enable_gqa=True),
    )
    return _row("prefill", batch, times, "sdpa_causal", length=length)


def bench_moe(batch: int, dtype: torch.dtype) -> dict:
    x = _randn(batch, HIDDEN, dtype=dtype)
    w_gate_up = _randn(EXPERTS, 2 * MOE_FFN, HIDDEN, dtype=dtype) / HIDDEN**0.5
    w_down = _randn(EXPERTS, HIDDEN, MOE_FFN, dtype=dtype) / MOE_FFN**0.5
    logits = _randn(batch, EXPERTS)
    weights, ids = torch.topk(logits.softmax(-1), TOP_K)
    weights = weights.to(dtype)
    args = (x, w_gate_up, w_down, weights, ids)
    times = time_both(lambda: ops.fused_moe(*args, backend="triton"), lambda: ops.fused_moe(*args, backend="reference"))
    target = TARGETS["fused_moe@64"] if batch == 64 else None
    return _row("fused_moe", batch, times, "per_expert_loop", target=target)


def bench_lora(batch: int, dtype: torch.dtype) -> dict:
    x = _randn(batch, HIDDEN, dtype=dtype)
    y = _randn(batch, HIDDEN, dtype=dtype)
    lora_a = _randn(NUM_ADAPTERS, LORA_RANK, HIDDEN, dtype=dtype) / HIDDEN**0.5
    lora_b = _randn(NUM_ADAPTERS, HIDDEN, LORA_RANK, dtype=dtype) / LORA_RANK
    # Every adapter appears at least once (batch >= 8): 8 distinct adapters in the batch.
    slots = torch.arange(batch, device="cuda") % NUM_ADAPTERS
    times = time_both(
        lambda: ops.add_lora(y, x, lora_a, lora_b, slots, backend="triton"),
        lambda: ops.add_lora(y, x, lora_a, lora_b, slots, backend="reference"),
    )
    adapters = min(batch, NUM_ADAPTERS)
    return _row("multi_lora", batch, times, "per_adapter_loop", adapters=adapters, target=TARGETS["multi_lora"])


def bench_w4a16(batch: int, dtype: torch.dtype) -> list[dict]:
    rows = []
    for in_features, out_features in ((HIDDEN, FFN), (FFN, HIDDEN)):
        weight = _randn(out_features, in_features, dtype=dtype) / in_features**0.5
        packed = ops.quantize_w4(weight, 128)
        x = _randn(batch, in_features, dtype=dtype)
        weight_t = weight.t()
        times = time_both(
            lambda: ops.w4a16_matmul(x, packed.qweight, packed.scales, 128, backend="triton"),  # noqa: B023
            lambda: torch.matmul(x, weight_t),  # noqa: B023
        )
        target = TARGETS["w4a16@1-16"] if batch <= 16 else None
        rows.append(_row("w4a16", batch, times, "fp16_matmul", shape=[in_features, out_features], target=target))
    return rows


def _peak_gbs(override: float | None) -> float:
    if override:
        return override
    name = torch.cuda.get_device_name()
    return next((gbs for fragment, gbs in PEAK_GBS.items() if fragment in name), 3350.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
    parser.add_argument("--context", type=int, default=2048, help="decode context length per sequence")
    parser.add_argument("--prefill-len", type=int, default=512, help="prompt length per prefill sequence")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--peak-gbs", type=float, default=None, help="device peak memory bandwidth, GB/s")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "bench/kernels.py needs a CUDA GPU; none is available here"}))
        return 2
    if not ops.triton_available():
        print(json.dumps({"error": "bench/kernels.py needs triton installed"}))
        return 2
    dtype = getattr(torch, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    peak = _peak_gbs(args.peak_gbs)
    results = []
    for batch in batches:
        results.append(bench_decode(batch, args.context, dtype, peak))
        results.append(bench_prefill(batch, args.prefill_len, dtype))
        results.append(bench_moe(batch, dtype))
        results.append(bench_lora(batch, dtype))
        results.extend(bench_w4a16(batch, dtype))
        torch.cuda.empty_cache()
        print(f"batch {batch} done", file=sys.stderr)
    for row in results:
        if row.get("target") is not None:
            row["meets_target"] = row["speedup"] >= row["target"]
    report = {
        "device": torch.cuda.get_device_name(),
        "peak_gbs": peak,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
