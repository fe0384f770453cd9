"""``datatrace fit``: featurize a training set and build TRAK's kernels from a run config."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from datatrace.cli.app import app, console, open_store, user_errors


@app.command("fit")
def fit(
    context: typer.Context,
    config: Annotated[Path, typer.Argument(help="Run config (JSON); --init writes one.")],
    init: Annotated[
        bool, typer.Option("--init", help="Write a config with every setting at its default.")
    ] = False,
    store: Annotated[str | None, typer.Option(help="Store (with --init).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite with --init.")] = False,
    config_out: Annotated[
        Path | None,
        typer.Option(
            help="Write the config saved in the store CONFIG (a store path) to this file."
        ),
    ] = None,
) -> None:
    """Featurize a training set into a store and build TRAK's kernels, from a run config.

    The model, data and checkpoints are named by import paths in the config; the backend
    setting spreads the work over local processes or a Ray cluster. Reruns resume; several runs
    of one config (sharing the store) split the chunks between them. The config is saved in the
    store beside the features.
    """
    from datatrace.fit_config import FitRunConfig, run_fit_config, saved_fit_config

    with user_errors(context):
        if config_out is not None:
            saved = saved_fit_config(open_store(str(config)))
            if saved is None:
                raise ValueError(f"the store at {config} has no saved fit config")
            config_out.write_text(json.dumps(saved, indent=2) + "\n")
            console.print(f"wrote the saved config to {config_out}")
            return
        if init:
            if config.exists() and not force:
                raise ValueError(f"{config} exists: pass --force to overwrite it")
            values = FitRunConfig()
            values.store = store or values.store
            values.to_json(config)
            console.print(f"wrote {config}; run it with: datatrace fit {config}")
            return
        settings = FitRunConfig.from_json(config).check()
        started = time.perf_counter()
        trak = run_fit_config(settings)
        seconds = time.perf_counter() - started
        if hasattr(trak, "kernels_"):
            console.print(
                f"fitted: {trak.n_train_} training examples × {len(trak.checkpoints_)} "
                f"checkpoint(s), k = {trak.feature_dim_}, in {settings.store} · {seconds:.1f} s",
                highlight=False,
            )
        else:
            console.print(
                f"featurized this run's share into {settings.store} · {seconds:.1f} s; other "
                "runs still hold chunks: rerun when they finish to build the kernels",
                highlight=False,
            )
