"""`datatrace datamodels fit` and `datatrace lds`: datamodels and their LDS from a store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import torch
import typer
from rich.markup import escape

from datatrace._arguments import thread_count
from datatrace.cli.app import app, console, error_console, open_store, user_errors
from datatrace.evaluation.lds import lds as linear_datamodeling_score
from datatrace.methods.datamodels import Datamodels

if TYPE_CHECKING:
    from datatrace.store import Store

datamodels_app = typer.Typer(
    help="Datamodels: sparse linear models of each target's output on subset masks.",
    no_args_is_help=True,
)
app.add_typer(datamodels_app, name="datamodels")

STORE_HELP = "A datatrace store: a directory or an fsspec URL."
DEFAULTS = Datamodels()


def read_subsets(store: Store, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Masks ``(R, n_train)`` and seed-averaged outputs ``(R, n_outputs)`` of the finished rows
    of the subset experiment ``name``.

    Raises:
        KeyError: no experiment of that name (the message lists those in the store).
        ValueError: no finished rows.
    """
    from datatrace.subsets import SubsetExperiment

    results = SubsetExperiment.open(store, name).results()
    if len(results) == 0:
        raise ValueError(
            f"the subset experiment {name!r} has no finished rows yet: run it first "
            "(SubsetExperiment.run)"
        )
    return results.masks, results.outputs


def subsets_protocol(store: Store, name: str) -> dict[str, Any]:
    """The LDS protocol of the subset experiment ``name``: ``{"protocol", "drop_fraction",
    "seed_policy", "n_seeds"}`` from its provenance (classic for tables made without one)."""
    from datatrace.subsets import SubsetExperiment

    experiment = SubsetExperiment.open(store, name)
    return {
        "protocol": experiment.protocol,
        "drop_fraction": experiment.drop_fraction,
        "seed_policy": experiment.seed_policy,
        "n_seeds": experiment.n_seeds,
    }


def _set_threads(threads: int) -> None:
    thread_count(threads)
    if threads:
        torch.set_num_threads(threads)


@datamodels_app.command("fit")
def fit(
    context: typer.Context,
    store: Annotated[str, typer.Argument(help=STORE_HELP)],
    subsets: Annotated[str, typer.Option(help="Name of the subset experiment to fit on.")],
    out_name: Annotated[
        str, typer.Option(help="Save the datamodels under scores/<out-name> in the store.")
    ],
    l1_path_steps: Annotated[
        int, typer.Option(help="Number of λ values on the path.")
    ] = DEFAULTS.l1_path_steps,
    eps: Annotated[
        float, typer.Option(help="Smallest λ of the path as a fraction of λ_max.")
    ] = DEFAULTS.eps,
    selection: Annotated[
        str,
        typer.Option(
            help="How λ is chosen: lds (cross-validated LDS pooled across targets), mse (the same "
            "on the squared error) or validation (each target on one held-out split)."
        ),
    ] = DEFAULTS.selection,
    cv_folds: Annotated[
        int, typer.Option(help="Folds of the pooled cross-validation.")
    ] = DEFAULTS.cv_folds,
    target_shrinkage: Annotated[
        float,
        typer.Option(
            help="Weight of the pooled score in each target's choice (inf: one λ for all)."
        ),
    ] = DEFAULTS.target_shrinkage,
    cv_averaging: Annotated[
        bool,
        typer.Option(
            "--cv-averaging/--no-cv-averaging",
            help="Average the refit with the folds' fits at the chosen λ.",
        ),
    ] = DEFAULTS.cv_averaging,
    relax: Annotated[
        float,
        typer.Option(help="Relaxed lasso: share of the way to least squares on each support."),
    ] = DEFAULTS.relax,
    val_fraction: Annotated[
        float, typer.Option(help="--selection validation: share of subsets held out to choose λ.")
    ] = DEFAULTS.val_fraction,
    patience: Annotated[
        int, typer.Option(help="Path steps without a better score before the path stops.")
    ] = DEFAULTS.early_stop_patience,
    max_iter: Annotated[
        int, typer.Option(help="Solver iterations at most per λ.")
    ] = DEFAULTS.max_iter,
    tol: Annotated[
        float, typer.Option(help="Duality-gap tolerance relative to the output variance.")
    ] = DEFAULTS.tol,
    device: Annotated[
        str | None, typer.Option(help="Where to solve: cpu (default), cuda, cuda:1, ...")
    ] = None,
    float64: Annotated[
        bool, typer.Option("--float64", help="Solve in float64 instead of float32.")
    ] = False,
    batch_targets: Annotated[
        int | None, typer.Option(help="Targets solved together (default all; fewer: less memory).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the folds (or validation subsets).")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: leave torch's setting).")] = 0,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")
    ] = True,
) -> None:
    """Fit datamodels on a subset experiment and save them as attributions.

    The settings are saved with the result (its info), so `datatrace info STORE` shows them.
    """
    with user_errors(context):
        _set_threads(threads)
        opened = open_store(store, read_only=False)  # refuses a path with no store
        masks, outputs = read_subsets(opened, subsets)
        estimator = Datamodels(
            l1_path_steps=l1_path_steps,
            eps=eps,
            selection=selection,
            cv_folds=cv_folds,
            target_shrinkage=target_shrinkage,
            cv_averaging=cv_averaging,
            relax=relax,
            val_fraction=val_fraction,
            early_stop_patience=patience,
            max_iter=max_iter,
            tol=tol,
            device=device,
            dtype=torch.float64 if float64 else torch.float32,
            batch_targets=batch_targets,
            seed=seed,
            progress=progress,
        ).fit(masks, outputs)
        attributions = estimator.attributions()
        attributions.info.update(
            {
                "command": "datatrace datamodels fit",
                "subsets": subsets,
                "device": device,
                "batch_targets": batch_targets,
            }
        )
        opened.save_attributions(out_name, attributions)
        nonzero = float((estimator.weights_ != 0).mean())
        console.print(
            f"datamodels of {attributions.n_targets} targets over {attributions.n_train} "
            f"training examples from {masks.shape[0]} subsets: {nonzero:.1%} of weights nonzero, "
            f"λ chosen by {estimator.selection}, path step "
            f"{estimator.chosen_step_.mean():.1f} on average; saved as "
            f"scores/{escape(out_name)} in {escape(opened.where)}",
            highlight=False,
        )


