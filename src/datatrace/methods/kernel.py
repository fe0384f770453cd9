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
from dataclasses import dataclass, replace

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

TARGET_FACTOR_STEPS = 2
"""Steps per octave of the per-target damping factor (:func:`target_damping_factor`): each
target's factor is rounded to a power of ``2^(1/2)``, so one score call factors the damped
kernel once per distinct step. Measured on the families of docs/defaults.md: rounding to
half-octaves changes no metric by more than 0.002."""

TARGET_FACTOR_RANGE = (2.0**-10, 2.0**4)
"""The per-target factor stays within these bounds (at most 29 steps, 29 factorisations)."""

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
        coupling: the median over the same sample of ``Σ_{j≠i} (φ_i·φ_j)² / ‖φ_i‖²``, the
            Rayleigh quotient of the other examples' kernel in an example's direction: how much
            of the kernel a training example sees (:func:`target_damping_factor` compares each
            target's with it). 0 for fewer than two training examples.
    """

    n_train: int
    dim: int
    trace: float
    neighbour_cosine: float
    coupling: float = 0.0

    @classmethod
    def of(cls, features: np.ndarray, seed: int = 0) -> KernelStatistics:
        """From all the training features ``(n, k)`` at once (tests, small problems)."""
        rows = neighbour_sample(len(features), seed)
        chunks = [(0, len(features), features)]
        cosine, coupling = neighbour_statistics(features[rows], rows, chunks)
        return cls(
            len(features),
            features.shape[1],
            float(np.square(features, dtype=np.float64).sum()),
            cosine,
            coupling,
        )

    @classmethod
    def of_dual_gram(cls, gram: np.ndarray, dim: int, seed: int = 0) -> KernelStatistics:
        """The same statistics as :meth:`of`, from the ``(n, n)`` float64 dual Gram ``ΦΦᵀ`` of
        the training features (dimension ``dim``) instead of the features: its trace, and
        cosines ``G_ij / √(G_ii G_jj)``. The dual case forms that Gram anyway, so ``Φ`` is not
        read again."""
        rows = neighbour_sample(len(gram), seed)
        cosine, coupling = neighbour_statistics_of_gram(gram, rows)
        return cls(len(gram), dim, float(np.trace(gram)), cosine, coupling)

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
    return neighbour_statistics(sample, sample_rows, train_chunks)[0]


def neighbour_statistics(
    sample: np.ndarray,
    sample_rows: np.ndarray,
    train_chunks: Iterable[tuple[int, int, np.ndarray]],
) -> tuple[float, float]:
    """``(ρ, coupling)`` of :class:`KernelStatistics` in one pass over the training features:
    :func:`neighbour_cosine`, and the median over the sampled examples of
    ``Σ_{j≠i} (φ_i·φ_j)² / ‖φ_i‖²`` (zero feature vectors left out of that median)."""
    sample = np.asarray(sample, dtype=np.float64)
    if len(sample) == 0:
        return 0.0, 0.0
    squared = np.square(sample).sum(axis=1)
    norms = np.maximum(np.sqrt(squared), 1e-300)
    best = np.full(len(sample), -np.inf)
    energy = np.zeros(len(sample))
    for start, stop, block in train_chunks:
        block = np.asarray(block, dtype=np.float64)
        dots = sample @ block.T
        inside = (sample_rows >= start) & (sample_rows < stop)
        own = (np.flatnonzero(inside), sample_rows[inside] - start)
        dots[own] = 0.0
        energy += np.square(dots).sum(axis=1)
        cosine = dots / norms[:, None] / np.maximum(np.linalg.norm(block, axis=1), 1e-300)
        cosine[own] = -np.inf
        best = np.maximum(best, cosine.max(axis=1))
    return _median_finite(best), _median_coupling(energy, squared)


def _median_finite(best: np.ndarray) -> float:
    finite = best[np.isfinite(best)]
    return float(np.median(finite)) if finite.size else 0.0


def _median_coupling(energy: np.ndarray, squared: np.ndarray) -> float:
    nonzero = squared > 0
    return float(np.median(energy[nonzero] / squared[nonzero])) if nonzero.any() else 0.0


def neighbour_cosine_of_gram(gram: np.ndarray, sample_rows: np.ndarray) -> float:
    """:func:`neighbour_cosine` of the training examples ``sample_rows`` from the dual Gram
    ``ΦΦᵀ`` ``(n, n)`` of all training features (a zero feature vector: cosine 0)."""
    return neighbour_statistics_of_gram(gram, sample_rows)[0]


def neighbour_statistics_of_gram(gram: np.ndarray, sample_rows: np.ndarray) -> tuple[float, float]:
    """:func:`neighbour_statistics` from the dual Gram ``ΦΦᵀ`` ``(n, n)``."""
    if len(sample_rows) == 0:
        return 0.0, 0.0
    diagonal = np.clip(np.diag(gram), 0.0, None)
    norms = np.maximum(np.sqrt(diagonal), 1e-300)
    dots = np.array(gram[sample_rows], dtype=np.float64)
    own = (np.arange(len(sample_rows)), sample_rows)
    dots[own] = 0.0
    energy = np.square(dots).sum(axis=1)
    cosine = dots / norms[sample_rows, None] / norms[None, :]
    cosine[own] = -np.inf
    return _median_finite(cosine.max(axis=1)), _median_coupling(energy, diagonal[sample_rows])


def normalised_weights(weights: np.ndarray, squared_norms: np.ndarray, trace: float) -> np.ndarray:
    """``weights`` scaled so that ``Σ r_i ‖φ_i‖² = trace`` (``tr(ΦᵀRΦ) = tr(ΦᵀΦ)``), from the
    examples' ``‖φ_i‖²``; unchanged where the weighted trace is 0."""
    weights = np.asarray(weights, dtype=np.float64)
    weighted = float(np.clip(squared_norms, 0.0, None) @ weights)
    return weights * (trace / weighted) if weighted > 0 else weights


def scaled_to_plain_trace(
    gram: np.ndarray, weights: np.ndarray, weighted: KernelStatistics, plain: KernelStatistics
) -> tuple[np.ndarray, np.ndarray, KernelStatistics]:
    """A weighted kernel (``gram``, primal ``ΦᵀRΦ`` or dual ``R^½ΦΦᵀR^½``), its weights and
    statistics scaled by ``tr(ΦᵀΦ)/tr(ΦᵀRΦ)``, so that its trace is the plain kernel's (as
    :func:`normalised_weights`); unchanged where the weighted trace is 0."""
    if not weighted.trace > 0:
        return gram, weights, weighted
    scale = plain.trace / weighted.trace
    statistics = replace(weighted, trace=plain.trace, coupling=weighted.coupling * scale)
    return gram * scale, weights * scale, statistics


def weighted_dual_gram(gram: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``R^½ΦΦᵀR^½`` ``(n, n)`` float64 from the plain dual Gram ``ΦΦᵀ`` and ``diag(R)``."""
    root = np.sqrt(np.asarray(weights, dtype=np.float64))
    return gram * root[:, None] * root[None, :]


def weighted_statistics_of_gram(
    gram: np.ndarray, weights: np.ndarray, plain: KernelStatistics, seed: int = 0
) -> KernelStatistics:
    """The :class:`KernelStatistics` of the weighted kernel ``ΦᵀRΦ`` (``R = diag(weights)``)
    from the plain dual Gram ``ΦΦᵀ``: its trace ``Σ r_i ‖φ_i‖²`` and coupling ``Σ_{j≠i} r_j
    (φ_i·φ_j)² / ‖φ_i‖²`` (the Rayleigh quotient of ``ΦᵀRΦ`` less the example's own term, as
    a target's is measured against it); ``ρ``, a cosine, is the plain kernel's (``plain``)."""
    rows = neighbour_sample(len(gram), seed)
    diagonal = np.clip(np.diag(gram), 0.0, None)
    dots = np.array(gram[rows], dtype=np.float64)
    dots[np.arange(len(rows)), rows] = 0.0
    energy = np.square(dots) @ weights
    trace = float(diagonal @ weights)
    return replace(plain, trace=trace, coupling=_median_coupling(energy, diagonal[rows]))


def weighted_gram_and_statistics(
    train_chunks: Iterable[tuple[int, int, np.ndarray]],
    weights: np.ndarray,
    plain: KernelStatistics,
    sample: np.ndarray,
    sample_rows: np.ndarray,
) -> tuple[np.ndarray, KernelStatistics]:
    """``ΦᵀRΦ`` ``(k, k)`` float64 and its :class:`KernelStatistics` (as
    :func:`weighted_statistics_of_gram`) in one pass over the training features.

    Args:
        train_chunks: ``(start, stop, features)`` row blocks of all training features.
        weights: ``(n,)`` the diagonal of ``R``.
        plain: the plain kernel's statistics (``ρ`` is kept).
        sample, sample_rows: the sampled training examples' features and rows
            (:func:`neighbour_sample`).
    """
    sample = np.asarray(sample, dtype=np.float64)
    gram = np.zeros((plain.dim, plain.dim))
    energy = np.zeros(len(sample))
    trace = 0.0
    for start, stop, block in train_chunks:
        block = np.asarray(block, dtype=np.float64)
        scale = weights[start:stop]
        gram += (block * scale[:, None]).T @ block
        trace += float(np.square(block).sum(axis=1) @ scale)
        dots = sample @ block.T
        inside = (sample_rows >= start) & (sample_rows < stop)
        dots[np.flatnonzero(inside), sample_rows[inside] - start] = 0.0
        energy += np.square(dots) @ scale
    coupling = _median_coupling(energy, np.square(sample).sum(axis=1))
    return gram, replace(plain, trace=trace, coupling=coupling)


def target_damping_factor(target_coupling: np.ndarray, coupling: float) -> np.ndarray:
    """Each target's multiple of the checkpoint's damping under ``damping="auto"``: its own
    coupling ``‖Φφ'‖² / ‖φ'‖²`` (how much of the training kernel its direction carries) over
    the training examples' median ``coupling`` (:class:`KernelStatistics`), rounded to a power
    of ``2^(1/TARGET_FACTOR_STEPS)`` and kept within :data:`TARGET_FACTOR_RANGE`.

    A target whose features lie where the training features share their largest directions
    (every target of a classifier like its training examples) gets about 1. A target that sees
    little of the kernel — a single answer token traced to whole training sentences, whose
    gradients are dominated by the template words they share — is in the kernel's small
    eigendirections, where a damping scaled to the kernel's mean diagonal would erase every
    difference: it gets a proportionally smaller one (docs/trak.md, "Damping"). A zero target,
    or training features with no coupling, gets 1.

    Args:
        target_coupling: ``(n_targets,)`` the targets' couplings (0/0 as NaN or 0).
        coupling: the training examples' median coupling.

    Returns:
        ``(n_targets,)`` float64 factors.
    """
    values = np.asarray(target_coupling, dtype=np.float64)
    if not coupling > 0:
        return np.ones_like(values)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = values / coupling
    ratio = np.where(np.isfinite(ratio) & (ratio > 0), ratio, 1.0)
    steps = np.round(np.log2(ratio) * TARGET_FACTOR_STEPS) / TARGET_FACTOR_STEPS
    low, high = TARGET_FACTOR_RANGE
    return np.clip(2.0**steps, low, high)


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


KERNEL_CACHE_BYTES = 512 << 20
"""Cholesky factors kept per :class:`Kernel` for the per-target dampings (at least the
checkpoint's own, whatever its size)."""


KEEP_UNDAMPED_BYTES = 128 << 20
"""A :class:`Kernel` with per-target dampings keeps its undamped kernel up to this size (a
``4096²`` float64 matrix); a larger one is rebuilt from the factor when new factors are made."""


def _cholesky_in_place(kernel: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The lower Cholesky factor of the symmetric C-contiguous float64 CPU matrix ``kernel`` (the
    copy ``Kernel._factorise`` makes in that layout), written over it (LAPACK ``dpotrf``, the
    upper triangle zeroed), and LAPACK's ``info`` (0, or the order of the first minor that is
    not positive definite).

    ``torch.linalg.cholesky_ex`` copies its input into a new matrix and returns the triangle as
    a third (``tril``): for a 2,000² kernel, 96 MiB of fresh pages, which cost more than the
    factorisation (65 against 168 ms, one thread). The C-order buffer read as a Fortran matrix
    is the same symmetric matrix, whose upper factor ``U`` (``K = UᵀU``) lies in it as
    ``L = Uᵀ`` in C order."""
    from scipy.linalg import lapack

    array = kernel.numpy()  # C-contiguous (the caller's copy): its transpose is Fortran-ordered
    _, info = lapack.dpotrf(array.T, lower=0, clean=1, overwrite_a=1)
    return kernel, int(info)


class Kernel:
    """The Cholesky factor of one checkpoint's damped kernel, primal or dual, and its scores.

    With ``coupling`` (``damping="auto"``), each target is scored with its own damping
    ``λ · target_damping_factor(...)`` (:func:`target_damping_factor`): one factorisation per
    distinct factor, cached up to :data:`KERNEL_CACHE_BYTES`. The undamped kernel is kept
    beside its factor up to :data:`KEEP_UNDAMPED_BYTES`; a larger one is rebuilt as ``LLᵀ −
    λI`` (as accurate as the factorisation itself: both err by about ``ε‖K‖``) once per call
    that needs new factors.
    Without ``coupling`` every target gets ``λ``.

    Weighted (Gauss–Newton) kernels ``ΦᵀRΦ``: in the primal ``gram`` is ``ΦᵀRΦ`` itself and the
    scores are ``Φ'(ΦᵀRΦ + λI)⁻¹Φᵀ``, nothing else changes. In the dual ``gram`` is
    ``R^½ΦΦᵀR^½`` and ``plain_gram`` ``ΦΦᵀ``; the scores ``Φ'Φᵀ(RΦΦᵀ + λI)⁻¹`` (push-through)
    are computed as ``(A − A R^½ (R^½ΦΦᵀR^½ + λI)⁻¹ R^½ ΦΦᵀ) / λ`` with ``A = Φ'Φᵀ``
    (Woodbury), which needs no ``R^{-½}``: examples with ``r_i = 0`` are allowed, ``λ = 0`` is
    not.

    Args:
        gram: ``ΦᵀΦ`` ``(k, k)`` (primal) or ``ΦΦᵀ`` ``(n, n)`` (dual), float64; weighted as
            above with ``weights``.
        damping: ``λ ≥ 0``.
        dual: whether ``gram`` is ``ΦΦᵀ``.
        coupling: the training features' median coupling (:class:`KernelStatistics`), or
            ``None`` for one damping for every target.
        floor: the smallest damping a target's factor may give.
        weights: ``(n,)`` the diagonal of ``R`` (non-negative), for a weighted dual kernel.
        plain_gram: ``ΦΦᵀ`` ``(n, n)`` float64, with ``weights`` in the dual.

    Raises:
        np.linalg.LinAlgError: the damped kernel is not positive definite (``λ = 0`` with
            linearly dependent features); the message says to add damping.
    """

    def __init__(
        self,
        gram: np.ndarray,
        damping: float,
        dual: bool,
        coupling: float | None = None,
        floor: float = 0.0,
        weights: np.ndarray | None = None,
        plain_gram: np.ndarray | None = None,
    ):
        self.dual = dual
        self.damping = damping
        self.coupling = coupling
        self.floor = floor
        self.root_weights = self._plain = None
        if dual and weights is not None:
            if plain_gram is None:
                raise ValueError("a weighted dual kernel needs plain_gram, the unweighted ΦΦᵀ")
            if not damping > 0:
                raise ValueError(
                    f"a weighted kernel (kernel_weights='auto') in the dual (k > n) needs a "
                    f"positive damping, got {damping}: use a positive damping, or "
                    "kernel_weights=None for the plain kernel ΦᵀΦ"
                )
            self.root_weights = torch.as_tensor(np.sqrt(weights), dtype=torch.float64)
            self._plain = torch.as_tensor(plain_gram, dtype=torch.float64)
        gram = torch.as_tensor(gram, dtype=torch.float64)
        self.factor = self._factorise(gram, damping)
        self._factors: dict[float, torch.Tensor] = {1.0: self.factor}
        small = gram.numel() * 8 <= KEEP_UNDAMPED_BYTES
        self._undamped = gram if coupling is not None and small else None

    def undamped(self) -> torch.Tensor:
        """The undamped kernel, float64: the one given if kept, else ``LLᵀ − λI``."""
        if self._undamped is not None:
            return self._undamped
        gram = self.factor @ self.factor.T
        gram.diagonal().sub_(self.damping)
        return gram

    def _factorise(self, gram: torch.Tensor, damping: float) -> torch.Tensor:
        kernel = gram.clone(memory_format=torch.contiguous_format)
        kernel.diagonal().add_(damping)
        if kernel.device.type == "cpu" and kernel.dtype == torch.float64:
            factor, info = _cholesky_in_place(kernel)
        else:
            factor, info = torch.linalg.cholesky_ex(kernel)
            info = info.item()
        if info != 0:
            side = "ΦΦᵀ" if self.dual else "ΦᵀΦ"
            raise np.linalg.LinAlgError(
                f"the kernel {side} + λI with λ={damping:.3g} is not positive definite (the "
                "features are linearly dependent, e.g. duplicated training examples): use a "
                "positive damping"
            )
        return factor

    def damping_for(self, value: float) -> float:
        """The damping of the factor for ``value`` (:meth:`factor_for`): ``λ`` for 1, else
        ``max(value · λ, floor)``."""
        value = float(value)
        return self.damping if value == 1.0 else max(value * self.damping, self.floor)

    def factor_for(self, value: float, undamped: torch.Tensor | None = None) -> torch.Tensor:
        """The Cholesky factor of the kernel damped by ``max(value · λ, floor)`` (from
        ``undamped``, :meth:`undamped`, when given)."""
        value = float(value)
        if value in self._factors:
            return self._factors[value]
        if undamped is None:
            undamped = self.undamped()
        factor = self._factorise(undamped, self.damping_for(value))
        keep = max(1, KERNEL_CACHE_BYTES // max(factor.numel() * 8, 1))
        while len(self._factors) >= keep + 1:  # the checkpoint's own factor stays
            del self._factors[next(key for key in self._factors if key != 1.0)]
        self._factors[value] = factor
        return factor

    def target_factors(
        self, targets: torch.Tensor, cross: torch.Tensor | None = None
    ) -> np.ndarray:
        """``(n_targets,)`` multiples of ``λ``, one per target (all 1 without ``coupling``).

        Args:
            targets: ``(n_targets, k)`` float64 target features.
            cross: for the dual, ``ΦΦ'ᵀ`` ``(n, n_targets)``, from which ``‖Φφ'‖²`` (weighted:
                ``‖R^½Φφ'‖²``) is read.
        """
        if self.coupling is None:
            return np.ones(targets.shape[0])
        targets = torch.as_tensor(targets).to(torch.float64)
        squared = targets.pow(2).sum(dim=1)
        if self.dual and self.root_weights is not None:
            energy = (cross * self.root_weights[:, None]).pow(2).sum(dim=0)
        elif self.dual:
            energy = cross.pow(2).sum(dim=0)
        else:  # φᵀ(ΦᵀΦ)φ = ‖Lᵀφ‖² − λ‖φ‖²
            energy = (self.factor.T @ targets.T).pow(2).sum(dim=0) - self.damping * squared
        with np.errstate(divide="ignore", invalid="ignore"):
            coupling = (energy / squared).numpy()
        return target_damping_factor(coupling, self.coupling)

    def solve(self, rhs: torch.Tensor, factors: np.ndarray) -> torch.Tensor:
        """``(G + factors_j λ I)⁻¹ rhs[:, j]`` for every column ``j``, float64."""
        values = np.unique(factors)
        missing = [value for value in values if float(value) not in self._factors]
        undamped = self.undamped() if missing else None  # once for every new factor
        if len(values) == 1:
            return torch.cholesky_solve(rhs, self.factor_for(values[0], undamped))
        out = torch.empty_like(rhs)
        for value in values:
            columns = torch.from_numpy(np.flatnonzero(factors == value))
            factor = self.factor_for(value, undamped)
            out[:, columns] = torch.cholesky_solve(rhs[:, columns], factor)
        return out

    def scores(
        self,
        target_features: torch.Tensor,
        train_chunks: Iterable[tuple[int, int, np.ndarray]],
        n_train: int,
    ) -> np.ndarray:
        """``T = Φ' K⁻¹ Φᵀ`` (primal) or ``Φ'Φᵀ (ΦΦᵀ + λI)⁻¹`` (dual), ``(n_targets, n_train)``
        float32, each target row with its own damping (:meth:`target_factors`).

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
        factors = self.target_factors(targets, cross)
        if self.root_weights is None:
            return self.solve(cross, factors).T.to(torch.float32).numpy()
        # Woodbury: (A − A R^½ (G + λ)⁻¹ R^½ K) / λ, one column per target (class docstring)
        root = self.root_weights[:, None]
        solved = self.solve(cross * root, factors)
        dampings = torch.tensor([self.damping_for(value) for value in factors], dtype=torch.float64)
        scores = (cross - self._plain @ (root * solved)) / dampings[None, :]
        return scores.T.to(torch.float32).numpy()

    def fold(self, target_features: torch.Tensor) -> torch.Tensor:
        """``K⁻¹Φ'ᵀ``, ``(k, n_targets)`` float64, for ``(n_targets, k)`` target features, each
        with its own damping: the primal scores are then ``Φ`` times it (the dual has no
        ``k × k`` kernel to fold)."""
        if self.dual:
            raise ValueError("folding K⁻¹ into the targets needs the primal kernel (k ≤ n)")
        targets = torch.as_tensor(target_features).to(torch.float64)
        return self.solve(targets.T.contiguous(), self.target_factors(targets))
