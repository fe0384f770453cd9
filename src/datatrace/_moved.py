"""The module paths before the package took DESIGN.md's layout, kept importable.

``import datatrace.trak``, ``from datatrace.evaluate import lds`` and objects pickled under the
old paths (a fitted ``datatrace.datamodels.Datamodels``) keep working: each old path is a
stand-in module in ``sys.modules`` that imports its new module on first use, warns once with a
``DeprecationWarning`` naming the new path, and hands out the new module's own objects (so
pickled classes are the same classes). Installing the stand-ins imports nothing.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

_METHODS = (
    "trak", "kernel", "baselines", "metagradients", "training", "datamodels", "lasso",
    "incremental", "retrieval", "faiss_index",
)  # fmt: skip
_INFLUENCE = ("stages", "layers", "fisher", "curvature", "factors", "refine", "estimator")
_DIFFUSION = ("sampling", "report", "journey", "training", "data")

MOVED = {
    **{f"datatrace.{name}": f"datatrace.methods.{name}" for name in _METHODS},
    "datatrace.influence": "datatrace.methods.influence",
    **{f"datatrace.influence.{n}": f"datatrace.methods.influence.{n}" for n in _INFLUENCE},
    "datatrace.evaluate": "datatrace.evaluation.lds",
    "datatrace.counterfactual": "datatrace.evaluation.counterfactual",
    "datatrace.tuning": "datatrace.evaluation.tuning",
    "datatrace.modeldiff": "datatrace.applications.modeldiff",
    "datatrace.unlearning": "datatrace.applications.unlearning",
    "datatrace.diffusion": "datatrace.applications.diffusion",
    **{f"datatrace.diffusion.{n}": f"datatrace.applications.diffusion.{n}" for n in _DIFFUSION},
}


class _MovedModule(types.ModuleType):
    """An old module path: its attributes are the new module's, imported on first use."""

    def __init__(self, old: str, new: str):
        super().__init__(old)
        self.__dict__["_new"] = new
        # the old packages' submodules stay importable as attributes and through sys.modules
        self.__path__: list[str] = []

    def _target(self) -> types.ModuleType:
        new = self.__dict__["_new"]
        if new not in sys.modules:
            warnings.warn(
                f"{self.__name__} moved to {new}; import it from there (or use the public "
                "names of datatrace itself)",
                DeprecationWarning,
                stacklevel=3,
            )
        return importlib.import_module(new)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return getattr(self._target(), name)

    def __dir__(self) -> list[str]:
        return dir(self._target())


def install() -> None:
    """Put a stand-in for every old path into ``sys.modules`` (once; real modules win)."""
    for old, new in MOVED.items():
        sys.modules.setdefault(old, _MovedModule(old, new))
