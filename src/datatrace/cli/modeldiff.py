"""`datatrace modeldiff`: compare two learning algorithms from their saved attributions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from rich.markup import escape
from rich.table import Table

from datatrace._arguments import thread_count
from datatrace.applications.modeldiff import (
    A_VS_B,
    B_VS_A,
    OUT_TO_LOSS_SPREAD_LIMIT,
    RANK_BY,
    ModelDiff,
)
from datatrace.cli.app import app, console, open_store, user_errors

STORE_HELP = "A datatrace store holding both attributions: a directory or an fsspec URL."
DEFAULTS = ModelDiff()
# Indices listed per direction in the terminal (the report and the JSON have all top-k).
SHOWN_INDICES = 4
# --divide-out-to-loss values and the ModelDiff setting of each.
DIVIDE_OUT_TO_LOSS_CHOICES = {"auto": "auto", "on": True, "off": False}
DEFAULT_DIVIDE_OUT_TO_LOSS = next(
    name
    for name, setting in DIVIDE_OUT_TO_LOSS_CHOICES.items()
    if setting == DEFAULTS.divide_out_to_loss
)


def read_array(path: Path | None, what: str) -> np.ndarray | None:
    """A ``.npy`` file, or ``None`` without a path."""
    if path is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    if path.suffix != ".npy":
        raise ValueError(f"{what} must be a .npy file (numpy.save), got {path.name}")
    array = np.load(path, allow_pickle=False)
    if array.dtype.kind not in "biuf":
        raise ValueError(
            f"the {what} in {path} are {array.dtype} values: save numbers (integers or floats)"
        )
    return array


def read_texts(path: Path | None) -> list[str] | None:
    """Texts from a JSON list of strings or a text file with one example per line."""
    if path is None:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"no texts file at {path}")
    if path.suffix == ".json":
        try:
            texts = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} is not valid JSON ({error}): write a JSON list of strings, "
                "or use a .txt file with one example per line"
            ) from None
        if not isinstance(texts, list):
            raise ValueError(f"{path} must hold a JSON list of strings, one per example")
        return [str(text) for text in texts]
    return path.read_text().splitlines()


@app.command("modeldiff")
def modeldiff_command(
    context: typer.Context,
    store: Annotated[str, typer.Argument(help=STORE_HELP)],
    a: Annotated[
        str, typer.Option("--a", help="Saved attributions of algorithm A (scores/<name>).")
    ],
    b: Annotated[str, typer.Option("--b", help="Saved attributions of algorithm B, same shape.")],
    report: Annotated[
        Path | None, typer.Option(help="Write an HTML page of the directions to this file.")
    ] = None,
    n_components: Annotated[
        int, typer.Option(help="Directions per comparison (A vs B, B vs A).")
    ] = DEFAULTS.n_components,
    top_k: Annotated[
        int, typer.Option(help="Training examples per end, and aligned targets, per direction.")
    ] = DEFAULTS.top_k,
    rank_by: Annotated[
        str, typer.Option(help=f"Order of the directions: {' or '.join(RANK_BY)}.")
    ] = DEFAULTS.rank_by,
    divide_out_to_loss: Annotated[
        str,
        typer.Option(
            help="Compare TRAK's kernel term T instead of T ⊙ Q: on (needs TRAK attributions), "
            "off, or auto (when median/p1 of either algorithm's Q exceeds "
            f"{OUT_TO_LOSS_SPREAD_LIMIT:g}; docs/modeldiff.md).",
        ),
    ] = DEFAULT_DIVIDE_OUT_TO_LOSS,
    train_images: Annotated[
        Path | None, typer.Option(help="Training images for the report (.npy, (n_train, ...)).")
    ] = None,
    target_images: Annotated[
        Path | None, typer.Option(help="Target images for the report (.npy).")
    ] = None,
    train_texts: Annotated[
        Path | None, typer.Option(help="Training texts: JSON list or one per line.")
    ] = None,
    target_texts: Annotated[
        Path | None, typer.Option(help="Target texts: JSON list or one per line.")
    ] = None,
    train_labels: Annotated[Path | None, typer.Option(help="Training labels (.npy).")] = None,
    target_labels: Annotated[Path | None, typer.Option(help="Target labels (.npy).")] = None,
    name_a: Annotated[str, typer.Option(help="What to call algorithm A.")] = "A",
    name_b: Annotated[str, typer.Option(help="What to call algorithm B.")] = "B",
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the directions and these settings as JSON."),
    ] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: leave torch's setting).")] = 1,
) -> None:
    """Distinguishing directions between two algorithms' attributions (ModelDiff).

    Row-normalises both, takes the residuals of A against B (and B against A), runs a centred
    PCA, and lists for each direction its training examples at both ends, the targets most
    aligned with it, and the explained variance of A's and B's attributions along it.
    """
    with user_errors(context):
        thread_count(threads)
        if threads:
            torch.set_num_threads(threads)
        if divide_out_to_loss not in DIVIDE_OUT_TO_LOSS_CHOICES:
            raise ValueError(
                f"--divide-out-to-loss must be {', '.join(DIVIDE_OUT_TO_LOSS_CHOICES)}, got "
                f"{divide_out_to_loss!r}"
            )
        # The report's inputs are read first: a bad file is named before any work.
        shown = {
            "train_images": read_array(train_images, "train images"),
            "target_images": read_array(target_images, "target images"),
            "train_texts": read_texts(train_texts),
            "target_texts": read_texts(target_texts),
            "train_labels": read_array(train_labels, "train labels"),
            "target_labels": read_array(target_labels, "target labels"),
        }
        opened = open_store(store)
        attributions_a = opened.load_attributions(a)
        attributions_b = opened.load_attributions(b)
        diff = ModelDiff(
            n_components=n_components,
            top_k=top_k,
            rank_by=rank_by,
            divide_out_to_loss=DIVIDE_OUT_TO_LOSS_CHOICES[divide_out_to_loss],
        ).fit(attributions_a, attributions_b)
        if any(spread is not None for spread in diff.out_to_loss_spread_.values()):
            names = "" if (name_a, name_b) == ("A", "B") else f" (A: {name_a}, B: {name_b})"
            console.print(
                f"[yellow]note:[/] {escape(diff.out_to_loss_note_ + names)}", highlight=False
            )
        for which, title in ((A_VS_B, f"{name_a} vs {name_b}"), (B_VS_A, f"{name_b} vs {name_a}")):
            table = Table(title=escape(f"{title}: what {title.split(' vs ')[0]} uses"))
            for column in ("rank", f"var {name_a}", f"var {name_b}", "residual var"):
                table.add_column(escape(column), justify="right")
            for column in ("train (+ end)", "train (− end)", "aligned targets"):
                table.add_column(column)
            for direction in diff.directions(which):
                table.add_row(
                    str(direction.rank + 1),
                    f"{100 * direction.variance_a:.2f}%",
                    f"{100 * direction.variance_b:.2f}%",
                    f"{100 * direction.residual_variance:.1f}%",
                    _indices(direction.train_positive),
                    _indices(direction.train_negative),
                    _indices(direction.targets),
                )
            console.print(table)
        if report is not None:
            from datatrace.report.modeldiff import write_modeldiff_report

            written = write_modeldiff_report(
                report,
                diff,
                **shown,
                names=(name_a, name_b),
                n_directions=n_components,
                summary={"store": opened.where, "A scores": a, "B scores": b},
            )
            console.print(f"report: {escape(str(written))}", highlight=False)
        if json_path is not None:
            record: dict[str, Any] = {
                "config": {
                    "command": "datatrace modeldiff",
                    "store": opened.where,
                    "a": a,
                    "b": b,
                    "n_components": n_components,
                    "top_k": top_k,
                    "rank_by": rank_by,
                    "divide_out_to_loss": divide_out_to_loss,
                },
                "out_to_loss": {
                    "divided_out": diff.divided_out_to_loss_,
                    # strict JSON has no Infinity (the spread of a Q with zeros)
                    "spread": {
                        key: spread if spread is None or np.isfinite(spread) else None
                        for key, spread in diff.out_to_loss_spread_.items()
                    },
                    "note": diff.out_to_loss_note_,
                },
                "directions": diff.summary(),
            }
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(record, indent=2) + "\n")


def _indices(values: np.ndarray) -> str:
    shown = ", ".join(str(int(v)) for v in values[:SHOWN_INDICES])
    return shown + (", …" if len(values) > SHOWN_INDICES else "")
