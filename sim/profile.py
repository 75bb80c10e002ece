"""Measure our engine's step times on this machine and fit `ProfiledCostModel` to them.

Two measurements:
1. **Step grid**: one engine (1 torch thread, like a worker actor) runs prefill chunks of
   several lengths at several contexts, decode batches of several sizes and contexts, and
   mixed steps (a decode batch plus a prefill chunk). Each `Engine.step()` is timed and its
   exact shape read from the scheduler's output; the median per grid point is the sample.
   A seeded fifth of the grid points is held out to score the fit.
2. **CPU sharing**: k engine processes (k = 1..N, one thread each) step the same workload at
   once; the mean step time at k over that at 1 is the contention factor for k busy workers.

The shape of a step is read, not assumed: the scheduler decides the chunks (token budget,
chunked prefill), so every sample is a step the engine really ran.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.cost import StepShape
from sim.cost_profiled import FEATURES, ProfiledCostModel, fit_step_times, shape_features

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, str], None]
"""`(num_done, num_total, label)`, called after each measured grid point."""

# Prompt token ids are drawn above the tiny tokenizers' special ids (0-2).
_FIRST_TOKEN_ID = 3
_DECODE_STEPS_PER_POINT = 4
_WARMUP_STEPS = 20


@dataclass(kw_only=True, frozen=True)
class ProfileConfig:
    """What to profile and how hard; the engine fields mirror a worker's engine."""

    model: str
    """HF-format model folder, the one the workers serve."""
    dtype: str = "auto"
    """Engine dtype, as the deployment's."""
    block_size: int = 16
    """Tokens per KV block, as the deployment's engine."""
    max_num_batched_tokens: int = 256
    """The workers' token budget; decode steps of the grid run under it."""
    max_num_seqs: int = 32
    """Most requests in a step; the largest decode batch measured."""
    max_loras: int = 4
    """LoRA slots, as the deployment's engine (the manager is built even when unused)."""
    kv_cache_bytes: int = 16 << 20
    """KV pool of the profiling engine: large enough for the biggest grid point."""
    num_threads: int = 1
    """torch threads, as a worker actor."""
    repeats: int = 5
    """Times each grid point is measured; its median is the sample."""
    heldout_fraction: float = 0.2
    """Share of grid points kept out of the fit to score it."""
    seed: int = 0
    """Seeds the prompts and the held-out split."""
    max_contention_workers: int = 4
    """Measure CPU sharing for 1..this many concurrent engines; 1 skips it."""
    contention_duration_s: float = 4.0
    """Seconds each concurrent engine steps per contention measurement."""

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.max_contention_workers < 1:
            raise ValueError("repeats and max_contention_workers must be >= 1")
        if not 0 <= self.heldout_fraction < 0.5:
            raise ValueError(f"heldout_fraction must be in [0, 0.5), got {self.heldout_fraction}")
        if self.contention_duration_s <= 0:
            raise ValueError(f"contention_duration_s must be positive, got {self.contention_duration_s}")
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"{self.model} is not an HF model folder (no config.json); make one with raylane model")

    def engine_config(self) -> Any:
        from workers.engine.config import EngineConfig

        return EngineConfig(
            model=self.model,
            dtype=self.dtype,
            block_size=self.block_size,
            kv_cache_bytes=self.kv_cache_bytes,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            max_loras=self.max_loras,
            num_threads=self.num_threads,
        )


@dataclass(frozen=True, slots=True)
class GridPoint:
    """One workload of the step grid."""

    kind: str
    """`prefill`, `decode` or `mixed`."""
    chunk_len: int = 0
    """Prefill tokens computed in the timed step."""
    prefill_context: int = 0
    """Prompt tokens already computed before that chunk."""
    batch_size: int = 0
    """Requests decoding in the timed step."""
    decode_context: int = 0
    """Prompt length of each decoding request."""


def step_shape(scheduled: Sequence[Any]) -> StepShape:
    """The `StepShape` of a scheduler batch (`ScheduledRequest`s); single-token entries are decodes."""
    num_prefill = attn = num_decodes = context = 0
    for s in scheduled:
        if s.num_new_tokens == 1:
            num_decodes += 1
            context += s.num_computed_tokens + 1
        else:
            num_prefill += s.num_new_tokens
            attn += s.num_new_tokens * (s.num_computed_tokens + s.num_new_tokens)
    return StepShape(
        num_prefill_tokens=num_prefill, prefill_attn_work=attn, num_decodes=num_decodes, decode_context_sum=context
    )


