"""``datatrace subsets``: train models on subsets of the training set (for datamodels and LDS)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from datatrace.cli.app import app, console, open_store, user_errors

subsets_app = typer.Typer(
    help="Subset experiments: train models on random subsets of the training set.",
    no_args_is_help=True,
)
app.add_typer(subsets_app, name="subsets")

STORE_HELP = "A datatrace store: a directory or an fsspec URL."


@subsets_app.command("init")
def init(
    context: typer.Context,
    config: Annotated[Path, typer.Argument(help="Where to write the config (JSON).")],
    store: Annotated[str | None, typer.Option(help="Store of the experiment.")] = None,
    name: Annotated[str | None, typer.Option(help="Name of the experiment.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a config with every setting at its default (the bundled digits), to edit and run."""
    from datatrace.subsets.config import SubsetRunConfig

    with user_errors(context):
        if config.exists() and not force:
            raise ValueError(f"{config} exists: pass --force to overwrite it")
        values = SubsetRunConfig()
        values.store = store or values.store
        values.name = name or values.name
        values.to_json(config)
        console.print(f"wrote {config}; run it with: datatrace subsets run {config}")


@subsets_app.command("run")
def run(
    context: typer.Context,
    config: Annotated[
        Path, typer.Argument(help="Config file (datatrace subsets init writes one).")
    ],
    progress: Annotated[
        bool | None, typer.Option("--progress/--no-progress", help="Show a progress bar.")
    ] = None,
) -> None:
    """Train and evaluate a model on every unfinished subset of the experiment a config describes.

    Reruns skip finished rows; a killed run resumes; several runs of one config (on one machine
    or several, sharing the store) split the rows between them.
    """
    from datatrace.subsets.config import SubsetRunConfig, run_config

    with user_errors(context):
        settings = SubsetRunConfig.from_json(config).check()
        if progress is not None:
            settings.progress = progress
        started = time.perf_counter()
        experiment = run_config(settings)
        stats = experiment.last_run_
        seconds = time.perf_counter() - started
        done = int(experiment.completed.sum())
        per_model = (
            f" ({stats.seconds / (len(stats.computed) * experiment.n_seeds):.2f} s per model)"
            if stats.computed
            else ""
        )
        console.print(
            f"[bold]{experiment.name}[/]: {done}/{experiment.n_rows} subsets done · this run "
            f"trained {len(stats.computed)} subsets{per_model}, "
            f"{stats.by_others} finished by other runners, {stats.taken_over} taken over · "
            f"{seconds:.1f} s",
            highlight=False,
        )


@subsets_app.command("status")
def status(
    context: typer.Context,
    store: Annotated[str, typer.Argument(help=STORE_HELP)],
    name: Annotated[str | None, typer.Argument(help="Experiment (default: list them).")] = None,
    config_out: Annotated[
        Path | None, typer.Option(help="Write the config saved with the experiment to this file.")
    ] = None,
) -> None:
    """Show the rows of a subset experiment: finished, claimed by runners, stale claims."""
    from datatrace.subsets import SubsetExperiment, list_experiments

    with user_errors(context):
        opened = open_store(store)
        if name is None:
            names = list_experiments(opened)
            console.print(f"subset experiments in {opened.where}: {', '.join(names) or 'none'}")
            return
        experiment = SubsetExperiment.open(opened, name)
        done = experiment.completed
        holders = experiment.claims().holders()
        stale = sum(record["stale"] for record in holders.values())
        provenance = experiment.provenance
        console.print(
            f"[bold]{name}[/]: {int(done.sum())}/{len(done)} rows done · "
            f"{len(holders) - stale} being computed · {stale} stale claims (taken over by the "
            f"next run) · n_train={provenance['n_train']}, n_outputs={provenance['n_outputs']}, "
            f"n_seeds={provenance['n_seeds']}, masks={provenance['masks']}, "
            f"alpha={provenance['alpha']}, seed={provenance['seed']}",
            highlight=False,
        )
        if holders:
            table = Table(title="Claims", title_justify="left")
            for column in ("row", "host", "pid", "age (s)", "state"):
                table.add_column(column)
            now = time.time()
            for row, record in sorted(holders.items()):
                table.add_row(
                    str(row),
                    Text(str(record.get("host", "?")).split("/")[0]),
                    str(record.get("pid", "?")),
                    f"{now - float(record.get('started', now)):.0f}",
                    Text("stale", style="yellow") if record["stale"] else "running",
                )
            console.print(table)
        saved = experiment.saved_config()
        if config_out is not None:
            if saved is None:
                raise ValueError(f"{name!r} has no saved config (it was not run from one)")
            config_out.write_text(json.dumps(saved, indent=2) + "\n")
            console.print(f"wrote the saved config to {config_out}")
