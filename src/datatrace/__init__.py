"""datatrace: trace a model's predictions back to its training data.

The public API is listed in ``__all__``; everything else is reachable through the subpackages
(``datatrace.tasks``, ``datatrace.grads``, ``datatrace.store``, ``datatrace.subsets``,
``datatrace.diffusion``). Optional dependencies (transformers, diffusers, Ray) are imported only
by the pieces that need them.
"""

from importlib.metadata import PackageNotFoundError, version

from datatrace.attributions import Attributions, Ranking
from datatrace.baselines import GradientCosine, GradientDot, RepresentationSimilarity
from datatrace.counterfactual import (
    BrittlenessResult,
    CounterfactualResult,
    brittleness,
    counterfactual_removal,
)
from datatrace.datamodels import Datamodels
from datatrace.evaluate import LDSResult, lds, predict_outputs
from datatrace.kernel import DEFAULT_DAMPING, SingularKernelWarning
from datatrace.lasso import LassoConvergenceWarning
from datatrace.modeldiff import DirectionCheck, ModelDiff, verify_direction
from datatrace.store import Store, StoreMismatchError
from datatrace.subsets import (
    LocalBackend,
    RayBackend,
    SubsetExperiment,
    SubsetResults,
    random_masks,
)
from datatrace.tasks import (
    CausalLM,
    Classification,
    CLIPContrastive,
    CLIPNegatives,
    Diffusion,
    Seq2SeqLM,
    Task,
    TextClassification,
)
from datatrace.trak import TRAK
from datatrace.tuning import DampingSelection, select_damping
from datatrace.unlearning import (
    GradientAscentSettings,
    MatchingSettings,
    RetainFinetuneSettings,
    datamodel_matching,
    gradient_ascent,
    klom,
    oracle_matching,
    retain_finetune,
)

try:
    __version__ = version("datatrace")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_DAMPING",
    "TRAK",
    "Attributions",
    "BrittlenessResult",
    "CLIPContrastive",
    "CLIPNegatives",
    "CausalLM",
    "Classification",
    "CounterfactualResult",
    "DampingSelection",
    "Datamodels",
    "Diffusion",
    "DirectionCheck",
    "GradientAscentSettings",
    "GradientCosine",
    "GradientDot",
    "LDSResult",
    "LassoConvergenceWarning",
    "LocalBackend",
    "MatchingSettings",
    "ModelDiff",
    "Ranking",
    "RayBackend",
    "RepresentationSimilarity",
    "RetainFinetuneSettings",
    "Seq2SeqLM",
    "SingularKernelWarning",
    "Store",
    "StoreMismatchError",
    "SubsetExperiment",
    "SubsetResults",
    "Task",
    "TextClassification",
    "__version__",
    "brittleness",
    "counterfactual_removal",
    "datamodel_matching",
    "gradient_ascent",
    "klom",
    "lds",
    "oracle_matching",
    "predict_outputs",
    "random_masks",
    "retain_finetune",
    "select_damping",
    "verify_direction",
]
