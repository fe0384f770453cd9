"""The typer application, its global options, how user errors are shown, and lazy commands.

Starting the command must be quick (``datatrace --help``, ``datatrace --version``), but the
commands need torch, zarr and the rest of the library. So the top-level group knows each command
by name, module and one-line help (:data:`datatrace.cli.COMMANDS`), lists them from that table,
and imports a command's module, whose decorators register it on :data:`app`, only when that
command is run (or its own ``--help`` shown).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer
import typer.main
from rich.console import Console
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from datatrace import __version__

if TYPE_CHECKING:
    import click

    from datatrace.store import Store

# Exceptions that describe a mistake in what the user asked for, not a bug: shown as a message.
# A StoreMismatchError is a ValueError (imported here, it would load zarr on every start).
# TypeError: the data has the wrong type (Task.check_batch); --traceback shows where it came from.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, KeyError, TypeError)
# Modules of this package that register no command.
NOT_COMMANDS = ("app",)


class LazyCommands(TyperGroup):
    """The top-level group: commands listed from :data:`datatrace.cli.COMMANDS` without
    importing them; a command's module is imported when the command is resolved.

    A module of ``datatrace.cli`` missing from the table still works: it is imported (and its
    commands listed) whenever the table does not name the command asked for.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        from datatrace.cli import COMMANDS

        self._load_unlisted()
        return sorted(set(COMMANDS) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command if its module is loaded, else a stand-in with its one-line help (what
        listing needs); :meth:`resolve_command` loads the real one before it runs."""
        from datatrace.cli import COMMANDS

        if cmd_name in self.commands:
            return self.commands[cmd_name]
        if cmd_name in COMMANDS:
            _, short_help = COMMANDS[cmd_name]
            return TyperCommand(name=cmd_name, help=short_help, short_help=short_help)
        return None

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args:
            self.load(args[0])
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            reflow_help(command)  # also those registered before this group was built
        return name, command, rest

    def load(self, name: str) -> None:
        """Import the module of command ``name`` and add its commands to the group."""
        from datatrace.cli import COMMANDS

        if name in self.commands:
            return
        if name in COMMANDS:
            importlib.import_module(COMMANDS[name][0])
        else:
            self._load_unlisted()
        self._add_registered()

    def _load_unlisted(self) -> None:
        import datatrace.cli
        from datatrace.cli import COMMANDS

        listed = {module.rpartition(".")[2] for module, _ in COMMANDS.values()}
        found = [info.name for info in pkgutil.iter_modules(datatrace.cli.__path__)]
        unlisted = [name for name in found if name not in listed and name not in NOT_COMMANDS]
        for module in unlisted:
            importlib.import_module(f"datatrace.cli.{module}")
        if unlisted:
            self._add_registered()

    def _add_registered(self) -> None:
        # Typer builds click commands from what is registered on the app; build them again and
        # keep the ones this group does not have yet.
        for name, command in typer.main.get_group(app).commands.items():
            self.commands.setdefault(name, command)


# A line of a docstring that starts an item of a list (kept on its own line when reflowing).
LIST_ITEM = re.compile(r"^([-*•]|\d+[.)])\s")


def reflowed(text: str | None) -> str | None:
    """``text`` with each paragraph (and each list item) on one line.

    Typer keeps a docstring's line breaks, and rich then wraps each of those lines to the
    terminal on its own: at 80 columns every line of a 95-character docstring broke in two,
    leaving a short stub. As single lines, rich wraps each paragraph to the width it has.
    """
    if not text:
        return text
    paragraphs = []
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        lines: list[str] = []
        for line in paragraph.splitlines():
            line = line.strip()
            if lines and not LIST_ITEM.match(line):
                lines[-1] += " " + line
            else:
                lines.append(line)
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def reflow_help(command: click.Command) -> None:
    """Reflow the help of ``command`` and, for a group, of its subcommands (:func:`reflowed`)."""
    command.help = reflowed(command.help)
    for subcommand in getattr(command, "commands", {}).values():
        reflow_help(subcommand)


app = typer.Typer(
    name="datatrace",
    cls=LazyCommands,
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


def open_store(location: str, *, read_only: bool = True) -> Store:
    """A store that must exist (read-only unless asked): a missing one is the user error
    ``no datatrace store at LOCATION``, and nothing is created there."""
    from datatrace._estimator import open_existing_store

    return open_existing_store(location, read_only=read_only)
