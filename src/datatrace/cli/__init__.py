"""The ``datatrace`` command.

Every command is a serialisable config saved beside its results (``datatrace demo`` writes
``<out>/config.json``; ``datatrace demo --config <file>`` reruns it). User errors (a store of
another run, a missing path, a bad setting) print one red line and exit with code 1; pass
``--traceback`` to see where they came from.

Each command lives in its own module of this package and registers itself on :data:`app` with
typer's decorators. :data:`COMMANDS` names the module and the one-line help of each, so that
``datatrace --help`` lists them without importing any (they import torch and the library); a
module is imported when its command runs. To add a command, add its module here (a module left
out still works, but is imported on every start).
"""

from datatrace.cli.app import app

# Command name → (module that registers it, its one-line help as ``datatrace --help`` shows it:
# the first line of the command's docstring, or of its group's help).
COMMANDS: dict[str, tuple[str, str]] = {
    "datamodels": (
        "datatrace.cli.datamodels",
        "Datamodels: sparse linear models of each target's output on subset masks.",
    ),
    "demo": (
        "datatrace.cli.demo",
        "Train small digit classifiers, attribute their test predictions with TRAK, report.",
    ),
    "fit": (
        "datatrace.cli.fit",
        "Featurize a training set into a store and build TRAK's kernels, from a run config.",
    ),
    "info": (
        "datatrace.cli.info",
        "Show what a store holds: provenance, featurized checkpoints, saved scores, subsets.",
    ),
    "klom": (
        "datatrace.cli.unlearn",
        "KLoM: per point, KL(unlearned ‖ retrained) of the distribution of margins over models.",
    ),
    "lds": (
        "datatrace.cli.datamodels",
        "Linear datamodeling score of saved attributions against a subset experiment.",
    ),
    "modeldiff": (
        "datatrace.cli.modeldiff",
        "Distinguishing directions between two algorithms' attributions (ModelDiff).",
    ),
    "subsets": (
        "datatrace.cli.subsets",
        "Subset experiments: train models on random subsets of the training set.",
    ),
    "verify": (
        "datatrace.cli.verify",
        "Check every chunk of a store; with --repair, drop what is damaged to recompute it.",
    ),
    "unlearn": (
        "datatrace.cli.unlearn",
        "Unlearn a forget set from a trained classifier; saves the model and its config beside it.",
    ),
}

__all__ = ["COMMANDS", "app"]
