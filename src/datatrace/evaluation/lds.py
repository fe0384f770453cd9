"""The linear datamodeling score (LDS): how well attributions predict retrained models' outputs.

For held-out subsets ``S_1..S_R`` of the training set (random masks not used to fit anything)
and the outputs ``y_rj`` of models trained on each subset, attributions ``τ`` predict
``ŷ_rj = Σ_{i ∈ S_r} τ_ji`` (``masks @ τᵀ``, plus the bias of datamodels, which does not change
ranks). The LDS of target ``j`` is the Spearman rank correlation over subsets between ``ŷ_·j`` and
``y_·j``; the LDS of a method is its mean over targets (Park et al. 2023, TRAK, section 2).

Two protocols produce the subsets, and their figures are not comparable (docs/evaluation.md):
the *classic* one (random subsets of a fraction ``alpha``, typically halves, each model trained
with a fresh seed; TRAK, datamodels) and the *small-drop* one (each subset leaves out a small
fraction, default 1%, and every model is trained with the same seed and the full run's data
order, or across seeds; MAGIC, Bergson). :func:`lds` scores both the same way, with the same
bootstrap interval; ``protocol="small-drop"`` checks that the masks are small drops and says so in
the result.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from datatrace._arguments import non_negative_integer
from datatrace._subset_data import subset_data
from datatrace.attributions import Attributions

# Bootstrap draws of target means held in memory at once (numbers, ~80 MB of float64).
BOOTSTRAP_BLOCK_ELEMENTS = 10_000_000
PROTOCOLS = ("classic", "small-drop")
# Masks that leave out more than this fraction of the training set are not small drops: the
# linear prediction of a small drop is what the protocol tests.
MAX_SMALL_DROP_FRACTION = 0.1


@dataclass(frozen=True)
class LDSResult:
    """The LDS of one set of attributions.

    Attributes:
        mean: mean over targets of the per-target Spearman correlations (NaN ones left out).
        per_target: ``(n_targets,)`` Spearman correlation of each target; 0 where the
            predictions are constant over the evaluation subsets (they predict nothing), NaN
            where the outputs are (the rank correlation is undefined there).
        ci: ``(low, high)`` bootstrap percentile interval of ``mean`` over targets.
        confidence: the confidence level of ``ci``.
        n_subsets: evaluation subsets used.
        protocol: the protocol the subsets were checked against (``None``: not stated).
        drop_fraction: small-drop protocol: the mean fraction of training examples the subsets
            leave out.
    """

    mean: float
    per_target: np.ndarray
    ci: tuple[float, float]
    confidence: float
    n_subsets: int
    protocol: str | None = None
    drop_fraction: float | None = None

    @property
    def n_undefined(self) -> int:
        """Targets whose correlation is undefined (constant outputs)."""
        return int(np.isnan(self.per_target).sum())

    def __str__(self) -> str:
        low, high = self.ci
        defined = self.per_target.size - self.n_undefined
        protocol = ""
        if self.protocol == "small-drop":
            protocol = f", small-drop protocol, {self.drop_fraction:.1%} dropped"
        elif self.protocol is not None:
            protocol = f", {self.protocol} protocol"
        return (
            f"LDS {self.mean:.3f} ({self.confidence:.0%} CI {low:.3f} to {high:.3f}; "
            f"{defined} targets, {self.n_subsets} subsets{protocol})"
        )


def score_matrix(attributions: Any) -> np.ndarray:
    """The ``(n_targets, n_train)`` scores of an :class:`~datatrace.Attributions`, of a fitted
    estimator with ``attributions()`` (e.g. :class:`~datatrace.methods.datamodels.Datamodels`),
    or of an array."""
    if hasattr(attributions, "attributions") and callable(attributions.attributions):
        attributions = attributions.attributions()
    if isinstance(attributions, Attributions):
        scores = attributions.scores
    else:
        if hasattr(attributions, "detach"):  # a torch tensor
            attributions = attributions.detach().cpu().numpy()
        scores = np.asarray(attributions)
    if scores.ndim != 2:
        raise ValueError(
            f"scores must be a (n_targets, n_train) matrix or Attributions, got shape "
            f"{scores.shape}"
        )
    if scores.dtype.kind not in "biuf":
        raise TypeError(f"scores must be numbers, got an array of {scores.dtype}")
    bad = np.flatnonzero(~np.isfinite(scores).all(axis=1))
    if bad.size:
        raise ValueError(
            f"the scores of {bad.size} target(s) hold NaN or infinite values (rows "
            f"{bad[:10].tolist()}{'...' if bad.size > 10 else ''}): such scores predict nothing "
            "(a rank correlation would silently rank NaN as a value); drop or fix those targets"
        )
    return scores


def predict_outputs(attributions: Any, masks: Any) -> np.ndarray:
    """Outputs predicted by attributions for models trained on each subset.

    ``masks @ scoresᵀ`` plus, for attributions that carry one (datamodels), the bias
    ``info["bias"]``.

    Args:
        attributions: :class:`~datatrace.Attributions` ``(n_targets, n_train)`` (or an array, or a
            fitted estimator with ``attributions()``).
        masks: ``(n_subsets, n_train)`` bool or 0/1.

    Returns:
        ``(n_subsets, n_targets)`` float64.
    """
    scores = score_matrix(attributions)
    mask_array, _ = subset_data(masks, np.zeros(np.shape(masks)[0]))
    _check_train_size(scores, mask_array)
    predictions = mask_array.astype(np.float64) @ scores.T.astype(np.float64)
    if isinstance(attributions, Attributions) and "bias" in attributions.info:
        predictions += np.asarray(attributions.info["bias"], dtype=np.float64)
    return predictions


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks (1 = smallest) of each column, ties given their average rank, float64.

    Args:
        values: ``(n, m)``.

    Returns:
        ``(n, m)``.
    """
    n, m = values.shape
    order = np.argsort(values, axis=0, kind="stable")
    ordered = np.take_along_axis(values, order, axis=0)
    # A tie group starts where a sorted value differs from the one before it; number the groups
    # across all columns at once so that one bincount sizes them all.
    starts = np.ones((n, m), dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    group = np.cumsum(starts.T.ravel()) - 1  # column-major: each column's groups in turn
    sizes = np.bincount(group)
    first = np.flatnonzero(starts.T.ravel())  # flat position of each group's first element
    position_in_column = first % n
    group_rank = position_in_column + (sizes + 1) / 2  # average of ranks first+1 .. first+size
    sorted_ranks = group_rank[group].reshape(m, n).T
    ranks = np.empty((n, m))
    np.put_along_axis(ranks, order, sorted_ranks, axis=0)
    return ranks


def column_spearman(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``first`` with the same column of ``second``.

    Args:
        first, second: ``(n, m)``.

    Returns:
        ``(m,)``; NaN for columns where either input is constant.
    """
    ranks_a = average_ranks(first)
    ranks_b = average_ranks(second)
    ranks_a -= ranks_a.mean(0)
    ranks_b -= ranks_b.mean(0)
    numerator = (ranks_a * ranks_b).sum(0)
    denominator = np.sqrt((ranks_a**2).sum(0) * (ranks_b**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = numerator / denominator
    correlation[denominator == 0] = np.nan
    return np.clip(correlation, -1.0, 1.0)


def check_bootstrap(bootstrap: Any) -> None:
    """Refuse a number of bootstrap draws that is not a non-negative integer."""
    non_negative_integer("bootstrap", bootstrap, " (0: no interval)")


def bootstrap_mean_ci(
    values: np.ndarray, *, draws: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    if values.size == 0:
        return (float("nan"), float("nan"))
    if draws < 1:
        return (float(values.mean()), float(values.mean()))
    generator = np.random.default_rng(seed)
    block = max(1, BOOTSTRAP_BLOCK_ELEMENTS // values.size)
    means = []
    for start in range(0, draws, block):
        size = min(block, draws - start)
        means.append(values[generator.integers(0, values.size, (size, values.size))].mean(1))
    tail = (1 - confidence) / 2
    low, high = np.quantile(np.concatenate(means), [tail, 1 - tail])
    return (float(low), float(high))


def lds(
    attributions: Any,
    masks: Any,
    outputs: Any = None,
    *,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    protocol: str | None = None,
) -> LDSResult:
    """Linear datamodeling score of attributions against models trained on held-out subsets.

    Per target ``j``: Spearman correlation over subsets ``r`` between the predicted output
    ``Σ_{i∈S_r} τ_ji`` and the measured output ``y_rj`` (averaged over training seeds when
    several are given). Computed for all targets at once: predictions ``masks @ τᵀ``, column
    ranks with ties averaged, and Pearson correlation of the ranks, column by column.

    A target whose predictions are constant over the subsets (e.g. a datamodel with no nonzero
    weight) while its outputs vary predicts nothing: its ``per_target`` value is 0 and it counts
    in the mean (leaving it out would reward a method for giving up on hard targets). A target
    whose outputs are constant has no rank correlation with anything: its value is NaN and it is
    left out of the mean and of the bootstrap. The confidence interval resamples *targets* with
    replacement (the evaluation subsets and models stay fixed): it says how much the mean
    depends on which targets were picked, not how it would change with other evaluation subsets
    or retraining seeds.

    Args:
        attributions: :class:`~datatrace.Attributions` ``(n_targets, n_train)``, an array of that
            shape, or a fitted estimator with ``attributions()``.
        masks: ``(n_subsets, n_train)`` bool or 0/1 masks of held-out subsets, or an object with
            ``.masks`` and ``.outputs`` (e.g. ``SubsetExperiment(...).results()``).
        outputs: ``(n_subsets, n_targets)``, or ``(n_subsets, n_seeds, n_targets)``.
        bootstrap: bootstrap draws for the interval (0: no interval, ``ci = (mean, mean)``).
        confidence: level of the interval.
        seed: seed of the bootstrap.
        protocol: ``"classic"`` or ``"small-drop"``, the protocol the subsets follow (recorded in
            the result); ``"small-drop"`` also checks that every mask leaves out at least one and
            at most ``MAX_SMALL_DROP_FRACTION`` of the training examples. ``None``: not stated.

    Returns:
        :class:`LDSResult`.

    Raises:
        ValueError: shapes that do not match, masks that are not 0/1, fewer than 3 subsets,
            masks that are not small drops under ``protocol="small-drop"``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    check_bootstrap(bootstrap)
    non_negative_integer("seed", seed, " (of the bootstrap)")
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS} or None, got {protocol!r}")
    mask_array, output_array = subset_data(masks, outputs)
    drop_fraction = None
    if protocol == "small-drop":
        drop_fraction = check_small_drops(mask_array)
    scores = score_matrix(attributions)
    _check_train_size(scores, mask_array)
    if scores.shape[0] != output_array.shape[1]:
        raise ValueError(
            f"the attributions have {scores.shape[0]} targets but the outputs "
            f"{output_array.shape[1]}: pass outputs of the same targets, in the same order"
        )
    if mask_array.shape[0] < 3:
        raise ValueError(f"a rank correlation needs at least 3 subsets, got {mask_array.shape[0]}")
    predictions = mask_array.astype(np.float64) @ scores.T.astype(np.float64)
    per_target = column_spearman(predictions, output_array)
    constant_predictions = (predictions == predictions[:1]).all(axis=0)
    varying_outputs = ~(output_array == output_array[:1]).all(axis=0)
    per_target[constant_predictions & varying_outputs] = 0.0
    defined = per_target[~np.isnan(per_target)]
    mean = float(defined.mean()) if defined.size else float("nan")
    if not defined.size:
        warnings.warn(
            f"every target's outputs are the same on all {mask_array.shape[0]} subsets, so no "
            "rank correlation is defined and the LDS is NaN: check that the outputs are of "
            "models trained on these subsets (not one model's outputs repeated)",
            RuntimeWarning,
            stacklevel=2,
        )
    ci = bootstrap_mean_ci(defined, draws=bootstrap, confidence=confidence, seed=seed)
    return LDSResult(mean, per_target, ci, confidence, mask_array.shape[0], protocol, drop_fraction)


def check_small_drops(masks: np.ndarray) -> float:
    """The mean fraction of training examples that ``masks`` leave out, after checking that each
    leaves out at least one and at most ``MAX_SMALL_DROP_FRACTION`` of them.

    Args:
        masks: ``(n_subsets, n_train)`` bool.

    Raises:
        ValueError: a mask that drops nothing or too much, saying which.
    """
    dropped = 1.0 - np.asarray(masks, dtype=bool).mean(axis=1)
    if (dropped == 0).any():
        raise ValueError(
            f"{int((dropped == 0).sum())} masks keep every training example: small-drop subsets "
            "must each leave some out"
        )
    if (dropped > MAX_SMALL_DROP_FRACTION).any():
        raise ValueError(
            f"masks leave out up to {dropped.max():.1%} of the training set, more than the "
            f"{MAX_SMALL_DROP_FRACTION:.0%} of a small drop: these look like classic subsets "
            "(use protocol='classic')"
        )
    return float(dropped.mean())


def _check_train_size(scores: np.ndarray, masks: np.ndarray) -> None:
    if scores.shape[1] != masks.shape[1]:
        raise ValueError(
            f"the attributions cover {scores.shape[1]} training examples but the masks "
            f"{masks.shape[1]}: use masks over the same training set"
        )
