"""datatrace: trace a model's predictions back to its training data.

The public API is listed in ``__all__``; everything else is reachable through the subpackages
in the order of the data flow: ``datatrace.tasks`` (what f and Q are), ``datatrace.grads``
(per-example and factorised gradients, projections), ``datatrace.store`` (the Zarr store),
``datatrace.methods`` (TRAK, influence functions, metagradients, datamodels, baselines),
``datatrace.evaluation`` (LDS, counterfactuals, tuning), ``datatrace.subsets`` (models trained on
masks, backends) and ``datatrace.applications`` (ModelDiff, unlearning, diffusion).

``import datatrace`` imports nothing heavy: each public name is imported from its module the
first time it is used (``datatrace.TRAK`` imports torch, zarr and the TRAK module then), so that
the ``datatrace`` command starts quickly and optional dependencies (transformers, diffusers, Ray,
matplotlib) are imported only by the pieces that need them.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from datatrace import _moved

try:
    __version__ = version("datatrace")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"

# Public name → the module that defines it.
_EXPORTS = {
    "DEFAULT_DAMPING": "datatrace.methods.kernel",
    "TRAK": "datatrace.methods.trak",
    "Attributions": "datatrace.attributions",
    "BrittlenessResult": "datatrace.evaluation.counterfactual",
    "CLIPContrastive": "datatrace.tasks",
    "CLIPNegatives": "datatrace.tasks",
    "CausalLM": "datatrace.tasks",
    "Classification": "datatrace.tasks",
    "CounterfactualResult": "datatrace.evaluation.counterfactual",
    "DampingSelection": "datatrace.evaluation.tuning",
    "Datamodels": "datatrace.methods.datamodels",
    "Diffusion": "datatrace.tasks",
    "DirectionCheck": "datatrace.applications.modeldiff",
    "FeaturizeChunkError": "datatrace.grads.distributed",
    "FitRunConfig": "datatrace.fit_config",
    "GradientAscentSettings": "datatrace.applications.unlearning",
    "GradientCosine": "datatrace.methods.baselines",
    "GradientDot": "datatrace.methods.baselines",
    "InfluenceFunctions": "datatrace.methods.influence",
    "LDSResult": "datatrace.evaluation.lds",
    "LassoConvergenceWarning": "datatrace.methods.lasso",
    "LocalBackend": "datatrace.subsets",
    "MatchingSettings": "datatrace.applications.unlearning",
    "Metagradients": "datatrace.methods.metagradients",
    "ModelDiff": "datatrace.applications.modeldiff",
    "Ranking": "datatrace.attributions",
    "RayBackend": "datatrace.subsets",
    "Regression": "datatrace.tasks",
    "RepresentationSimilarity": "datatrace.methods.baselines",
    "RetainFinetuneSettings": "datatrace.applications.unlearning",
    "ScoreMatrix": "datatrace.store.scores",
    "Seq2SeqLM": "datatrace.tasks",
    "SingularKernelWarning": "datatrace.methods.kernel",
    "Store": "datatrace.store",
    "StoreMismatchError": "datatrace.store",
    "SubsetExperiment": "datatrace.subsets",
    "SubsetResults": "datatrace.subsets",
    "Task": "datatrace.tasks",
    "TextClassification": "datatrace.tasks",
    "TopK": "datatrace.methods.retrieval",
    "brittleness": "datatrace.evaluation.counterfactual",
    "counterfactual_removal": "datatrace.evaluation.counterfactual",
    "datamodel_matching": "datatrace.applications.unlearning",
    "gradient_ascent": "datatrace.applications.unlearning",
    "klom": "datatrace.applications.unlearning",
    "lds": "datatrace.evaluation.lds",
    "oracle_matching": "datatrace.applications.unlearning",
    "predict_outputs": "datatrace.evaluation.lds",
    "random_masks": "datatrace.subsets",
    "retain_finetune": "datatrace.applications.unlearning",
    "select_damping": "datatrace.evaluation.tuning",
    "verify_direction": "datatrace.applications.modeldiff",
}

__all__ = [*_EXPORTS, "__version__"]

# The module paths of earlier versions (datatrace.trak, datatrace.evaluate, ...) stay importable,
# pickles made under them included, with a DeprecationWarning (datatrace/_moved.py).
_moved.install()


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (and keep it here)."""
    module = _EXPORTS.get(name)
    if module is None:
        if f"datatrace.{name}" in _moved.MOVED:  # ``import datatrace.trak; datatrace.trak``
            return sys.modules[f"datatrace.{name}"]
        raise AttributeError(f"module 'datatrace' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
