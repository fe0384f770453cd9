"""ModelDiff (Shah et al. 2023): compare two learning algorithms by how they use the same data.

Given attributions ``Θ_A`` and ``Θ_B`` ``(n_targets, n_train)`` of models trained with algorithms A
and B on the same training set, for the same targets:

1. **Row-normalise** both (each target's attribution vector to unit norm), so that every target
   counts alike whatever the scale of its scores. (The ``modeldiff`` pip package skips this; the
   paper's pipeline does it.)
2. **Residuals** of A against B: ``r_j = θ̃_A(j) − ⟨θ̃_A(j), θ̃_B(j)⟩ θ̃_B(j)``, what A's attribution
   of target ``j`` holds beyond B's. And the reverse, B against A.
3. **Centred PCA** of the residuals (float64). Each principal component ``v`` is a direction
   in training-set space: the training examples at its extremes are a subpopulation that one
   algorithm's models use and the other's do not.
4. For each component, the **explained variance** of the row-normalised, centred ``Θ_A`` and
   ``Θ_B`` along ``v``, as a fraction of each one's total variance; the **targets most aligned**
   with it (largest ``|⟨r_j − r̄, v⟩|``).

**Order of the directions.** Residualising is symmetric in a way that misleads: when A's
attributions equal B's plus an extra part ``p`` (a feature only A uses), the residuals of B
against A hold ``−⟨θ̃_B, θ̃_A⟩ p`` and the top principal component of *B's* residuals is A's
feature. What tells the two apart is the explained variance: along a direction A uses and B does
not, ``Θ_A`` varies much more than ``Θ_B``. So by default each list is ordered by the gap
``variance_own − variance_other`` among the top ``CANDIDATE_FACTOR × n_components`` principal
components (``rank_by="variance_gap"``); ``rank_by="residual_variance"`` keeps the plain PCA order
of the reference implementation. Both are measured on a planted difference in
``tests/test_modeldiff.py`` and docs/modeldiff.md.

**TRAK's out-to-loss weight.** TRAK's scores are ``T ⊙ Q``; examples that an algorithm fits
through a shortcut get a ``Q`` orders of magnitude below the rest and vanish from them. By default
(``divide_out_to_loss="auto"``) ``Q`` is divided out wherever both attributions carry a positive
one, and the result says whether it was collapsed (:func:`out_to_loss_spread` above
:data:`OUT_TO_LOSS_SPREAD_LIMIT`); see :class:`ModelDiff`.

**Sign convention.** A principal component's sign is arbitrary; each is flipped so that its
largest-magnitude coordinate is positive (scikit-learn's ``svd_flip`` rule on components), so the
dominant subpopulation of a direction is always in ``train_positive``.

Counterfactual verification (:func:`verify_direction`) turns a direction into a confirmed
difference: apply a transformation suggested by the direction to target inputs and compare how
much it moves the outputs of models trained with A and with B, over several seeds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datatrace._arguments import positions, positive_integer
from datatrace._estimator import NotFittedError
from datatrace.attributions import Attributions
from datatrace.store import Store
from datatrace.subsets import Backend, SubsetExperiment

A_VS_B = "a_vs_b"
B_VS_A = "b_vs_a"
RANK_BY = ("variance_gap", "residual_variance")
# Principal components examined per reported direction when ranking by the variance gap: the
# leaked component described in the module docstring is usually among the first few, the
# directions that really belong to an algorithm among the first dozens.
CANDIDATE_FACTOR = 4
# Principal components whose variance is below this fraction of the largest are numerically zero.
RANK_TOLERANCE = 1e-10
DIVIDE_OUT_TO_LOSS = ("auto", True, False)
# The low tail of Q that out_to_loss_spread compares with its median: a subpopulation of at least
# this share of the training set (in percent) pulls the percentile into it.
OUT_TO_LOSS_PERCENTILE = 1.0
# A spread (median / 1st percentile of Q) above this marks a collapsed Q: at least 1% of the
# training examples weighted down more than 100× against a typical one, the order of
# suppression that hid the planted patch of docs/modeldiff.md (patched 2% at Q ≈ 4e-6 against a
# median of 7e-4). ModelDiff reports it; "auto" divides Q out whether or not it is collapsed,
# because on the planted patch T finds the patch in every setting measured and T ⊙ Q misses it
# both when Q collapses (plain cross-entropy) and when it does not (label smoothing 0.1, spread
# 3.5: precision 0.90-0.94 at the default settings, 0.0-0.57 at k = 256, against 1.00 for T;
# benchmarks/modeldiff_defaults.py, docs/defaults.md).
OUT_TO_LOSS_SPREAD_LIMIT = 100.0


@dataclass(frozen=True)
class Direction:
    """One distinguishing direction in training-set space.

    Attributes:
        algorithm: ``"A"`` for a direction of A against B (A's models use it, B's do not), ``"B"``
            for the reverse.
        rank: position in its list (0 = the most distinguishing).
        component: ``(n_train,)`` unit vector, sign fixed so that its largest-magnitude entry is
            positive.
        train_positive: ``(top_k,)`` training examples with the largest coordinates, largest first.
        train_negative: ``(top_k,)`` training examples with the most negative coordinates, most
            negative first.
        targets: ``(top_k,)`` targets most aligned with the direction (largest
            ``|target_projections|``), most aligned first.
        target_projections: ``(n_targets,)`` projection of each target's centred residual on
            ``component``; positive where the target's residual leans towards ``train_positive``.
        variance_a: fraction of the variance of the row-normalised, centred ``Θ_A`` along
            ``component`` (in ``[0, 1]``).
        variance_b: the same for ``Θ_B``.
        residual_variance: fraction of the residuals' variance along ``component`` (the PCA's
            explained-variance ratio).
        pca_index: index of ``component`` among the residuals' principal components.
    """

    algorithm: str
    rank: int
    component: np.ndarray = field(repr=False)
    train_positive: np.ndarray
    train_negative: np.ndarray
    targets: np.ndarray
    target_projections: np.ndarray = field(repr=False)
    variance_a: float
    variance_b: float
    residual_variance: float
    pca_index: int

    @property
    def variance_gap(self) -> float:
        """Explained variance of the algorithm that uses the direction minus the other's."""
        if self.algorithm == "A":
            return self.variance_a - self.variance_b
        return self.variance_b - self.variance_a


