"""datatrace: trace a model's predictions back to its training data.

The public API is listed in ``__all__``; everything else is reachable through the subpackages
(``datatrace.tasks``, ``datatrace.grads``, ``datatrace.store``).
"""

from importlib.metadata import PackageNotFoundError, version

from datatrace.attributions import Attributions, Ranking
from datatrace.baselines import GradientCosine, GradientDot, RepresentationSimilarity
from datatrace.kernel import DEFAULT_DAMPING, SingularKernelWarning
from datatrace.store import Store, StoreMismatchError
from datatrace.tasks import Classification, Task
from datatrace.trak import TRAK

try:
    __version__ = version("datatrace")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_DAMPING",
    "TRAK",
    "Attributions",
    "Classification",
    "GradientCosine",
    "GradientDot",
    "Ranking",
    "RepresentationSimilarity",
    "SingularKernelWarning",
    "Store",
    "StoreMismatchError",
    "Task",
    "__version__",
]
