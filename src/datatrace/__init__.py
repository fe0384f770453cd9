"""datatrace: trace a model's predictions back to its training data.

The public API is listed in ``__all__``; everything else is reachable through the subpackages
(``datatrace.tasks``, ``datatrace.grads``, ``datatrace.store``, ``datatrace.subsets``,
``datatrace.diffusion``).

``import datatrace`` imports nothing heavy: each public name is imported from its module the
first time it is used (``datatrace.TRAK`` imports torch, zarr and the TRAK module then), so that
the ``datatrace`` command starts quickly and optional dependencies (transformers, diffusers, Ray,
matplotlib) are imported only by the pieces that need them.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("datatrace")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"

# Public name → the module that defines it.
_EXPORTS = {
    "DEFAULT_DAMPING": "datatrace.kernel",
    "TRAK": "datatrace.trak",
    "Attributions": "datatrace.attributions",
    "BrittlenessResult": "datatrace.counterfactual",
    "CLIPContrastive": "datatrace.tasks",
    "CLIPNegatives": "datatrace.tasks",
    "CausalLM": "datatrace.tasks",
    "Classification": "datatrace.tasks",
    "CounterfactualResult": "datatrace.counterfactual",
    "DampingSelection": "datatrace.tuning",
    "Datamodels": "datatrace.datamodels",
    "Diffusion": "datatrace.tasks",
    "DirectionCheck": "datatrace.modeldiff",
    "FeaturizeChunkError": "datatrace.grads.distributed",
    "FitRunConfig": "datatrace.fit_config",
    "GradientAscentSettings": "datatrace.unlearning",
    "GradientCosine": "datatrace.baselines",
    "GradientDot": "datatrace.baselines",
    "InfluenceFunctions": "datatrace.influence",
    "LDSResult": "datatrace.evaluate",
    "LassoConvergenceWarning": "datatrace.lasso",
    "LocalBackend": "datatrace.subsets",
    "MatchingSettings": "datatrace.unlearning",
    "Metagradients": "datatrace.metagradients",
    "ModelDiff": "datatrace.modeldiff",
    "Ranking": "datatrace.attributions",
    "RayBackend": "datatrace.subsets",
    "RepresentationSimilarity": "datatrace.baselines",
    "RetainFinetuneSettings": "datatrace.unlearning",
    "ScoreMatrix": "datatrace.store.scores",
    "Seq2SeqLM": "datatrace.tasks",
    "SingularKernelWarning": "datatrace.kernel",
    "Store": "datatrace.store",
    "StoreMismatchError": "datatrace.store",
    "SubsetExperiment": "datatrace.subsets",
    "SubsetResults": "datatrace.subsets",
    "Task": "datatrace.tasks",
    "TextClassification": "datatrace.tasks",
    "TopK": "datatrace.retrieval",
    "brittleness": "datatrace.counterfactual",
    "counterfactual_removal": "datatrace.counterfactual",
    "datamodel_matching": "datatrace.unlearning",
    "gradient_ascent": "datatrace.unlearning",
    "klom": "datatrace.unlearning",
    "lds": "datatrace.evaluate",
    "oracle_matching": "datatrace.unlearning",
    "predict_outputs": "datatrace.evaluate",
    "random_masks": "datatrace.subsets",
    "retain_finetune": "datatrace.unlearning",
    "select_damping": "datatrace.tuning",
    "verify_direction": "datatrace.modeldiff",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (and keep it here)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'datatrace' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
