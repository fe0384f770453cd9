"""The after-kernel ``K = ΦᵀΦ + λI``, its damping, and the TRAK score of one checkpoint.

Kept free of models and stores so that the formulas can be checked against closed forms.

Primal and dual. ``T = Φ'(ΦᵀΦ + λI)⁻¹Φᵀ = Φ'Φᵀ(ΦΦᵀ + λI)⁻¹`` (push-through identity). The primal
solves a ``k × k`` system, the dual an ``n × n`` one; both give the same scores exactly, and the
smaller one is used. With ``k ≥ n`` the primal ``ΦᵀΦ`` is singular (rank at most ``n``) while
the dual ``ΦΦᵀ`` is generically full rank, so ``k ≥ n`` is an ordinary setting: the scores are
those of the ``n``-dimensional kernel regression, and ``λ → 0`` tends to its minimum-norm
interpolation instead of to noise.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_DAMPING = "auto"
"""Default damping: ``"auto"``, the rule of :func:`damping_from_features`.

A number instead is a damping relative to the mean diagonal entry of ``ΦᵀΦ``
(``λ = damping · tr(ΦᵀΦ)/k``), the rule of earlier versions (whose default was 1.0)."""

REDUNDANCY_ANCHORS = ((0.4, 0.01), (0.55, 3.0))
"""``(ρ, f(ρ))`` at the two ends of the damping rule's log-linear ramp (see
:func:`damping_from_features`): ``f = 0.01`` where the median nearest-neighbour cosine of the
training gradients is 0.4 or less, ``f = 3`` where it is 0.55 or more. Measured with
``benchmarks/damping_study.py`` on fourteen families (docs/trak.md, docs/defaults.md): every
classifier studied (ρ 0.6–0.95) is best damped at 1–10 × the mean diagonal, the denoisers'
loss (ρ ≈ 0.38) at 0.2 or less."""

NEIGHBOUR_SAMPLE = 256
"""Training examples whose nearest neighbour (among all training examples) is looked up for
:attr:`KernelStatistics.neighbour_cosine`; the median over 256 has a standard error of about
0.01 on the studied families."""

# The chosen damping stays within these multiples of the mean diagonal of ΦᵀΦ: below, the
# float64 Cholesky factor would lose digits; above, K⁻¹ is I/λ to working precision.
MIN_RELATIVE_DAMPING = 1e-6
MAX_RELATIVE_DAMPING = 1e6


class SingularKernelWarning(UserWarning):
    """Kept for code that filters it: datatrace no longer emits it.

    ``ΦᵀΦ`` is singular when the projection dimension is at least the number of training
    examples; TRAK then solves the ``n × n`` dual instead (exact, see this module's docstring).
    """


@dataclass(frozen=True)
class KernelStatistics:
    """What the damping rules read from one checkpoint's training features.

    Attributes:
        n_train: training examples ``n``.
        dim: feature dimension ``k``.
        trace: ``tr(ΦᵀΦ) = Σ_i ‖φ_i‖²``.
        neighbour_cosine: ``ρ``, the median over a seeded sample of training examples of the
            cosine between an example's features and those of its nearest other training
            example (:func:`neighbour_cosine`).
    """

    n_train: int
    dim: int
    trace: float
    neighbour_cosine: float

    @classmethod
    def of(cls, features: np.ndarray, seed: int = 0) -> KernelStatistics:
        """From all the training features ``(n, k)`` at once (tests, small problems)."""
        rows = neighbour_sample(len(features), seed)
        chunks = [(0, len(features), features)]
        return cls(
            len(features),
            features.shape[1],
            float(np.square(features, dtype=np.float64).sum()),
            neighbour_cosine(features[rows], rows, chunks),
        )

    @classmethod
    def of_dual_gram(cls, gram: np.ndarray, dim: int, seed: int = 0) -> KernelStatistics:
        """The same statistics as :meth:`of`, from the ``(n, n)`` float64 dual Gram ``ΦΦᵀ`` of
        the training features (dimension ``dim``) instead of the features: its trace, and
        cosines ``G_ij / √(G_ii G_jj)``. The dual case forms that Gram anyway, so ``Φ`` is not
        read again."""
        rows = neighbour_sample(len(gram), seed)
        return cls(len(gram), dim, float(np.trace(gram)), neighbour_cosine_of_gram(gram, rows))

    @property
    def mean_diagonal(self) -> float:
        """``tr(ΦᵀΦ)/k``, the mean diagonal entry of ``ΦᵀΦ``."""
        return self.trace / self.dim


def neighbour_sample(n_train: int, seed: int = 0) -> np.ndarray:
    """The sorted training rows whose nearest neighbours :func:`neighbour_cosine` looks up."""
    generator = np.random.default_rng(seed)
    return np.sort(generator.choice(n_train, min(n_train, NEIGHBOUR_SAMPLE), replace=False))


def neighbour_cosine(
    sample: np.ndarray,
    sample_rows: np.ndarray,
    train_chunks: Iterable[tuple[int, int, np.ndarray]],
) -> float:
    """Median over the sampled examples of ``max_{j ≠ i} cos(φ_i, φ_j)``.

    Args:
        sample: ``(s, k)`` features of the sampled training examples.
        sample_rows: ``(s,)`` their training indices (to leave each out of its own search).
        train_chunks: ``(start, stop, features)`` row blocks of all training features.

    Returns:
        ``ρ`` in ``[-1, 1]``; 0 for fewer than two training examples. A zero feature vector has
        cosine 0 with everything.
    """
    sample = np.asarray(sample, dtype=np.float64)
    if len(sample) == 0:
        return 0.0
    sample = sample / np.maximum(np.linalg.norm(sample, axis=1, keepdims=True), 1e-300)
    best = np.full(len(sample), -np.inf)
    for start, stop, block in train_chunks:
        block = np.asarray(block, dtype=np.float64)
        block = block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-300)
        cosine = sample @ block.T
        inside = (sample_rows >= start) & (sample_rows < stop)
        cosine[np.flatnonzero(inside), sample_rows[inside] - start] = -np.inf
        best = np.maximum(best, cosine.max(axis=1))
    finite = best[np.isfinite(best)]
    return float(np.median(finite)) if finite.size else 0.0


def neighbour_cosine_of_gram(gram: np.ndarray, sample_rows: np.ndarray) -> float:
    """:func:`neighbour_cosine` of the training examples ``sample_rows`` from the dual Gram
    ``ΦΦᵀ`` ``(n, n)`` of all training features (a zero feature vector: cosine 0)."""
    if len(sample_rows) == 0:
        return 0.0
    norms = np.maximum(np.sqrt(np.clip(np.diag(gram), 0.0, None)), 1e-300)
    cosine = gram[sample_rows] / norms[sample_rows, None] / norms[None, :]
    cosine[np.arange(len(sample_rows)), sample_rows] = -np.inf
    best = cosine.max(axis=1)
    finite = best[np.isfinite(best)]
    return float(np.median(finite)) if finite.size else 0.0


def _check_features(statistics: KernelStatistics) -> None:
    if not (statistics.trace > 0 and np.isfinite(statistics.trace)):
        raise ValueError(
            "every projected gradient is zero, so there is nothing to attribute: check that the "
            "selected parameters influence the task's output"
        )


def absolute_damping(statistics: KernelStatistics, relative: float) -> float:
    """``λ = relative · tr(ΦᵀΦ)/k`` (relative to the mean diagonal entry of ``ΦᵀΦ``).

    Raises:
        ValueError: ``relative`` is negative, or the features are all zero.
    """
    if not relative >= 0:
        raise ValueError(f"damping must be non-negative, got {relative}")
    _check_features(statistics)
    return relative * statistics.mean_diagonal


def redundancy_factor(neighbour_cosine: float) -> float:
    """``f(ρ)``: log-linear in ``ρ`` between :data:`REDUNDANCY_ANCHORS`, constant outside."""
    (low, f_low), (high, f_high) = REDUNDANCY_ANCHORS
    return float(np.exp(np.interp(neighbour_cosine, [low, high], [np.log(f_low), np.log(f_high)])))


def damping_from_features(statistics: KernelStatistics, n_checkpoints: int = 1) -> float:
    """The default damping of one of ``C`` checkpoints:
    ``λ = f(ρ) · tr(ΦᵀΦ) / max(k, n) / √C``.

    ``tr(ΦᵀΦ)/max(k, n)`` is the smaller of the mean diagonal entries of ``ΦᵀΦ`` and ``ΦΦᵀ``: it
    makes ``λ`` follow the scale of the gradients (their size, the loss scale and the projection
    all change ``ΦᵀΦ`` by orders of magnitude). For ``k ≥ n`` it is the mean diagonal of
    ``ΦᵀΦ``, the scale of earlier versions' relative damping, so ``λ`` falls as ``1/k`` as the
    projection noise does; for ``k < n`` it is ``tr/n``, independent of ``k`` (measured: with
    ``tr/k`` instead, ``k = 512 < n`` is damped 2–3 times too much on every LDS family).

    ``f`` grows with the redundancy of the training gradients, ``ρ``, the median cosine between a
    training example's features and its nearest other example's (:func:`redundancy_factor`).
    When examples have near-parallel neighbours (``ρ ≥ 0.55``: every classifier of the study,
    images of one digit, texts of one class, rows of one class of a table), the undamped inverse
    kernel explains a target by a few of them and pushes their near-copies to zero or below,
    while removing any of them from training moves the target alike: heavy damping, towards
    the gradient dot product, predicts retraining better. When the gradients are far apart
    (``ρ ≤ 0.4``: a denoiser's loss summed over random noise levels), the dot product is
    dominated by the examples with the largest gradients, and only the inverse kernel
    separates the examples that matter: light damping. Between the anchors the factor is
    log-linear. This is an empirical rule: docs/trak.md shows the study it comes from and
    where it is off (language models traced to the sentences that state a fact prefer lighter
    damping than their ρ gives).

    Damping trades the variance of one checkpoint's scores (projection noise, and directions
    that only this model's weights give) against bias; the ensemble averages ``C`` checkpoints,
    dividing that variance by ``C``, so each kernel is damped ``√C`` times less (measured: the
    best damping of 5-checkpoint ensembles is 1.5–3.2 times below one checkpoint's on the LDS
    families of the study; a held-out family is best at 1.2 times below, and a factor from the
    checkpoints' agreement did not separate it from the others: docs/trak.md, "Damping").

    Args:
        statistics: the checkpoint's :class:`KernelStatistics`.
        n_checkpoints: ``C``, the checkpoints of the ensemble.

    Returns:
        The absolute ``λ``.

    Raises:
        ValueError: the features are all zero, or ``n_checkpoints < 1``.
    """
    _check_features(statistics)
    if n_checkpoints < 1:
        raise ValueError(f"n_checkpoints must be at least 1, got {n_checkpoints}")
    scale = statistics.trace / max(statistics.dim, statistics.n_train)
    relative = redundancy_factor(statistics.neighbour_cosine) / np.sqrt(n_checkpoints)
    relative *= scale / statistics.mean_diagonal
    relative = float(np.clip(relative, MIN_RELATIVE_DAMPING, MAX_RELATIVE_DAMPING))
    return relative * statistics.mean_diagonal


def uses_dual(dim: int, n_train: int) -> bool:
    """Whether the ``n × n`` dual system is the smaller one (``k > n``)."""
    return dim > n_train


class Kernel:
    """The Cholesky factor of one checkpoint's damped kernel, primal or dual, and its scores.

    Args:
        gram: ``ΦᵀΦ`` ``(k, k)`` (primal) or ``ΦΦᵀ`` ``(n, n)`` (dual), float64.
        damping: ``λ ≥ 0``.
        dual: whether ``gram`` is ``ΦΦᵀ``.

    Raises:
        np.linalg.LinAlgError: the damped kernel is not positive definite (``λ = 0`` with
            linearly dependent features); the message says to add damping.
    """

    def __init__(self, gram: np.ndarray, damping: float, dual: bool):
        kernel = torch.as_tensor(gram, dtype=torch.float64).clone()
        kernel.diagonal().add_(damping)
        factor, info = torch.linalg.cholesky_ex(kernel)
        if info.item() != 0:
            side = "ΦΦᵀ" if dual else "ΦᵀΦ"
            raise np.linalg.LinAlgError(
                f"the kernel {side} + λI with λ={damping:.3g} is not positive definite (the "
                "features are linearly dependent, e.g. duplicated training examples): use a "
                "positive damping"
            )
        self.factor = factor
        self.dual = dual
        self.damping = damping

    def scores(
        self,
        target_features: torch.Tensor,
        train_chunks: Iterable[tuple[int, int, np.ndarray]],
        n_train: int,
    ) -> np.ndarray:
        """``T = Φ' K⁻¹ Φᵀ`` (primal) or ``Φ'Φᵀ (ΦΦᵀ + λI)⁻¹`` (dual), ``(n_targets, n_train)``
        float32.

        Args:
            target_features: ``(n_targets, k)``.
            train_chunks: ``(start, stop, features)`` row blocks of the training features ``Φ``.
            n_train: total number of training examples.
        """
        targets = torch.as_tensor(target_features).to(torch.float64)
        if not self.dual:
            solved = self.fold(targets)
            scores = np.empty((targets.shape[0], n_train), dtype=np.float32)
            for start, stop, block in train_chunks:
                block = torch.as_tensor(block)  # the product in the features' precision
                scores[:, start:stop] = (block @ solved.to(block.dtype)).T.numpy()
            return scores
        cross = torch.empty((n_train, targets.shape[0]), dtype=torch.float64)
        for start, stop, block in train_chunks:
            cross[start:stop] = torch.as_tensor(block).to(torch.float64) @ targets.T
        return torch.cholesky_solve(cross, self.factor).T.to(torch.float32).numpy()

    def fold(self, target_features: torch.Tensor) -> torch.Tensor:
        """``K⁻¹Φ'ᵀ``, ``(k, n_targets)`` float64, for ``(n_targets, k)`` target features: the
        primal scores are then ``Φ`` times it (the dual has no ``k × k`` kernel to fold)."""
        if self.dual:
            raise ValueError("folding K⁻¹ into the targets needs the primal kernel (k ≤ n)")
        targets = torch.as_tensor(target_features).to(torch.float64)
        return torch.cholesky_solve(targets.T, self.factor)
