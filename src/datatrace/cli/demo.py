"""``datatrace demo``: the built-in demo on bundled data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from datatrace.cli.app import app, console, user_errors
from datatrace.demo.run import DemoConfig, run_demo


@app.command()
def demo(
    context: typer.Context,
    out: Annotated[str | None, typer.Option(help=DemoConfig.help("out"))] = None,
    model: Annotated[str | None, typer.Option(help=DemoConfig.help("model"))] = None,
    models: Annotated[int | None, typer.Option(help=DemoConfig.help("n_models"))] = None,
    epochs: Annotated[int | None, typer.Option(help=DemoConfig.help("epochs"))] = None,
    proj_dim: Annotated[int | None, typer.Option(help=DemoConfig.help("proj_dim"))] = None,
    n_train: Annotated[int | None, typer.Option(help=DemoConfig.help("n_train"))] = None,
    lds_models: Annotated[int | None, typer.Option(help=DemoConfig.help("lds_models"))] = None,
    targets: Annotated[int | None, typer.Option(help=DemoConfig.help("n_targets"))] = None,
    top: Annotated[int | None, typer.Option("--top", "-k", help=DemoConfig.help("k"))] = None,
    seed: Annotated[int | None, typer.Option(help=DemoConfig.help("seed"))] = None,
    quick: Annotated[bool, typer.Option("--quick", help=DemoConfig.help("quick"))] = False,
    progress: Annotated[
        bool | None, typer.Option("--progress/--no-progress", help=DemoConfig.help("progress"))
    ] = None,
    threads: Annotated[int | None, typer.Option(help=DemoConfig.help("threads"))] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="Start from a saved config.json (options given here override it)."),
    ] = None,
) -> None:
    """Train small digit classifiers, attribute their test predictions with TRAK, report.

    Rerunning with the same --out reuses the checkpoints and the store.
    """
    with user_errors(context):
        base = DemoConfig.from_json(config) if config is not None else DemoConfig()
        given = {
            "out": out,
            "model": model,
            "n_models": models,
            "epochs": epochs,
            "proj_dim": proj_dim,
            "n_train": n_train,
            "lds_models": lds_models,
            "n_targets": targets,
            "k": top,
            "seed": seed,
            "quick": quick or None,
            "progress": progress,
            "threads": threads,
        }
        run_demo(replace(base, **{k: v for k, v in given.items() if v is not None}), console)
