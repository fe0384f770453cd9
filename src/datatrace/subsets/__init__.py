"""Subset experiments: train many models on random (or chosen) subsets of the training set.

The engine behind datamodels, LDS ground truth and counterfactual tests::

    experiment = SubsetExperiment("run.zarr", "alpha50", n_train=1500, n_outputs=297,
                                  n_masks=1000, alpha=0.5, n_seeds=1)
    experiment.run(train, evaluate, backend="local")        # or LocalBackend(processes=2),
    results = experiment.results()                          # or RayBackend(num_gpus=1)
    results.masks, results.outputs                          # (R, n_train), (R, n_outputs)

Rows are written to the store as they finish; reruns skip finished rows, a killed run resumes,
and runners started at the same time on one store share the rows (see docs/subsets.md).
"""

from datatrace.subsets.backends import Backend, LocalBackend, RayBackend, RowJob, compute_row
from datatrace.subsets.claims import RowClaims
from datatrace.subsets.experiment import (
    DEFAULT_LEASE_S,
    SubsetExperiment,
    SubsetResults,
    list_experiments,
)
from datatrace.subsets.masks import random_masks, subset_size, train_seed, train_seeds
from datatrace.subsets.runner import RunStats, SubsetRowError

__all__ = [
    "DEFAULT_LEASE_S",
    "Backend",
    "LocalBackend",
    "RayBackend",
    "RowClaims",
    "RowJob",
    "RunStats",
    "SubsetExperiment",
    "SubsetResults",
    "SubsetRowError",
    "compute_row",
    "list_experiments",
    "random_masks",
    "subset_size",
    "train_seed",
    "train_seeds",
]
