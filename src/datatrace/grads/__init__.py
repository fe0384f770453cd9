"""Per-example gradients, parameter selection, random projections and featurization."""

from datatrace.grads.checkpoints import Checkpoint, load_checkpoint
from datatrace.grads.featurize import GradientFeatures
from datatrace.grads.per_example import PerExampleGradients
from datatrace.grads.projectors import (
    DenseProjector,
    IdentityProjector,
    Projector,
    SparseJLProjector,
    make_projector,
)
from datatrace.grads.selection import ParamSelection, last_blocks, select_parameters

__all__ = [
    "Checkpoint",
    "DenseProjector",
    "GradientFeatures",
    "IdentityProjector",
    "ParamSelection",
    "PerExampleGradients",
    "Projector",
    "SparseJLProjector",
    "last_blocks",
    "load_checkpoint",
    "make_projector",
    "select_parameters",
]
