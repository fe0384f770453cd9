"""Starting up: `import datatrace` and `datatrace --help` import nothing heavy, the command table
of `datatrace --help` matches the commands, and every public name resolves."""

import importlib
import inspect
import json
import pkgutil
import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

import datatrace
import datatrace.cli
from datatrace.cli import COMMANDS, app
from datatrace.cli.app import NOT_COMMANDS

# Packages that take long to import, or are optional extras: imported where they are used.
HEAVY = (
    "torch", "zarr", "numpy", "scipy", "sklearn", "pandas", "fsspec", "PIL",
    "transformers", "diffusers", "ray", "matplotlib",
)  # fmt: skip
LOADED = f"sorted({{name.split('.')[0] for name in sys.modules}} & set({HEAVY!r}))"

PROBES = {
    "import datatrace": "import datatrace",
    # as the console script runs it: typer's app() on sys.argv, which exits
    "datatrace --help": (
        "from datatrace.cli import app\n"
        "sys.argv = ['datatrace', '--help']\n"
        "try:\n    app()\nexcept SystemExit as stop:\n    assert stop.code == 0, stop.code\n"
    ),
    "datatrace --version": (
        "from datatrace.cli import app\n"
        "sys.argv = ['datatrace', '--version']\n"
        "try:\n    app()\nexcept SystemExit as stop:\n    assert stop.code == 0, stop.code\n"
    ),
}


@pytest.mark.parametrize("probe", PROBES)
def test_starting_imports_nothing_heavy(probe):
    code = f"import sys, json\n{PROBES[probe]}\nprint('loaded:', json.dumps({LOADED}))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout.rsplit("loaded:", 1)[1])
    assert loaded == [], f"`{probe}` imported {loaded}: import them where they are used"
    if probe == "datatrace --help":
        for name in COMMANDS:  # listed from the table, without importing the commands
            assert f" {name} " in run.stdout, run.stdout


def registered() -> dict:
    """Every command registered on the app, after importing every command module."""
    for module, _ in COMMANDS.values():
        importlib.import_module(module)
    return typer.main.get_group(app).commands


def first_line(text: str | None) -> str:
    return (inspect.cleandoc(text or "").splitlines() or [""])[0]


def test_every_command_module_is_in_the_table():
    """A module missing from COMMANDS would be imported on every start."""
    listed = {module for module, _ in COMMANDS.values()}
    modules = {
        f"datatrace.cli.{info.name}"
        for info in pkgutil.iter_modules(datatrace.cli.__path__)
        if info.name not in NOT_COMMANDS
    }
    assert modules == listed


def test_the_command_table_matches_the_commands():
    commands = registered()
    assert set(commands) == set(COMMANDS)
    for name, (module, short_help) in COMMANDS.items():
        command = commands[name]
        if command.callback is not None:  # a command: its docstring
            assert command.callback.__module__ == module, name
            assert short_help == first_line(command.callback.__doc__), name
        else:  # a group: its subcommands live in the module
            assert {sub.callback.__module__ for sub in command.commands.values()} == {module}
        assert short_help == first_line(command.help), name  # the command's or group's help


@pytest.mark.parametrize("name", COMMANDS)
def test_each_commands_own_help_loads_it(name):
    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert COMMANDS[name][1] in result.output


def test_every_public_name_resolves_and_is_listed_by_dir():
    for name in datatrace.__all__:
        assert getattr(datatrace, name) is not None, name
    assert set(datatrace.__all__) <= set(dir(datatrace))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        datatrace.Nope
