"""The typer application, its global options, and how user errors are shown."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from datatrace import __version__
from datatrace.store import StoreMismatchError

# Exceptions that describe a mistake in what the user asked for, not a bug: shown as a message.
USER_ERRORS = (StoreMismatchError, FileNotFoundError, NotADirectoryError, ValueError, KeyError)

app = typer.Typer(
    name="datatrace",
    help="Trace a model's predictions back to its training data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()
error_console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"datatrace {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    context: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    traceback: Annotated[
        bool, typer.Option("--traceback", help="Show the full traceback of errors.")
    ] = False,
) -> None:
    """Trace a model's predictions back to its training data."""
    context.obj = {"traceback": traceback}


@contextmanager
def user_errors(context: typer.Context) -> Iterator[None]:
    """Turn user errors into a red message and exit code 1 (unless ``--traceback``)."""
    try:
        yield
    except USER_ERRORS as error:
        if (context.obj or {}).get("traceback"):
            raise
        # str() of a KeyError quotes its message; its first argument is the message itself.
        message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        first, *details = message.splitlines() or [type(error).__name__]
        error_console.print(Text(f"error: {first}", style="bold red"), soft_wrap=True)
        for line in details:
            error_console.print(Text(line, style="red"), soft_wrap=True)
        raise typer.Exit(1) from None
