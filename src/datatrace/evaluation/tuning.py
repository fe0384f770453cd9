"""Choosing TRAK's damping by LDS against models trained on held-out subsets."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from datatrace._subset_data import subset_data
from datatrace.evaluation.lds import LDSResult, check_bootstrap, lds
from datatrace.grads.checkpoints import Checkpoint
from datatrace.methods.kernel import SingularKernelWarning
from datatrace.methods.trak import TRAK
from datatrace.progress import progress_bar

# Relative dampings (multiples of the mean diagonal of ΦᵀΦ) tried by default: half-decades over
# the range where the best damping of every family of docs/trak.md's study lies, but the lightest.
DEFAULT_DAMPING_GRID = (0.001, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass(frozen=True)
class DampingSelection:
    """LDS of TRAK at each damping of a grid.

    Attributes:
        grid: ``(n_grid,)`` relative dampings tried (``damping`` of :class:`~datatrace.TRAK`).
        lds: ``(n_grid,)`` mean LDS at each damping.
        ci: ``(n_grid, 2)`` bootstrap interval of each mean (over targets).
        results: the full :class:`~datatrace.evaluation.lds.LDSResult` of each damping.
        best: the damping with the highest mean LDS.
    """

    grid: np.ndarray
    lds: np.ndarray
    ci: np.ndarray
    results: list[LDSResult]
    best: float

    def table(self) -> list[dict[str, float]]:
        """One row per damping: ``{"damping", "lds", "ci_low", "ci_high"}``."""
        return [
            {"damping": float(d), "lds": float(v), "ci_low": float(lo), "ci_high": float(hi)}
            for d, v, (lo, hi) in zip(self.grid, self.lds, self.ci)
        ]


def select_damping(
    trak: TRAK,
    train_data: Any,
    targets: Any,
    masks: Any,
    outputs: Any = None,
    *,
    checkpoints: Sequence[Checkpoint] | Checkpoint | None = None,
    grid: Sequence[float] = DEFAULT_DAMPING_GRID,
    bootstrap: int = 1000,
    seed: int = 0,
) -> DampingSelection:
    """LDS of TRAK at each relative damping of ``grid``, and the best one.

    The training features are computed once (or read from ``trak``'s store, where a fitted
    estimator keeps them); for each damping only the kernels ``ΦᵀΦ + λI`` are rebuilt from the
    stored ``ΦᵀΦ`` and the targets scored. The subsets must be held out from whatever the chosen
    damping is later evaluated on, or the evaluation is optimistic.

    Args:
        trak: a :class:`~datatrace.TRAK` estimator, fitted or not (if not, it is fitted here on
            ``train_data`` and ``checkpoints``); its other settings are kept.
        train_data: the training set it was (or is to be) fitted on.
        targets: the target examples whose outputs ``outputs`` holds, in the same order.
        masks: ``(n_subsets, n_train)`` masks of the held-out subsets, or an object with
            ``.masks`` and ``.outputs``.
        outputs: ``(n_subsets, n_targets)`` outputs of models trained on those subsets.
        checkpoints: the checkpoints (default: those ``trak`` was fitted with).
        grid: relative dampings to try.
        bootstrap: bootstrap draws of each LDS interval.
        seed: seed of the bootstraps.

    Returns:
        :class:`DampingSelection`; ``trak`` itself is not changed (except fitted, if it was not).
    """
    mask_array, output_array = subset_data(masks, outputs)
    check_bootstrap(bootstrap)
    try:
        grid_array = np.asarray(grid, dtype=np.float64)
    except (TypeError, ValueError):
        grid_array = np.array([np.nan])  # refused below, naming the grid
    if grid_array.ndim != 1 or grid_array.size == 0 or not (grid_array >= 0).all():
        raise ValueError(f"grid must be a non-empty list of non-negative dampings, got {grid}")
    if not hasattr(trak, "store_"):
        trak.fit(train_data, checkpoints)
        if not hasattr(trak, "store_"):
            raise ValueError("fitting TRAK did not finish (a shard is missing): fit it first")
    checkpoints = trak.checkpoints_ if checkpoints is None else checkpoints
    results = []
    with progress_bar(len(grid_array), "damping", trak.progress) as advance:
        for damping in grid_array:
            candidate = copy.copy(trak)
            # The fitted store holds the features and ΦᵀΦ, so fit() only rebuilds the kernels.
            candidate.store = trak.store_
            candidate.damping = float(damping)
            candidate.damping_absolute = None
            with warnings.catch_warnings():
                # k ≥ n is warned about when trak is fitted; the advice is what happens here.
                warnings.simplefilter("ignore", SingularKernelWarning)
                candidate.fit(train_data, checkpoints)
            scores = candidate.score(targets)
            results.append(lds(scores, mask_array, output_array, bootstrap=bootstrap, seed=seed))
            advance(1)
    means = np.array([result.mean for result in results])
    if np.isnan(means).all():
        raise ValueError(
            "the LDS is undefined at every damping (constant outputs or predictions): check "
            "that the outputs vary across subsets"
        )
    return DampingSelection(
        grid=grid_array,
        lds=means,
        ci=np.array([result.ci for result in results]),
        results=results,
        best=float(grid_array[int(np.nanargmax(means))]),
    )