def default_grid(config: ProfileConfig, max_model_len: int) -> list[GridPoint]:
    """Prefill chunks x contexts, decode batches x contexts, and mixed steps that fit the model and budget."""
    budget = config.max_num_batched_tokens
    limit = max_model_len - _DECODE_STEPS_PER_POINT - 2
    chunks = sorted({c for c in (16, 32, 64, 128, 192, 256, 384, 512) if c <= budget})
    contexts = (0, 64, 160, 320)
    batches = sorted({b for b in (1, 2, 4, 8, 16, 24, 32) if b <= config.max_num_seqs})
    grid = [
        GridPoint(kind="prefill", chunk_len=c, prefill_context=ctx)
        for c in chunks
        for ctx in contexts
        if c + ctx < limit
    ]
    grid += [
        GridPoint(kind="decode", batch_size=b, decode_context=ctx)
        for b in batches
        for ctx in (16, 64, 160, 320)
        if ctx < limit
    ]
    grid += [
        GridPoint(kind="mixed", batch_size=b, decode_context=dctx, chunk_len=c, prefill_context=pctx)
        for b in (2, 8, 24)
        for dctx in (64, 256)
        for c, pctx in ((32, 0), (128, 0), (96, 128))
        if b <= config.max_num_seqs and b + c <= budget and dctx < limit and c + pctx < limit
    ]
    return grid


class _StepClock:
    """Times `Engine.step()` and reads the shape the scheduler built for it."""

    def __init__(self, engine: Any, budget: int, rng: random.Random) -> None:
        self.engine = engine
        self.budget = budget
        self.rng = rng
        self._last_batch: list[Any] = []
        self._next_id = 0
        schedule = engine.scheduler.schedule

        def recording_schedule() -> Any:
            out = schedule()
            self._last_batch = list(out.scheduled)
            return out

        engine.scheduler.schedule = recording_schedule

    def set_budget(self, num_tokens: int) -> None:
        # The grid steers chunk sizes through the budget; the scheduler reads it afresh each step.
        num_tokens = max(1, num_tokens)
        scheduler = self.engine.scheduler
        max_num_seqs = min(self.engine.config.max_num_seqs, num_tokens)
        scheduler.config = dataclasses.replace(
            scheduler.config, max_num_batched_tokens=num_tokens, max_num_seqs=max_num_seqs
        )

    def add(self, prompt_len: int, max_tokens: int) -> str:
        from workers.engine.request import GenerateCall
        from workers.engine.sampling_params import SamplingParams

        request_id = f"profile-{self._next_id}"
        self._next_id += 1
        vocab = self.engine.model_config.vocab_size
        prompt = [self.rng.randrange(_FIRST_TOKEN_ID, vocab) for _ in range(prompt_len)]
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        self.engine.add_request(GenerateCall(request_id=request_id, prompt_token_ids=prompt, sampling=params))
        return request_id

    def step(self) -> tuple[StepShape, float]:
        start = time.perf_counter()
        self.engine.step()
        elapsed = time.perf_counter() - start
        return step_shape(self._last_batch), elapsed

    def clear(self) -> None:
        for request_id in list(self.engine.scheduler.requests):
            self.engine.abort(request_id)
        self.set_budget(self.budget)

    def start_decodes(self, batch_size: int, context: int) -> None:
        """Bring `batch_size` requests with `context`-token prompts to the point where each decodes."""
        for _ in range(batch_size):
            self.add(context, max_tokens=10_000)
        self.set_budget(batch_size * context)
        while any(r.num_tokens - r.num_computed_tokens > 1 for r in self.engine.scheduler.requests.values()):
            self.engine.step()

    def start_chunk(self, chunk_len: int, prefill_context: int, num_decodes: int) -> None:
        """Queue a prompt whose next step computes `chunk_len` tokens after `prefill_context` cached ones."""
        self.add(prefill_context + chunk_len, max_tokens=1)
        if prefill_context:
            self.set_budget(num_decodes + prefill_context)
            self.engine.step()
        self.set_budget(num_decodes + chunk_len)

    def measure(self, point: GridPoint) -> list[tuple[StepShape, float]]:
        self.clear()
        if point.kind == "decode":
            self.start_decodes(point.batch_size, point.decode_context)
            self.set_budget(self.budget)
            return [self.step() for _ in range(_DECODE_STEPS_PER_POINT)]
        if point.kind == "mixed":
            self.start_decodes(point.batch_size, point.decode_context)
        self.start_chunk(point.chunk_len, point.prefill_context, point.batch_size)
        return [self.step()]


def measure_grid(
    config: ProfileConfig, *, grid: Sequence[GridPoint] | None = None, on_progress: ProgressFn | None = None
) -> list[tuple[GridPoint, StepShape, float]]:
    """Run every grid point `config.repeats` times; return `(point, shape, median seconds)` per distinct shape."""
    import torch

    from workers.engine.engine import Engine

    torch.set_num_threads(config.num_threads)
    engine = Engine(config.engine_config())
    grid = list(grid) if grid is not None else default_grid(config, engine.max_model_len)
    clock = _StepClock(engine, config.max_num_batched_tokens, random.Random(config.seed))
    _warm_up(clock)
    samples: dict[tuple[GridPoint, StepShape], list[float]] = {}
    for i, point in enumerate(grid):
        for _ in range(config.repeats):
            for shape, elapsed in clock.measure(point):
                samples.setdefault((point, shape), []).append(elapsed)
        if on_progress is not None:
            on_progress(i + 1, len(grid), point.kind)
    clock.clear()
    return [(point, shape, statistics.median(times)) for (point, shape), times in samples.items()]


