"""`datatrace unlearn`: unlearn a forget set from a saved model; `datatrace klom`: measure it."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from rich.markup import escape
from rich.table import Table

from datatrace._arguments import positions, thread_count
from datatrace.applications.unlearning import (
    KLOM_BINS,
    KLOM_CLIP,
    KLOM_FLOOR,
    GradientAscentSettings,
    MatchingSettings,
    RetainFinetuneSettings,
    datamodel_matching,
    gradient_ascent,
    klom,
    klom_summary,
    oracle_matching,
    retain_finetune,
)
from datatrace.cli.app import app, console, open_store, user_errors
from datatrace.cli.modeldiff import read_array
from datatrace.tasks import Classification
from datatrace.tasks._checks import examples_from

# Method name on the command line → (function, settings class).
METHODS = {
    "datamodel-matching": (datamodel_matching, MatchingSettings),
    "oracle-matching": (oracle_matching, MatchingSettings),
    "gradient-ascent": (gradient_ascent, GradientAscentSettings),
    "retain-finetune": (retain_finetune, RetainFinetuneSettings),
}
DIGITS_MODEL = "datatrace.demo:make_model"


def read_margins(path: Path, what: str) -> np.ndarray:
    """``(n_models, n_points)`` margins from a ``.npy`` file, or from ``.npz`` with one array."""
    if not path.is_file():
        raise FileNotFoundError(f"no {what} margins at {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if len(archive.files) != 1:
                raise ValueError(
                    f"{path} holds {len(archive.files)} arrays ({archive.files}): save one "
                    "(n_models, n_points) array per file"
                )
            return archive[archive.files[0]]
    if path.suffix != ".npy":
        raise ValueError(f"{what} margins must be a .npy or .npz file, got {path.name}")
    return np.load(path, allow_pickle=False)


def method_settings(method: str, given: dict[str, Any]) -> Any:
    """The settings dataclass of ``method`` with the options the user gave (others: defaults)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    settings_class = METHODS[method][1]
    known = {item.name for item in fields(settings_class)}
    values = {name: value for name, value in given.items() if value is not None}
    foreign = sorted(set(values) - known)
    if foreign:
        options = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise ValueError(f"{options} does not apply to {method} (its settings: {sorted(known)})")
    settings = settings_class(**values)
    settings.check()
    return settings


def load_model(factory: str, kwargs_json: str, checkpoint: Path) -> torch.nn.Module:
    """``factory(**kwargs)`` with the state dict of ``checkpoint`` loaded into it."""
    from datatrace.grads import load_checkpoint
    from datatrace.subsets.config import load_object

    try:
        kwargs = json.loads(kwargs_json)
    except json.JSONDecodeError as error:
        raise ValueError(f"--model-kwargs is not valid JSON: {error}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON object, got {kwargs_json!r}")
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no checkpoint at {checkpoint}")
    model = load_object(factory)(**kwargs)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{factory} returned {type(model).__name__}, not a torch.nn.Module")
    model.load_state_dict(load_checkpoint(checkpoint, model, "cpu"))
    return model


