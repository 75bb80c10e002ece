"""`raylane sim ...`: run the cluster simulator from a YAML config."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(help="Discrete-event cluster simulator running raylane's real policies.", no_args_is_help=True)
console = Console(stderr=True)


@app.command("run")
def run_config(
    config: Annotated[Path, typer.Argument(help="Simulation config (YAML); see examples/sim/.")],
    out: Annotated[Path | None, typer.Option(help="Folder for result.json and the PNG plots.")] = None,
    plots: Annotated[bool, typer.Option(help="Write PNG plots next to result.json.")] = True,
) -> None:
    """Simulate CONFIG once; print the summary as JSON on stdout, the events/s achieved on stderr."""
    from sim.config import load_config
    from sim.simulator import Simulator

    logging.getLogger("router").setLevel(logging.WARNING)  # one line per routing decision is too many here
    try:
        sim_config = load_config(config)
        simulator = Simulator(sim_config)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="CONFIG") from e
    columns = (
        TextColumn("[bold]simulating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("requests, t={task.fields[sim_s]:.1f}s simulated"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("sim", total=None, sim_s=0.0)

        def progress(sim_s: float, finished: int, total: int) -> None:
            bar.update(task, completed=finished, total=total, sim_s=sim_s)

        simulator.progress = progress
        result = simulator.run()
    summary = result.summary
    console.print(
        f"[green]done[/green]: {summary['num_requests']} requests, {summary['events']} events in "
        f"{summary['wall_s']:.2f} s wall = [bold]{summary['events_per_s']:,.0f} events/s[/bold]; "
        f"SLO attainment {summary['slo_attainment']:.1%}, goodput {summary['goodput_rps']:.2f} req/s"
    )
    if out is not None:
        for path in result.save(out, plots=plots):
            console.print(f"wrote {path}")
    typer.echo(json.dumps(result.to_json()["summary"], indent=1))


@app.command("profile")
def profile_engine(
    out: Annotated[Path, typer.Option(help="Where to write the fitted profile (JSON).")] = Path("sim-profile.json"),
    model: Annotated[
        Path | None, typer.Option(help="HF model folder the workers serve; default: build the tiny Llama.")
    ] = None,
    max_num_batched_tokens: Annotated[int, typer.Option(help="The workers' token budget per step.")] = 256,
    max_num_seqs: Annotated[int, typer.Option(help="The workers' most running requests.")] = 32,
    repeats: Annotated[int, typer.Option(help="Measurements per grid point (median kept).")] = 5,
    contention_workers: Annotated[
        int, typer.Option(help="Measure CPU sharing for 1..N concurrent engines (1 skips it).")
    ] = 4,
    seed: Annotated[int, typer.Option(help="Seeds prompts and the held-out split.")] = 0,
) -> None:
    """Time our engine's steps on this machine, fit the profiled cost model, and write it to OUT.

    Use it as `cost_model: {kind: profiled, path: OUT}` in a `raylane sim run` config.
    """
    import tempfile

    from sim.profile import ProfileConfig, profile

    with tempfile.TemporaryDirectory(prefix="raylane-profile-") as tmp:
        if model is None:
            from workers.engine.tiny import make_tiny_model

            model = make_tiny_model("llama", Path(tmp) / "tiny-llama", seed=0, dtype="float32")
            console.print(f"no --model: profiling the tiny Llama (built in {model})")
        try:
            config = ProfileConfig(
                model=str(model),
                max_num_batched_tokens=max_num_batched_tokens,
                max_num_seqs=max_num_seqs,
                repeats=repeats,
                max_contention_workers=contention_workers,
                seed=seed,
            )
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            grid = bar.add_task("step grid", total=None)
            sharing = bar.add_task("CPU sharing", total=contention_workers if contention_workers > 1 else 0)
            fitted = profile(
                config,
                on_grid_progress=lambda done, total, _: bar.update(grid, completed=done, total=total),
                on_contention_progress=lambda done, total, _: bar.update(sharing, completed=done, total=total),
            )
    path = fitted.save(out)
    fit = fitted.metadata["fit"]
    console.print(
        f"[green]wrote {path}[/green]: R^2 {fit['r2']:.3f}, held-out mean relative error "
        f"{fit['heldout_mean_rel_error'] or 0:.1%} (max {fit['heldout_max_rel_error'] or 0:.1%}) over "
        f"{fit['num_heldout']} shapes; CPU sharing {fitted.contention_factors}"
    )
    summary = {k: v for k, v in fitted.to_dict().items() if k != "metadata"}
    typer.echo(json.dumps({**summary, "fit": fit}, indent=1))