def _out_to_loss(attributions: Attributions | np.ndarray) -> np.ndarray | None:
    out_to_loss = getattr(attributions, "out_to_loss", None)
    return None if out_to_loss is None else np.asarray(out_to_loss, dtype=np.float64)


def _score_matrix(
    attributions: Attributions | np.ndarray, what: str, divide_out_to_loss: bool = False
) -> np.ndarray:
    scores = attributions.scores if isinstance(attributions, Attributions) else attributions
    scores = np.asarray(scores, dtype=np.float64)
    if divide_out_to_loss:
        out_to_loss = _out_to_loss(attributions)
        if out_to_loss is None:
            raise ValueError(
                f"divide_out_to_loss=True but {what} carry no out_to_loss weights (only TRAK's "
                "Attributions do): pass TRAK results, or leave divide_out_to_loss off"
            )
        if not np.all(out_to_loss > 0):
            raise ValueError(f"{what} have out_to_loss weights equal to 0: cannot divide them out")
        scores = scores / out_to_loss[None, :]
    if scores.ndim != 2:
        raise ValueError(f"{what} must be (n_targets, n_train) scores, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError(f"{what} hold NaN or infinite scores: fix or drop those targets first")
    return scores


def out_to_loss_spread(out_to_loss: np.ndarray) -> float:
    """How far TRAK's out-to-loss weights ``Q`` fall below their median in their low tail.

    ``median(Q) / percentile(Q, OUT_TO_LOSS_PERCENTILE)``: 1 for a flat ``Q``, and large when
    some share (≥ 1%) of the training examples carries a ``Q`` far below the typical one, as
    examples fit through a shortcut do. ``ModelDiff`` and ``datatrace modeldiff`` report it, and
    call a ``Q`` collapsed above :data:`OUT_TO_LOSS_SPREAD_LIMIT`.

    Args:
        out_to_loss: ``(n_train,)`` weights (``Attributions.out_to_loss``).

    Returns:
        The ratio; ``inf`` when the percentile is 0, NaN when ``Q`` holds NaN or negative values
        (a regression's residuals ``y − ŷ`` are signed: there is no collapse to measure).
    """
    weights = np.asarray(out_to_loss, dtype=np.float64)
    if weights.ndim != 1 or weights.size == 0:
        raise ValueError(
            f"out_to_loss must be a non-empty (n_train,) array, got shape {weights.shape}"
        )
    low = float(np.percentile(weights, OUT_TO_LOSS_PERCENTILE))
    if np.isnan(low) or np.any(weights < 0):
        return float("nan")
    if low <= 0:
        return float("inf")
    return float(np.median(weights)) / low


def _out_to_loss_decision(
    setting: bool | str, weights: dict[str, np.ndarray | None], spreads: dict[str, float | None]
) -> tuple[bool, str, bool]:
    """Whether to divide ``Q`` out, a one-line note saying why, and whether to warn.

    ``weights`` and ``spreads`` are keyed ``"a"``, ``"b"``, ``None`` where the attributions carry
    no ``out_to_loss``. A warning is due only where "auto" finds ``Q`` collapsed and cannot divide
    it out.
    """
    names = {"a": "A", "b": "B"}
    statistic = f"median/p{OUT_TO_LOSS_PERCENTILE:g} of Q"
    measured = ", ".join(
        f"{spread:.3g}× under {names[key]}" for key, spread in spreads.items() if spread is not None
    )
    limit = f"{OUT_TO_LOSS_SPREAD_LIMIT:g}×"
    collapsed = any(
        spread is not None and spread > OUT_TO_LOSS_SPREAD_LIMIT for spread in spreads.values()
    )
    if setting is True:  # without out_to_loss, the scores refuse it with a message
        return True, f"Q divided out (divide_out_to_loss=True); {statistic}: {measured}", False
    if not measured:
        return False, "no out_to_loss weights under A or B: scores compared as they are", False
    if setting is False:
        if collapsed:
            note = (
                f"Q kept (divide_out_to_loss=False) although {statistic} exceeds {limit} "
                f"({measured}): examples fit through a shortcut can vanish from T ⊙ Q; 'auto' "
                "would divide Q out"
            )
        else:
            note = f"Q kept (divide_out_to_loss=False); {statistic}: {measured}"
        return False, note, False
    missing = [names[key] for key, weight in weights.items() if weight is None]
    if missing:
        return (
            False,
            f"Q not divided out (auto): {missing[0]} carries no out_to_loss weights, and Q is "
            f"divided out of both attributions or of neither; {statistic}: {measured}",
            collapsed,
        )
    signed = [names[key] for key, weight in weights.items() if np.any(weight < 0)]
    if signed:
        return (
            False,
            f"Q not divided out (auto): it is signed under {' and '.join(signed)} (a "
            "regression's residuals y − ŷ), not a weight that can collapse or be divided out; "
            "scores compared as they are",
            False,
        )
    not_positive = {names[key]: int(np.sum(~(weight > 0))) for key, weight in weights.items()}
    if any(not_positive.values()):
        counts = ", ".join(f"{n} under {name}" for name, n in not_positive.items() if n)
        return (
            False,
            f"Q not divided out (auto): it holds values ≤ 0 or NaN ({counts}), which cannot be "
            f"divided out; {statistic}: {measured}",
            collapsed,
        )
    if collapsed:
        return (
            True,
            f"Q divided out (auto): {statistic} exceeds {limit} ({measured}), so T ⊙ Q would "
            "hide the training examples with the smallest Q",
            False,
        )
    return (
        True,
        f"Q divided out (auto); {statistic} is within {limit} ({measured}): not collapsed, but "
        "T still separates what the algorithms use better than T ⊙ Q (docs/modeldiff.md)",
        False,
    )


def row_normalise(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row scaled to unit Euclidean norm; all-zero rows stay zero.

    Returns:
        ``(normalised (n_targets, n_train), zero_rows (n_targets,) bool)``.
    """
    norms = np.linalg.norm(scores, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    return scores / np.where(norms > 0, norms, 1.0), zero


def residuals(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Rows of ``first`` with their projection on the matching rows of ``second`` removed.

    ``r_j = a_j − (⟨a_j, b_j⟩ / ‖b_j‖²) b_j``; where ``b_j = 0`` nothing is removed.

    Args:
        first: ``(n_targets, n_train)``.
        second: ``(n_targets, n_train)``.

    Returns:
        ``(n_targets, n_train)`` residuals, each orthogonal to its row of ``second``.
    """
    squared = (second * second).sum(axis=1)
    coefficient = (first * second).sum(axis=1) / np.where(squared > 0, squared, 1.0)
    return first - coefficient[:, None] * second


def explained_variance(normalised: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Fraction of the variance of centred ``normalised`` rows along each unit component.

    Args:
        normalised: ``(n_targets, n_train)`` row-normalised attributions.
        components: ``(n_components, n_train)`` unit vectors.

    Returns:
        ``(n_components,)`` values in ``[0, 1]``: ``mean_j ⟨x_j − x̄, v⟩² / mean_j ‖x_j − x̄‖²``
        (0 where the rows do not vary at all).
    """
    rows = torch.as_tensor(normalised, dtype=torch.float64)
    centred = rows - rows.mean(dim=0)
    total = float(centred.pow(2).sum(dim=1).mean())
    along = (centred @ torch.as_tensor(components, dtype=torch.float64).T).pow(2).mean(dim=0)
    return along.numpy() / total if total > 0 else np.zeros(len(components))


def principal_components(rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top ``n`` principal components of centred ``rows``, signs fixed.

    Returns:
        ``(components (n, n_train), projections (n_targets, n), variance_ratio (n,))``:
        unit components with their largest-magnitude entry positive, the centred rows'
        projections on them, and each component's share of the total variance.
    """
    # The eigendecomposition of the smaller Gram matrix (targets × targets, usually) rather than
    # an SVD of the rows: LAPACK's SVD of a 300 × 1500 matrix ran 50x slower than this when
    # other processes shared the cores. float64 keeps the top components exact enough.
    values = torch.as_tensor(rows, dtype=torch.float64)
    centred = values - values.mean(dim=0)
    n_rows, n_columns = centred.shape
    if n_rows <= n_columns:
        eigenvalues, vectors = torch.linalg.eigh(centred @ centred.T)
    else:
        eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred)
    eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)  # largest first
    total = float(eigenvalues.clamp(min=0).sum())
    # Components of (numerically) zero variance have no defined direction: leave them out.
    kept = int((eigenvalues > RANK_TOLERANCE * max(float(eigenvalues[0]), 0.0)).sum())
    n = min(n, kept)
    eigenvalues, vectors = eigenvalues[:n], vectors[:, :n]
    if n_rows <= n_columns:
        components = (centred.T @ vectors / eigenvalues.sqrt()).T
    else:
        components = vectors.T
    largest = components.abs().argmax(dim=1)
    signs = torch.sign(components[torch.arange(n), largest])
    components = components * torch.where(signs == 0, 1.0, signs)[:, None]
    ratio = eigenvalues.numpy() / total if total > 0 else np.zeros(n)
    return components.numpy(), (centred @ components.T).numpy(), ratio


class ModelDiff:
    """Distinguishing directions between two learning algorithms from their attributions.

    Args:
        n_components: directions reported per comparison (A vs B, B vs A).
        top_k: training examples at each extreme, and aligned targets, listed per direction.
        rank_by: ``"variance_gap"`` (default) orders directions by how much more of the own
            algorithm's attribution variance they explain than of the other's, among the top
            ``CANDIDATE_FACTOR × n_components`` principal components; ``"residual_variance"``
            keeps the PCA order (the reference implementation's). See the module docstring.
        divide_out_to_loss: ``True`` compares TRAK's kernel term ``T`` rather than its scores
            ``T ⊙ Q`` (each column divided by the training example's out-to-loss weight ``Q``;
            needs attributions that carry ``out_to_loss``); ``False`` compares the scores as
            they are. Examples that one algorithm fits through a shortcut get a ``Q`` orders of
            magnitude below the others' and vanish from ``T ⊙ Q`` (measured in
            docs/modeldiff.md). ``"auto"`` (default) divides ``Q`` out of both whenever both
            carry a positive one — collapsed or not: on the planted patch ``T`` finds it in every
            setting measured, ``T ⊙ Q`` misses it with a collapsed ``Q`` and ranks it lower with
            a flat one (label smoothing; docs/defaults.md) — and reports whether either
            algorithm's :func:`out_to_loss_spread` exceeds :data:`OUT_TO_LOSS_SPREAD_LIMIT` (100).
            It keeps the scores where it cannot divide: arrays, attributions without
            ``out_to_loss`` (either side), or a ``Q`` with values ≤ 0; there a collapsed ``Q``
            emits a warning. The decision is in ``divided_out_to_loss_`` and
            ``out_to_loss_note_``.

    Attributes (after ``fit``):
        directions_: ``{"a_vs_b": [Direction, ...], "b_vs_a": [...]}``; A-vs-B directions are
            what A's models use and B's do not.
        residuals_: ``{"a_vs_b": (n_targets, n_train), "b_vs_a": ...}`` residual attributions.
        n_targets_, n_train_: shape of the compared attributions.
        zero_rows_: ``(n_targets,)`` bool, targets whose attributions are all zero under A or B
            (they add nothing to the residuals of the other).
        divided_out_to_loss_: whether ``Q`` was divided out of both attributions.
        out_to_loss_spread_: ``{"a": float | None, "b": ...}``, :func:`out_to_loss_spread` of
            each algorithm's ``Q`` (``None`` without ``out_to_loss``).
        out_to_loss_note_: one line saying what was done with ``Q`` and why.
    """

    def __init__(
        self,
        n_components: int = 5,
        top_k: int = 10,
        rank_by: str = "variance_gap",
        divide_out_to_loss: bool | str = "auto",
    ):
        self.n_components = n_components
        self.top_k = top_k
        self.rank_by = rank_by
        self.divide_out_to_loss = divide_out_to_loss

    def fit(
        self,
        attributions_a: Attributions | np.ndarray,
        attributions_b: Attributions | np.ndarray,
    ) -> ModelDiff:
        """Compare the attributions of algorithm A with those of algorithm B.

        Args:
            attributions_a: ``(n_targets, n_train)`` attributions of models trained with A.
            attributions_b: the same targets and training examples, models trained with B.

        Returns:
            ``self``.
        """
        positive_integer("n_components", self.n_components)
        positive_integer("top_k", self.top_k)
        if self.rank_by not in RANK_BY:
            raise ValueError(f"rank_by must be one of {RANK_BY}, got {self.rank_by!r}")
        setting = self.divide_out_to_loss
        if isinstance(setting, bool | np.bool_):
            setting = bool(setting)
        elif setting != "auto":
            raise ValueError(
                f"divide_out_to_loss must be one of {DIVIDE_OUT_TO_LOSS}, got {setting!r}"
            )
        weights = {
            "a": _out_to_loss(attributions_a),
            "b": _out_to_loss(attributions_b),
        }
        self.out_to_loss_spread_ = {
            key: None if weight is None else out_to_loss_spread(weight)
            for key, weight in weights.items()
        }
        divide, self.out_to_loss_note_, warn = _out_to_loss_decision(
            setting, weights, self.out_to_loss_spread_
        )
        if warn:
            warnings.warn(
                f"{self.out_to_loss_note_}. The directions may miss examples fit through a "
                "shortcut; pass divide_out_to_loss=False to compare T ⊙ Q without this warning",
                stacklevel=2,
            )
        scores_a = _score_matrix(attributions_a, "attributions_a", divide)
        scores_b = _score_matrix(attributions_b, "attributions_b", divide)
        self.divided_out_to_loss_ = divide
        if scores_a.shape != scores_b.shape:
            raise ValueError(
                f"attributions_a has shape {scores_a.shape} and attributions_b {scores_b.shape}: "
                "ModelDiff compares the same targets over the same training set, in the same order"
            )
        if scores_a.shape[0] < 2:
            raise ValueError("ModelDiff needs at least 2 targets (PCA over targets)")
        normalised_a, zero_a = row_normalise(scores_a)
        normalised_b, zero_b = row_normalise(scores_b)
        self.zero_rows_ = zero_a | zero_b
        if self.zero_rows_.any():
            warnings.warn(
                f"{int(self.zero_rows_.sum())} target(s) have all-zero attributions under A or B "
                "(e.g. fully sparse datamodels); they stay zero after normalisation",
                stacklevel=2,
            )
        self.n_targets_, self.n_train_ = scores_a.shape
        self.residuals_ = {
            A_VS_B: residuals(normalised_a, normalised_b),
            B_VS_A: residuals(normalised_b, normalised_a),
        }
        self.directions_ = {
            A_VS_B: self._directions("A", self.residuals_[A_VS_B], normalised_a, normalised_b),
            B_VS_A: self._directions("B", self.residuals_[B_VS_A], normalised_a, normalised_b),
        }
        empty = [which for which, found in self.directions_.items() if not found]
        if empty:
            warnings.warn(
                f"no directions for {' and '.join(empty)}: what is left of one algorithm's "
                "attributions after removing the other's is zero, so nothing distinguishes "
                "them there (are A and B the same attributions?)",
                RuntimeWarning,
                stacklevel=2,
            )
        return self

    def _directions(
        self, algorithm: str, rows: np.ndarray, normalised_a: np.ndarray, normalised_b: np.ndarray
    ) -> list[Direction]:
        n_candidates = (
            CANDIDATE_FACTOR * self.n_components
            if self.rank_by == "variance_gap"
            else self.n_components
        )
        components, projections, ratio = principal_components(rows, n_candidates)
        variance_a = explained_variance(normalised_a, components)
        variance_b = explained_variance(normalised_b, components)
        if self.rank_by == "variance_gap":
            gap = variance_a - variance_b if algorithm == "A" else variance_b - variance_a
            order = np.argsort(-gap, kind="stable")[: self.n_components]
        else:
            order = np.arange(min(self.n_components, len(components)))
        k = min(self.top_k, self.n_train_)
        k_targets = min(self.top_k, self.n_targets_)
        directions = []
        for rank, index in enumerate(order):
            component = components[index]
            projection = projections[:, index]
            directions.append(
                Direction(
                    algorithm=algorithm,
                    rank=rank,
                    component=component,
                    train_positive=np.argsort(-component, kind="stable")[:k],
                    train_negative=np.argsort(component, kind="stable")[:k],
                    targets=np.argsort(-np.abs(projection), kind="stable")[:k_targets],
                    target_projections=projection,
                    variance_a=float(variance_a[index]),
                    variance_b=float(variance_b[index]),
                    residual_variance=float(ratio[index]),
                    pca_index=int(index),
                )
            )
        return directions

    def directions(self, which: str = A_VS_B) -> list[Direction]:
        """The fitted directions of ``which`` (``"a_vs_b"`` or ``"b_vs_a"``)."""
        if not hasattr(self, "directions_"):
            raise NotFittedError(
                "this ModelDiff is not fitted yet: call fit(attributions_a, attributions_b)"
            )
        if which not in self.directions_:
            raise ValueError(f"which must be {A_VS_B!r} or {B_VS_A!r}, got {which!r}")
        return self.directions_[which]

    def summary(self) -> list[dict[str, Any]]:
        """One JSON-serialisable row per direction (both comparisons).

        Each row also says whether ``Q`` was divided out (``divided_out_to_loss``) and why
        (``out_to_loss_note``), so that a row read on its own says which scores it describes.
        """
        rows = []
        for which in (A_VS_B, B_VS_A):
            for direction in self.directions(which):
                rows.append(
                    {
                        "comparison": which,
                        "rank": direction.rank,
                        "variance_a": direction.variance_a,
                        "variance_b": direction.variance_b,
                        "residual_variance": direction.residual_variance,
                        "pca_index": direction.pca_index,
                        "train_positive": direction.train_positive.tolist(),
                        "train_negative": direction.train_negative.tolist(),
                        "targets": direction.targets.tolist(),
                        "divided_out_to_loss": self.divided_out_to_loss_,
                        "out_to_loss_note": self.out_to_loss_note_,
                    }
                )
        return rows


# -- counterfactual verification ------------------------------------------------------------


@dataclass(frozen=True)
class DirectionCheck:
    """How much a transformation of the targets moves the outputs of models of A and of B.

    Attributes:
        change_a: ``(n_seeds, n_targets)`` output change ``output(transformed) − output(original)``
            of each model trained with A (one row per training seed).
        change_b: the same for B.
        mean_a: mean change over targets and seeds for A.
        mean_b: the same for B.
        stderr_a: standard error of ``mean_a`` over seeds (each seed's mean over targets is one
            sample); NaN with one seed.
        stderr_b: the same for B.
        n_seeds: models trained per algorithm.
        models_trained: models this call trained (the others were in the store).
    """

    change_a: np.ndarray
    change_b: np.ndarray
    mean_a: float
    mean_b: float
    stderr_a: float
    stderr_b: float
    n_seeds: int
    models_trained: int

    @property
    def difference(self) -> float:
        """``mean_a − mean_b``."""
        return self.mean_a - self.mean_b

    @property
    def difference_stderr(self) -> float:
        """Standard error of :attr:`difference` (the seeds of A and B are independent)."""
        return float(np.hypot(self.stderr_a, self.stderr_b))


@dataclass(frozen=True)
class TransformedOutputs:
    """``evaluate(model)`` of a check: outputs on the targets, then on the transformed targets.

    A module-level class (not a closure) so that it pickles for process and Ray backends when the
    user's functions do.
    """

    targets: Any
    transform: Callable[[Any], Any]
    output: Callable[[Any, Any], Any]

    def __call__(self, model: Any) -> np.ndarray:
        original = np.asarray(_numpy(self.output(model, self.targets)), dtype=np.float64)
        changed = np.asarray(
            _numpy(self.output(model, self.transform(self.targets))), dtype=np.float64
        )
        if original.ndim != 1 or original.shape != changed.shape:
            raise ValueError(
                "output(model, inputs) must return one number per target, (n_targets,); got "
                f"{original.shape} and {changed.shape} on the transformed targets"
            )
        return np.concatenate([original, changed])


def _numpy(values: Any) -> Any:
    if hasattr(values, "detach"):
        return values.detach().cpu().numpy()
    return values


def _seed_stderr(change: np.ndarray) -> float:
    per_seed = change.mean(axis=1)
    if len(per_seed) < 2:
        return float("nan")
    return float(per_seed.std(ddof=1) / np.sqrt(len(per_seed)))


def verify_direction(
    train_a: Callable[[np.ndarray, int], Any],
    train_b: Callable[[np.ndarray, int], Any],
    targets: Any,
    transform: Callable[[Any], Any],
    output: Callable[[Any, Any], Any],
    *,
    n_train: int,
    n_targets: int,
    n_seeds: int = 5,
    train_indices: Sequence[int] | None = None,
    store: Store | str | Path | None = None,
    name: str = "modeldiff-check",
    seed: int = 0,
    backend: str | Backend = "local",
    progress: bool = True,
    description: dict[str, Any] | None = None,
) -> DirectionCheck:
    """Confirm a direction: transform target inputs and compare the output change under A and B.

    ``n_seeds`` models are trained with each algorithm (``train_a(train_indices, seed)``,
    ``train_b(...)``); each model's ``output`` is measured on the targets as they are and after
    ``transform``. A direction that A's models use and B's do not predicts a larger change for A.

    The outputs are kept in two explicit-mask subset tables of the store (``<name>/a`` and
    ``<name>/b``), so with a store on disk a rerun trains nothing and a stopped run resumes; the
    description (default: the names of the functions) is part of their provenance, so a changed
    transformation in a reused store is refused rather than mixed in.

    Args:
        train_a: ``train_a(train_indices (n,) int64, seed) -> model`` of algorithm A.
        train_b: the same for algorithm B.
        targets: the target inputs, in whatever form ``transform`` and ``output`` take.
        transform: ``transform(targets) -> transformed targets`` (e.g. add a patch to images).
        output: ``output(model, inputs) -> (n_targets,)`` the quantity to compare (e.g. the
            margin towards the class a direction points to).
        n_train: size of the training set.
        n_targets: number of targets (length of what ``output`` returns).
        n_seeds: models per algorithm.
        train_indices: training examples used (default: all ``n_train``).
        store: where the outputs are kept (a directory makes the check resumable).
        name: name of the tables in the store.
        seed: seed of the training seeds.
        backend: where to train (see :meth:`SubsetExperiment.run`); process and Ray backends
            need picklable functions.
        progress: show progress bars.
        description: JSON-serialisable description of A, B, the transformation and the output.

    Returns:
        :class:`DirectionCheck`.
    """
    if n_seeds < 1:
        raise ValueError(f"n_seeds must be at least 1, got {n_seeds}")
    if n_targets < 1:
        raise ValueError(f"n_targets must be at least 1, got {n_targets}")
    mask = np.zeros((1, n_train), dtype=bool)
    if train_indices is None:
        mask[:] = True
    else:
        indices = positions(train_indices, n_train, "train_indices")
        if indices.size == 0 or indices.min() < 0 or indices.max() >= n_train:
            raise ValueError(f"train_indices must be non-empty indices in [0, {n_train})")
        mask[0, indices] = True
    evaluate = TransformedOutputs(targets, transform, output)
    store = store if isinstance(store, Store) else Store(store)
    base = description or {
        "transform": getattr(transform, "__qualname__", type(transform).__name__),
        "output": getattr(output, "__qualname__", type(output).__name__),
    }
    changes, trained = [], 0
    for label, train in (("a", train_a), ("b", train_b)):
        experiment = SubsetExperiment(
            store,
            f"{name}/{label}",
            n_train=n_train,
            n_outputs=2 * n_targets,
            masks=mask,
            seed=seed,
            n_seeds=n_seeds,
            description={
                "kind": "modeldiff-check",
                "algorithm": label,
                "train": getattr(train, "__qualname__", type(train).__name__),
                **base,
            },
        )
        before = int(experiment.completed.sum())
        experiment.run(train, evaluate, backend=backend, progress=progress)
        trained += (int(experiment.completed.sum()) - before) * n_seeds
        outputs = experiment.results(reduce=None).outputs[0].astype(np.float64)
        changes.append(outputs[:, n_targets:] - outputs[:, :n_targets])
    change_a, change_b = changes
    return DirectionCheck(
        change_a=change_a,
        change_b=change_b,
        mean_a=float(change_a.mean()),
        mean_b=float(change_b.mean()),
        stderr_a=_seed_stderr(change_a),
        stderr_b=_seed_stderr(change_b),
        n_seeds=n_seeds,
        models_trained=trained,
    )
