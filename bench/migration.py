"""Live-migration downtime vs. a blocking KV copy and a recompute, per context length (CPU, in-process).

Two `AsyncEngine`s (each its own step-loop thread, one torch thread each) in this process run the same
code path as the worker actors: `workers.engine.migration.migrate` with `LocalDestination` instead of the
Ray actor handle, so the KV moves by in-memory copy rather than through Ray's object store. For each
context length, a request with that many prompt tokens decodes on the source and is moved three ways:

- live: multi-stage pre-copy while it decodes, then a paused final copy of the last blocks and the commit.
  Downtime is from the pause (on the source's engine thread) until the commit returned on the destination.
- blocking copy: pause, export the whole KV, import it on the destination (downtime = all of that).
- recompute: prefill prompt + generated tokens on the destination up to the next token.

It also reports how much the source's decode steps slow down while the pre-copy stages run. Prints one
JSON object; writes a PNG. Run: `flock /tmp/raylane-cpu.lock python bench/migration.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from workers.engine.async_engine import AsyncEngine  # noqa: E402
from workers.engine.engine import Engine  # noqa: E402
from workers.engine.migration import LocalDestination, migrate  # noqa: E402
from workers.engine.request import GenerateCall  # noqa: E402
from workers.engine.sampling_params import SamplingParams  # noqa: E402
from workers.engine.tiny import make_tiny_model  # noqa: E402

CONTEXTS = (128, 256, 512, 1024, 2048)
WARMUP_TOKENS = 6
"""Tokens decoded before any move, so step timings are steady."""


def build_model(out: Path) -> Path:
    # The "bench" preset (hidden 512, 6 layers) with 8 KV heads and a 4k context: 24 KiB of KV per token,
    # so a 2k context holds 48 MiB and copying it costs real time.
    return make_tiny_model("llama", out, preset="bench", seed=0, num_key_value_heads=8, max_position_embeddings=4096)


def make_engine(model: Path) -> AsyncEngine:
    engine = Engine.from_pretrained(
        str(model),
        dtype="float32",
        kv_cache_bytes=160 * 2**20,
        enable_prefix_caching=False,
        max_num_batched_tokens=4096,
        num_threads=1,
    )
    return AsyncEngine(engine)


def prompt_of(length: int, salt: int) -> list[int]:
    return [3 + (i * 7919 + salt * 104729) % 8000 for i in range(length)]


async def start(source: AsyncEngine, request_id: str, prompt: list[int], max_tokens: int):
    """Start a decoding request; returns (reader task, token timestamps, ready event)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    stamps: list[float] = []
    ready = asyncio.Event()

    async def read() -> str:
        async for out in source.generate(GenerateCall(request_id=request_id, prompt_token_ids=prompt, sampling=params)):
            if out.new_token_ids:
                stamps.append(time.perf_counter())
            if len(stamps) >= WARMUP_TOKENS:
                ready.set()
            if out.migrated_to or out.finished:
                ready.set()
                return out.migrated_to or out.finish_reason or ""
        return "closed"

    return asyncio.create_task(read()), stamps, ready


def gaps_ms(stamps: list[float], since: float, until: float) -> list[float]:
    return [(b - a) * 1e3 for a, b in itertools.pairwise(stamps) if since <= b <= until]


async def measure_live(source: AsyncEngine, dest: AsyncEngine, length: int, rid: str, repeats: int) -> list[dict]:
    """Migrate one decoding request back and forth `repeats` times (one prefill, many live migrations).

    The reader follows the stream across engines as the router does (on `migrated_to`, the
    destination's committed stream); step gaps before each migration are its baseline.
    """
    engines = {"a": source, "b": dest}
    locals_ = {name: LocalDestination(engine) for name, engine in engines.items()}
    params = SamplingParams(max_tokens=20 * repeats + 200, ignore_eos=True, detokenize=False)
    stamps: list[float] = []

    async def read() -> None:
        stream = source.generate(GenerateCall(request_id=rid, prompt_token_ids=prompt_of(length, 1), sampling=params))
        while True:
            follow = ""
            async for out in stream:
                if out.new_token_ids:
                    stamps.append(time.perf_counter())
                follow = out.migrated_to
            if not follow:
                return
            stream = locals_[follow].streams.pop(rid)

    reader = asyncio.create_task(read())
    rows = []
    here, there = "a", "b"
    for _ in range(repeats):
        n = len(stamps)
        while len(stamps) < max(n, WARMUP_TOKENS) + 6:  # steady decode steps before each move: the baseline
            await asyncio.sleep(0.002)
        base = statistics.median(gaps_ms(stamps, stamps[-6], stamps[-1]))
        begin = time.perf_counter()
        result = await migrate(
            engines[here],
            locals_[there],
            rid,
            destination_id=there,
            max_stages=4,
            last_stage_max_blocks=2,
            call_timeout_s=60,
        )
        end = time.perf_counter()
        assert result.committed, result.reason
        during = gaps_ms(stamps, begin, end) or [base]
        rows.append(
            {
                "downtime_ms": result.downtime_ms,
                "total_ms": result.total_ms,
                "stages": result.num_stages,
                "bytes": result.bytes_moved,
                "base_step_ms": base,
                "step_slowdown_max": max(during) / base,
                "step_slowdown_mean": statistics.fmean(during) / base,
            }
        )
        here, there = there, here
    await engines[here].abort(rid)
    await reader
    return rows