@app.command("unlearn")
def unlearn_command(
    context: typer.Context,
    method: Annotated[str, typer.Argument(help=f"One of: {', '.join(METHODS)}.")],
    checkpoint: Annotated[
        Path, typer.Argument(help="State dict of the trained model (torch.save).")
    ],
    inputs: Annotated[Path, typer.Option(help="Training inputs, (n_train, ...) .npy.")],
    labels: Annotated[Path, typer.Option(help="Training labels, (n_train,) .npy.")],
    forget: Annotated[Path, typer.Option(help="Training indices to forget, (|F|,) .npy.")],
    out: Annotated[Path, typer.Option(help="Where to save the unlearned state dict (.pt).")],
    model: Annotated[
        str, typer.Option(help="Import path 'package.module:factory' of the model's class.")
    ] = DIGITS_MODEL,
    model_kwargs: Annotated[
        str, typer.Option(help='Keyword arguments of the factory as JSON (e.g. {"name": "cnn"}).')
    ] = "{}",
    store: Annotated[
        str | None, typer.Option(help="Store holding the attributions (datamodel-matching).")
    ] = None,
    attributions: Annotated[
        str | None,
        typer.Option(
            help="Saved per-class attributions (scores/<name>): (n_points · n_classes, n_train) "
            "point-major, e.g. datamodels of flattened centred logits (datamodel-matching)."
        ),
    ] = None,
    oracle_logits: Annotated[
        Path | None,
        typer.Option(help="Mean logits of retrained models, (n_points, n_classes) .npy (oracle)."),
    ] = None,
    points: Annotated[
        Path | None,
        typer.Option(help="Training indices the attributions / oracle logits explain (.npy)."),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes (default: the method's).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per step.")] = None,
    lr_decay: Annotated[
        float | None, typer.Option(help=MatchingSettings.help("lr_decay") + " (matching).")
    ] = None,
    retain_multiple: Annotated[
        float | None, typer.Option(help=MatchingSettings.help("retain_multiple") + " (matching).")
    ] = None,
    forget_repeats: Annotated[
        int | None, typer.Option(help=MatchingSettings.help("forget_repeats") + " (matching).")
    ] = None,
    weight_penalty: Annotated[
        float | None, typer.Option(help=MatchingSettings.help("weight_penalty") + " (matching).")
    ] = None,
    momentum: Annotated[
        float | None,
        typer.Option(help=GradientAscentSettings.help("momentum") + " (gradient-ascent)."),
    ] = None,
    margins: Annotated[
        Path | None,
        typer.Option(help="Also save the unlearned model's margins on the training set (.npy)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the fine-tuning.")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: leave torch's setting).")] = 1,
) -> None:
    """Unlearn a forget set from a trained classifier; saves the model and its config beside it.

    datamodel-matching fine-tunes towards f(x; θ) − Σ_{i∈F} β_i(x) (--store, --attributions);
    oracle-matching towards the mean logits of retrained models (--oracle-logits); the
    baselines need neither. The config is written to OUT with the suffix .json.
    """
    with user_errors(context):
        thread_count(threads)
        if threads:
            torch.set_num_threads(threads)
        settings = method_settings(
            method,
            {
                "epochs": epochs,
                "lr": lr,
                "batch_size": batch_size,
                "lr_decay": lr_decay,
                "retain_multiple": retain_multiple,
                "forget_repeats": forget_repeats,
                "weight_penalty": weight_penalty,
                "momentum": momentum,
            },
        )
        train_data = (
            torch.as_tensor(read_array(inputs, "inputs")),
            torch.as_tensor(read_array(labels, "labels")),
        )
        n_train = len(train_data[0])
        forget_indices = positions(read_array(forget, "forget indices"), n_train, "--forget")
        point_indices = read_array(points, "points")
        if point_indices is not None:
            point_indices = positions(point_indices, n_train, "--points")
        trained = load_model(model, model_kwargs, checkpoint)
        # Labels of the wrong shape, range or type get a clear error before any training.
        with examples_from(0):
            train_data = Classification().check_batch(trained, train_data)
        function = METHODS[method][0]
        extra: tuple[Any, ...] = ()
        keywords: dict[str, Any] = {}
        if method == "datamodel-matching":
            if store is None or attributions is None:
                raise ValueError("datamodel-matching needs --store and --attributions")
            extra = (open_store(store).load_attributions(attributions),)
            keywords["points"] = point_indices
        elif method == "oracle-matching":
            if oracle_logits is None:
                raise ValueError("oracle-matching needs --oracle-logits")
            extra = (read_array(oracle_logits, "oracle logits"),)
            keywords["points"] = point_indices
        elif store or attributions or oracle_logits or points:
            raise ValueError(
                f"{method} uses no attributions, oracle logits or points: leave those out"
            )
        started = time.perf_counter()
        unlearned = function(
            trained, forget_indices, train_data, *extra, settings=settings, seed=seed, **keywords
        )
        seconds = time.perf_counter() - started
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(unlearned.state_dict(), out)
        if margins is not None:
            from datatrace.applications.unlearning import model_logits
            from datatrace.tasks import classification_margin

            values = classification_margin(
                model_logits(unlearned, train_data[0]), train_data[1].long()
            )
            margins.parent.mkdir(parents=True, exist_ok=True)
            np.save(margins, values.numpy())
        config = {
            "command": "datatrace unlearn",
            "method": method,
            "checkpoint": str(checkpoint),
            "model": model,
            "model_kwargs": json.loads(model_kwargs),
            "inputs": str(inputs),
            "labels": str(labels),
            "forget": str(forget),
            "store": store,
            "attributions": attributions,
            "oracle_logits": None if oracle_logits is None else str(oracle_logits),
            "points": None if points is None else str(points),
            "settings": asdict(settings),
            "seed": seed,
            "seconds": seconds,
        }
        out.with_suffix(".json").write_text(json.dumps(config, indent=2) + "\n")
        console.print(
            f"{method}: forgot {len(forget_indices)} examples in {seconds:.2f} s; "
            f"saved {escape(str(out))}",
            highlight=False,
        )


def parse_group(spec: str) -> tuple[str, Path]:
    name, equals, file = spec.partition("=")
    if not equals or not name or not file:
        raise ValueError(f"--group takes NAME=FILE.npy (indices of points), got {spec!r}")
    return name, Path(file)


@app.command("klom")
def klom_command(
    context: typer.Context,
    unlearned: Annotated[
        Path, typer.Argument(help="Margins of unlearned models, (n_models, n_points) .npy.")
    ],
    oracle: Annotated[
        Path, typer.Argument(help="Margins of models retrained without the forget set, .npy.")
    ],
    group: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=FILE.npy: report the points whose indices FILE holds under NAME "
            "(repeat, e.g. --group forget=forget.npy --group validation=val.npy)."
        ),
    ] = None,
    bins: Annotated[int, typer.Option(help="Histogram bins over both sets.")] = KLOM_BINS,
    clip: Annotated[float, typer.Option(help="Margins are clipped to ±clip.")] = KLOM_CLIP,
    floor: Annotated[float, typer.Option(help="Probability of empty oracle bins.")] = KLOM_FLOOR,
    per_point: Annotated[
        Path | None, typer.Option(help="Also save every point's KLoM to this .npy file.")
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the summary and settings as JSON.")
    ] = None,
) -> None:
    """KLoM: per point, KL(unlearned ‖ retrained) of the distribution of margins over models.

    Prints the median, 95th percentile and mean over all points and over each --group.
    """
    with user_errors(context):
        values = klom(
            read_margins(unlearned, "unlearned"),
            read_margins(oracle, "oracle"),
            bins=bins,
            clip=clip,
            floor=floor,
        )
        groups = {"all points": np.arange(len(values))}
        for spec in group or []:
            name, file = parse_group(spec)
            indices = np.asarray(read_margins(file, f"group {name!r}"), dtype=np.int64).ravel()
            if indices.size == 0 or indices.min() < 0 or indices.max() >= len(values):
                raise ValueError(
                    f"group {name!r} must hold indices of points in [0, {len(values)}) "
                    f"(from {file})"
                )
            groups[name] = indices
        table = Table(title="KLoM = KL(unlearned ‖ retrained), nats")
        for column in ("points", "n", "median", "95th pct", "mean"):
            table.add_column(column, justify="left" if column == "points" else "right")
        summaries = {}
        for name, indices in groups.items():
            summary = klom_summary(values[indices])
            summaries[name] = {"n": int(indices.size), **summary}
            table.add_row(
                escape(name),
                str(indices.size),
                f"{summary['median']:.4f}",
                f"{summary['p95']:.4f}",
                f"{summary['mean']:.4f}",
            )
        console.print(table)
        if per_point is not None:
            per_point.parent.mkdir(parents=True, exist_ok=True)
            np.save(per_point, values)
        if json_path is not None:
            record = {
                "config": {
                    "command": "datatrace klom",
                    "unlearned": str(unlearned),
                    "oracle": str(oracle),
                    "groups": group or [],
                    "bins": bins,
                    "clip": clip,
                    "floor": floor,
                    "direction": "KL(unlearned || oracle)",
                },
                "summary": summaries,
            }
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(record, indent=2) + "\n")
