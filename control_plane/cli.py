"""The `raylane` command line."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from control_plane import cli_audit, cli_cluster

app = typer.Typer(
    help="raylane: Ray-based orchestration for LLM clusters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Make, inspect and run models locally (no cluster needed).", no_args_is_help=True)
app.add_typer(model_app, name="model")

console = Console(stderr=True)

ARCHES = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe")


@model_app.command("make-tiny")
def make_tiny(
    out: Annotated[Path, typer.Option(help="Folder to write the HF-format model into.")],
    arch: Annotated[str, typer.Option(help=f"Architecture: {', '.join(ARCHES)}.")] = "llama",
    preset: Annotated[
        str, typer.Option(help="'tiny' (seconds to build, for tests) or 'bench' (the 18M-param benchmark Llama).")
    ] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed for the random weights.")] = 0,
    dtype: Annotated[str, typer.Option(help="Weight dtype: float32, bfloat16 or float16.")] = "float32",
) -> None:
    """Write a small model with random weights and a real trained BPE tokenizer, in HF format."""
    from workers.engine.tiny import make_tiny_model

    if arch not in ARCHES:
        raise typer.BadParameter(f"unknown arch {arch!r}; choose one of {', '.join(ARCHES)}", param_hint="--arch")
    with console.status(f"building a {preset} {arch} model in {out}"):
        make_tiny_model(arch, out, preset=preset, seed=seed, dtype=dtype)
    console.print(f"[green]wrote[/green] {arch} ({preset}) to {out}")


@model_app.command("make-lora")
def make_lora(
    model: Annotated[Path, typer.Argument(help="Base model folder (from make-tiny).")],
    out: Annotated[Path, typer.Option(help="Folder to write the PEFT adapter into.")],
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    alpha: Annotated[float, typer.Option(help="LoRA alpha (scaling is alpha / rank).")] = 16.0,
    seed: Annotated[int, typer.Option(help="Seed for the random adapter weights.")] = 0,
) -> None:
    """Write a PEFT-format LoRA adapter with random (non-zero) weights for a model folder."""
    from workers.engine.tiny import make_tiny_lora

    make_tiny_lora(model, out, rank=rank, alpha=alpha, seed=seed)
    console.print(f"[green]wrote[/green] rank-{rank} adapter to {out}")


@model_app.command("generate")
def generate(
    model: Annotated[Path, typer.Argument(help="HF-format model folder.")],
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts; they run as one batch.")],
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 32,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1].")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens; 0 disables.")] = 0,
    seed: Annotated[int | None, typer.Option(help="Per-request seed for reproducible sampling.")] = None,
    adapter: Annotated[
        str | None, typer.Option(help="A LoRA adapter folder to apply to every prompt (PEFT format).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log engine decisions.")] = False,
) -> None:
    """Generate text with the in-process engine and print one completion per prompt."""
    from workers.engine.engine import Engine
    from workers.engine.errors import InvalidRequestError
    from workers.engine.sampling_params import SamplingParams

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        engine = Engine.from_pretrained(str(model), dtype=dtype, num_threads=threads)
        lora_name = None
        if adapter is not None:
            lora_name = Path(adapter).name
            engine.add_lora(lora_name, adapter)
        start = time.perf_counter()
        outputs = engine.generate(prompt, params, lora_names=[lora_name] * len(prompt))
    except (InvalidRequestError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    elapsed = time.perf_counter() - start
    for text, out in zip(prompt, outputs, strict=True):
        typer.echo(f"{text}{out.text}")
    num_tokens = sum(len(o.output_token_ids) for o in outputs)
    console.print(f"[dim]{num_tokens} tokens in {elapsed:.2f}s ({num_tokens / elapsed:.1f} tok/s)[/dim]")


cli_cluster.register(app)
cli_audit.register(app)


def _register_sim() -> None:
    from sim.cli import app as sim_app  # typer/rich only at import; the simulator loads when a command runs

    app.add_typer(sim_app, name="sim")


_register_sim()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
