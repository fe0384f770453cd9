"""``datatrace info``: what a store holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from datatrace.cli.app import app, console, open_store, user_errors

if TYPE_CHECKING:
    from datatrace.store import Store

# Provenance values longer than this are shortened.
MAX_VALUE_CHARS = 80


@app.command()
def info(
    context: typer.Context,
    store: Annotated[str, typer.Argument(help="A datatrace store: a directory or an fsspec URL.")],
) -> None:
    """Show what a store holds: provenance, featurized checkpoints, saved scores, subsets."""
    with user_errors(context):
        opened = open_store(store)
        console.print(
            f"[bold]datatrace store[/] at {escape(opened.where)} · format "
            f"{opened.root.attrs['datatrace'].get('format')}"
        )
        for table in (
            _provenance_table(opened),
            _features_table(opened),
            _scores_table(opened),
            _subsets_table(opened),
        ):
            console.print(table)
        _warn_lost_metadata(opened, store)
        beside = Path(store).parent / "config.json"
        if "://" not in store and beside.is_file():
            console.print(f"config beside it: {escape(str(beside))}")


def _warn_lost_metadata(store: Store, given: str) -> None:
    """Say which nodes have lost their zarr.json (shown above as '?' or not at all)."""
    from datatrace.store.verify import lost_metadata_problem, lost_nodes

    lost = lost_nodes(store)
    for node, count in lost.items():
        console.print(f"[bold red]damaged[/]: {escape(node)} {lost_metadata_problem(count)}")
    if lost:
        console.print(f"`datatrace verify {escape(given)}` lists all damage and what to do")


def _provenance_table(store: Store) -> Table:
    table = Table(title="Provenance", title_justify="left")
    table.add_column("section")
    table.add_column("key")
    table.add_column("value", overflow="fold")
    # Sections are top-level groups (e.g. "features"); ask the store for each one's provenance
    # rather than reading where it happens to be kept.
    candidates = {name for name, _ in store.root.groups()}
    candidates |= {key for key in store.root.attrs["datatrace"] if key != "format"}
    for section in sorted(candidates):
        recorded = store.provenance(section)
        if not isinstance(recorded, dict):
            continue
        for position, (key, value) in enumerate(recorded.items()):
            text = value if isinstance(value, str) else json.dumps(value)
            if len(text) > MAX_VALUE_CHARS:
                text = text[: MAX_VALUE_CHARS - 1] + "…"
            table.add_row(section if position == 0 else "", key, _plain(text))
        table.add_section()
    if not table.rows:
        table.add_row("(none)", "", "")
    return table


def _features_table(store: Store) -> Table:
    names = store.groups("features")
    table = Table(title=f"Features: {len(names)} checkpoints", title_justify="left")
    for column, justify in (
        ("checkpoint", "right"),
        ("chunks done", "right"),
        ("rows", "right"),
        ("k", "right"),
        ("kernel", "left"),
        ("fingerprint", "left"),
    ):
        table.add_column(column, justify=justify)
    for name in sorted(names, key=_numeric_first):
        group = store.root[f"features/{name}"]
        done = group["done"][:] if "done" in group else []
        features = group["features"] if "features" in group else None
        complete = len(done) > 0 and bool(all(done))
        table.add_row(
            name,
            Text(f"{int(sum(done))}/{len(done)}", style="green" if complete else "yellow"),
            str(features.shape[0]) if features is not None else "?",
            str(features.shape[1]) if features is not None else "?",
            "built" if group.attrs.get("gram_complete") else "not built",
            _plain(str(dict(group.attrs.get("identity", {})).get("checkpoint", ""))),
        )
    return table


def _scores_table(store: Store) -> Table:
    names = store.groups("scores")
    table = Table(title=f"Scores: {len(names)} saved", title_justify="left")
    for column in ("name", "method", "shape (targets × train)", "state"):
        table.add_column(column)
    for name in names:
        group = store.root[f"scores/{name}"]
        shape = group["scores"].shape if "scores" in group else ()
        table.add_row(
            _plain(name),
            _plain(str(group.attrs.get("method", ""))),
            " × ".join(str(size) for size in shape),
            "complete" if group.attrs.get("complete") else Text("incomplete", style="yellow"),
        )
    return table


def _subsets_table(store: Store) -> Table:
    """One line per subset experiment: rows done, sizes, mask settings."""
    from datatrace.subsets import SubsetExperiment, list_experiments

    names = list_experiments(store)
    table = Table(title=f"Subset experiments: {len(names)}", title_justify="left")
    for column in ("name", "rows done", "n_train", "n_outputs", "seeds", "masks", "alpha"):
        table.add_column(column, justify="left" if column in ("name", "masks") else "right")
    for name in names:
        experiment = SubsetExperiment.open(store, name)
        done = experiment.completed
        recorded = experiment.provenance
        table.add_row(
            _plain(name),
            f"{int(done.sum())}/{len(done)}",
            str(recorded["n_train"]),
            str(recorded["n_outputs"]),
            str(recorded["n_seeds"]),
            _plain(str(recorded["masks"])),
            str(recorded["alpha"]),
        )
    return table


def _numeric_first(name: str) -> tuple[int, Any]:
    return (0, int(name)) if name.isdigit() else (1, name)


def _plain(text: str) -> Text:
    """Text printed as is (no rich markup: paths and values may contain brackets)."""
    return Text(str(text))
