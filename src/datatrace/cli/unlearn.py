"""`datatrace klom`: KLoM from saved margins of unlearned and retrained models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from datatrace.cli.app import app, console, user_errors
from datatrace.unlearning import KLOM_BINS, KLOM_CLIP, KLOM_FLOOR, klom, klom_summary


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