async def measure_blocking(source: AsyncEngine, dest: AsyncEngine, length: int, rid: str) -> float:
    reader, _, ready = await start(source, rid, prompt_of(length, 2), max_tokens=400)
    await ready.wait()

    def pause_and_export(engine: Engine):
        paused_at = time.perf_counter()
        engine.pause(rid)
        return engine.export_kv(rid), paused_at

    export, paused_at = await source.acall(pause_and_export)
    await dest.acall(lambda e: e.import_kv(export))
    downtime = (time.perf_counter() - paused_at) * 1e3
    await source.abort(rid)
    await dest.abort(rid)
    await reader
    return downtime


async def measure_recompute(source: AsyncEngine, dest: AsyncEngine, length: int, rid: str) -> float:
    prompt = prompt_of(length, 3)
    reader, _, ready = await start(source, rid, prompt, max_tokens=400)
    await ready.wait()
    request_tokens = await source.acall(lambda e: list(e.scheduler.get_request(rid).all_token_ids))
    await source.abort(rid)
    await reader
    started = time.perf_counter()
    params = SamplingParams(max_tokens=1, ignore_eos=True, detokenize=False)
    recompute = GenerateCall(request_id=rid + "-recompute", prompt_token_ids=request_tokens, sampling=params)
    async for out in dest.generate(recompute):
        if out.new_token_ids:
            break
    return (time.perf_counter() - started) * 1e3


async def run(contexts: tuple[int, ...], repeats: int, live_repeats: int, model: Path) -> dict:
    with make_engine(model) as source, make_engine(model) as dest:
        rows = []
        await measure_live(source, dest, 64, "warmup", 2)  # first-call costs out of the way
        for length in contexts:
            lives = await measure_live(source, dest, length, f"live-{length}", live_repeats)
            blocking = [await measure_blocking(source, dest, length, f"block-{length}-{i}") for i in range(repeats)]
            recompute = [await measure_recompute(source, dest, length, f"re-{length}-{i}") for i in range(repeats)]
            live = {k: statistics.median(x[k] for x in lives) for k in lives[0]}
            rows.append(
                {
                    "context": length,
                    "live_downtime_ms": round(live["downtime_ms"], 3),
                    "live_downtime_ms_p90": round(_p90([x["downtime_ms"] for x in lives]), 3),
                    "live_total_ms": round(live["total_ms"], 2),
                    "live_stages": live["stages"],
                    "live_bytes": int(live["bytes"]),
                    "source_step_ms": round(live["base_step_ms"], 2),
                    "source_step_slowdown_max": round(live["step_slowdown_max"], 3),
                    "source_step_slowdown_mean": round(live["step_slowdown_mean"], 3),
                    "blocking_copy_downtime_ms": round(statistics.median(blocking), 3),
                    "recompute_downtime_ms": round(statistics.median(recompute), 2),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
        first, last = rows[0], rows[-1]
        growth = {
            "live_downtime": last["live_downtime_ms"] / first["live_downtime_ms"],
            "blocking_copy": last["blocking_copy_downtime_ms"] / first["blocking_copy_downtime_ms"],
            "recompute": last["recompute_downtime_ms"] / first["recompute_downtime_ms"],
        }
        return {
            "bench": "migration",
            "mode": "in-process: two AsyncEngines (two step-loop threads), LocalDestination, no Ray",
            "model": "llama bench preset, hidden 512, 6 layers, 8 KV heads, fp32",
            "torch_threads_per_engine": 1,
            "block_size": 16,
            "repeats": repeats,
            "live_repeats": live_repeats,
            "rows": rows,
            "growth_first_to_last": {k: round(v, 2) for k, v in growth.items()},
            "target_met": growth["live_downtime"] <= 2.0
            and growth["blocking_copy"] >= 5.0
            and growth["recompute"] >= 5.0,
        }


def _p90(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.9 * len(values)))]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [r["context"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, [r["live_downtime_ms"] for r in rows], "o-", label="live migration: last-stage downtime")
    ax.plot(x, [r["blocking_copy_downtime_ms"] for r in rows], "s-", label="blocking copy of the whole KV")
    ax.plot(x, [r["recompute_downtime_ms"] for r in rows], "^-", label="recompute on the destination")
    ax.plot(x, [r["live_total_ms"] for r in rows], "x--", label="live migration: whole migration time")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("ms")
    ax.set_title("Request downtime when moving a decoding request (CPU)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    parser.add_argument("--repeats", type=int, default=3, help="blocking-copy and recompute runs per length")
    parser.add_argument("--live-repeats", type=int, default=9, help="live migrations per length (ping-pong)")
    parser.add_argument("--png", type=Path, default=Path("bench/migration.png"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model")
        result = asyncio.run(run(tuple(args.contexts), args.repeats, args.live_repeats, model))
    plot(result, args.png)
    result["png"] = str(args.png)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