def _warm_up(clock: _StepClock) -> None:
    clock.clear()
    clock.start_decodes(4, 32)
    for _ in range(_WARMUP_STEPS):
        clock.step()
    clock.clear()


# ---- CPU sharing ------------------------------------------------------------------------------


def _contention_worker(config: ProfileConfig, barrier: Any, results: Any) -> None:
    """Child process: step a fixed mixed workload for `contention_duration_s` and report the mean step time."""
    import torch

    from workers.engine.engine import Engine

    torch.set_num_threads(config.num_threads)
    clock = _StepClock(Engine(config.engine_config()), config.max_num_batched_tokens, random.Random(os.getpid()))
    _warm_up(clock)
    barrier.wait()
    times = []
    deadline = time.perf_counter() + config.contention_duration_s
    for _ in _steady_workload(clock):
        if time.perf_counter() > deadline:
            break
        times.append(clock.step()[1])
    results.put(sum(times) / len(times))


def _steady_workload(clock: _StepClock) -> Iterator[None]:
    """Keep 8 requests decoding at mid context, replacing each finished one (so prefill chunks mix in)."""
    clock.clear()
    while True:
        while len(clock.engine.scheduler.requests) < 8:
            clock.add(96, max_tokens=48)
        yield


def measure_contention(config: ProfileConfig, on_progress: ProgressFn | None = None) -> dict[int, float]:
    """Mean step time with k engines stepping at once over that with one, for k = 1..max_contention_workers."""
    context = multiprocessing.get_context("spawn")
    means: dict[int, float] = {}
    for k in range(1, config.max_contention_workers + 1):
        barrier, results = context.Barrier(k), context.Queue()
        procs = [context.Process(target=_contention_worker, args=(config, barrier, results)) for _ in range(k)]
        for p in procs:
            p.start()
        values = _collect(procs, results, timeout_s=120 + 4 * config.contention_duration_s)
        means[k] = statistics.mean(values)
        logger.info("contention measured num_engines=%d mean_step_ms=%.3f", k, means[k] * 1e3)
        if on_progress is not None:
            on_progress(k, config.max_contention_workers, f"{k} engines")
    return {k: max(1.0, v / means[1]) if k > 1 else 1.0 for k, v in means.items()}


def _collect(procs: list[Any], results: Any, *, timeout_s: float) -> list[float]:
    """One mean step time per child; fails fast when a child dies instead of waiting out the timeout."""
    import queue

    values: list[float] = []
    deadline = time.monotonic() + timeout_s
    while len(values) < len(procs):
        try:
            values.append(results.get(timeout=1.0))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(
                    f"contention measurement failed (child exit codes {dead}); a script that calls "
                    "profile() must guard it with `if __name__ == '__main__':` (children are spawned)"
                ) from None
    for p in procs:
        p.join(timeout=60)
    return values


# ---- the whole profile -------------------------------------------------------------------------


def profile(
    config: ProfileConfig,
    *,
    on_grid_progress: ProgressFn | None = None,
    on_contention_progress: ProgressFn | None = None,
) -> ProfiledCostModel:
    """Measure, fit, and return the model (with the fit report and the samples in its metadata)."""
    started = time.perf_counter()
    measured = measure_grid(config, on_progress=on_grid_progress)
    rng = random.Random(config.seed)
    points = sorted({point for point, _, _ in measured}, key=repr)
    heldout_points = set(rng.sample(points, round(len(points) * config.heldout_fraction)))
    shapes = [shape for _, shape, _ in measured]
    times = [t for _, _, t in measured]
    heldout = [point in heldout_points for point, _, _ in measured]
    coefficients, report = fit_step_times(shapes, times, heldout=heldout)
    factors = measure_contention(config, on_contention_progress) if config.max_contention_workers > 1 else {1: 1.0}
    logger.info(
        "profile fitted r2=%.4f heldout_mean_rel_error=%.3f contention=%s",
        report.r2,
        report.heldout_mean_rel_error,
        factors,
    )
    metadata = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "num_cpus": os.cpu_count()},
        "engine": {k: v for k, v in dataclasses.asdict(config).items() if k != "model"},
        "model": _describe_model(config.model),
        "fit": report.to_dict(),
        "profile_seconds": round(time.perf_counter() - started, 1),
        "samples": {
            "columns": ["kind", *FEATURES[1:], "seconds", "heldout"],
            "rows": [
                [point.kind, *shape_features(shape)[1:], t, flag]
                for (point, shape, t), flag in zip(measured, heldout, strict=True)
            ],
        },
    }
    return ProfiledCostModel(coefficients=coefficients, contention_factors=factors, metadata=metadata)


def _describe_model(model: str) -> dict[str, Any]:
    import json

    cfg = json.loads((Path(model) / "config.json").read_text())
    keys = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    return {"path": str(model), **{k: cfg.get(k) for k in (*keys, "intermediate_size", "vocab_size")}}
