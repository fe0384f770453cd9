"""``datatrace verify``: check every chunk of a store; ``--repair`` drops what is damaged."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from datatrace.cli.app import app, console, open_store, user_errors


@app.command()
def verify(
    context: typer.Context,
    store: Annotated[str, typer.Argument(help="A datatrace store: a directory or an fsspec URL.")],
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Drop the damaged chunks' completion marks (and what was derived from them) so "
            "that the next run recomputes only those.",
        ),
    ] = False,
) -> None:
    """Check every chunk of a store; with --repair, drop what is damaged to recompute it.

    Checks that every chunk decodes and passes its checksum, that completion marks agree with the
    chunks present, that finished features are finite, and that no group or array has lost its
    zarr.json while its chunks remain. Exit code 0 when the store is sound
    (or was repaired), 1 when damage is left (found without --repair, or damage that
    --repair cannot recompute).
    """
    from datatrace.store.verify import format_chunk, verify_store

    with user_errors(context):
        opened = open_store(store, read_only=not repair)
        report = verify_store(opened, repair=repair)
        summary = (
            f"{report.arrays} arrays, {report.chunks} chunks decoded in the store at "
            f"{escape(report.where)}"
        )
        if report.unchecksummed:
            console.print(
                f"[yellow]note:[/] {len(report.unchecksummed)} arrays were written before "
                "checksums (damage there may go unnoticed): "
                + escape(", ".join(report.unchecksummed[:5]))
                + (", ..." if len(report.unchecksummed) > 5 else "")
            )
        if report.clean:
            console.print(f"[bold green]sound[/]: {summary}")
            return
        table = Table(title=f"{len(report.problems)} problems", title_justify="left")
        table.add_column("array")
        table.add_column("chunk", justify="right")
        table.add_column("problem", overflow="fold")
        table.add_column("repaired by dropping" if report.repaired else "--repair would")
        for problem in report.problems:
            table.add_row(
                escape(problem.array),
                format_chunk(problem.chunk),
                escape(problem.problem),
                escape(problem.repair),
            )
        console.print(table)
        if report.repaired and not report.left:
            console.print(
                f"[bold yellow]repaired[/]: {summary}. Run the same fit (or subsets run) again: "
                "it recomputes only what was dropped"
            )
            return
        if report.repaired:
            console.print(
                f"[bold red]damage left[/]: {summary}. {len(report.left)} of the "
                f"{len(report.problems)} problems cannot be recomputed and were left as is; the "
                "rest were dropped"
            )
            raise typer.Exit(1)
        console.print(
            f"[bold red]damaged[/]: {summary}. `datatrace verify --repair {escape(store)}` drops "
            "what is damaged so that the next run recomputes it"
        )
        raise typer.Exit(1)
