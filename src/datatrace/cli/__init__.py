"""The ``datatrace`` command.

Every command is a serialisable config saved beside its results (``datatrace demo`` writes
``<out>/config.json``; ``datatrace demo --config <file>`` reruns it). User errors (a store of
another run, a missing path, a bad setting) print one red line and exit with code 1; pass
``--traceback`` to see where they came from.

Each command lives in its own module of this package and registers itself on :data:`app`;
importing the package imports them all.
"""

from datatrace.cli import datamodels, demo, info, modeldiff, subsets, unlearn  # noqa: F401  (each module registers its commands)
from datatrace.cli.app import app

__all__ = ["app"]