@app.command("lds")
def lds_command(
    context: typer.Context,
    store: Annotated[str, typer.Argument(help=STORE_HELP)],
    scores: Annotated[str, typer.Option(help="Name of the saved attributions (scores/<name>).")],
    subsets: Annotated[
        str, typer.Option(help="Subset experiment held out from fitting, as ground truth.")
    ],
    bootstrap: Annotated[int, typer.Option(help="Bootstrap draws for the interval.")] = 1000,
    confidence: Annotated[float, typer.Option(help="Confidence level of the interval.")] = 0.95,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    protocol: Annotated[
        str,
        typer.Option(
            help="LDS protocol of the subsets: classic (random subsets, fresh seeds), small-drop "
            "(each subset leaves out a small fraction), or auto (the one the subset experiment "
            "records; classic for tables made without a protocol)."
        ),
    ] = "auto",
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the result and these settings to a JSON file."),
    ] = None,
) -> None:
    """Linear datamodeling score of saved attributions against a subset experiment."""
    with user_errors(context):
        opened = open_store(store)
        attributions = opened.load_attributions(scores)
        masks, outputs = read_subsets(opened, subsets)
        recorded = subsets_protocol(opened, subsets)
        if protocol not in ("auto", "classic", "small-drop"):
            raise ValueError(f"--protocol must be auto, classic or small-drop, got {protocol!r}")
        if protocol == "auto":
            protocol = recorded["protocol"]
        elif protocol != recorded["protocol"]:
            raise ValueError(
                f"--protocol {protocol}, but the subset experiment {subsets!r} was made for the "
                f"{recorded['protocol']} protocol: pass --protocol {recorded['protocol']} (or auto)"
            )
        if attributions.info.get("subsets") == subsets:
            error_console.print(
                f"warning: scores/{escape(scores)} were fit on the subsets {escape(subsets)}: "
                "this LDS is measured on training data and is optimistic",
                style="yellow",
            )
        result = linear_datamodeling_score(
            attributions,
            masks,
            outputs,
            bootstrap=bootstrap,
            confidence=confidence,
            seed=seed,
            protocol=protocol,
        )
        console.print(f"{escape(scores)}: {result}", highlight=False)
        if json_path is not None:
            settings: dict[str, Any] = {
                "command": "datatrace lds",
                "store": opened.where,
                "scores": scores,
                "subsets": subsets,
                "bootstrap": bootstrap,
                "confidence": confidence,
                "seed": seed,
                "protocol": protocol,
            }
            record = {
                "config": settings,
                "lds": result.mean,
                "ci": list(result.ci),
                "n_targets": int(result.per_target.size),
                "n_undefined": result.n_undefined,
                "n_subsets": result.n_subsets,
                "subsets_protocol": recorded,
                "per_target": [None if np.isnan(v) else float(v) for v in result.per_target],
            }
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(record, indent=2) + "\n")
