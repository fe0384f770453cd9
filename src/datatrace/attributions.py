"""Attributions: a ``(n_targets, n_train)`` score matrix and the ways to read it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Ranking:
    """Training examples ranked for one or more targets.

    Attributes:
        indices: training-example indices, ``(k,)`` for one target or ``(n_targets, k)``.
        scores: their scores, same shape.
    """

    indices: np.ndarray
    scores: np.ndarray


class Attributions:
    """Scores of every training example for every target.

    ``scores[j, i]`` is the attribution of training example ``i`` for target ``j``. A positive score
    means the training example pushes the target's output up (a *proponent*), a negative one
    pushes it down (an *opponent*). Every attribution method in datatrace returns this type.

    Args:
        scores: ``(n_targets, n_train)``.
        method: name of the method that produced them (``"TRAK"``, ``"datamodels"``, ...).
        out_to_loss: optional ``(n_train,)`` out-to-loss weight of each training example that
            multiplies the scores (TRAK's ``Q``), kept so reports can show when it dominates.
        info: JSON-serialisable settings and figures of the run that produced the scores.
    """

    def __init__(
        self,
        scores: np.ndarray,
        method: str = "",
        out_to_loss: np.ndarray | None = None,
        info: dict[str, Any] | None = None,
    ):
        scores = np.asarray(scores)
        if scores.ndim != 2:
            raise ValueError(
                f"scores must be a (n_targets, n_train) matrix, got shape {scores.shape}"
            )
        self.scores = scores
        self.method = method
        self.out_to_loss = None if out_to_loss is None else np.asarray(out_to_loss)
        if self.out_to_loss is not None and self.out_to_loss.shape != (scores.shape[1],):
            raise ValueError(
                f"out_to_loss must have one value per training example ({scores.shape[1]}), "
                f"got shape {self.out_to_loss.shape}"
            )
        self.info = dict(info or {})

    @property
    def n_targets(self) -> int:
        return self.scores.shape[0]

    @property
    def n_train(self) -> int:
        return self.scores.shape[1]

    def __repr__(self) -> str:
        return (
            f"Attributions(method={self.method!r}, n_targets={self.n_targets}, "
            f"n_train={self.n_train})"
        )

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_targets, n_train)``."""
        return self.scores.shape

    def to_numpy(self) -> np.ndarray:
        """The ``(n_targets, n_train)`` score matrix."""
        return self.scores

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """The score matrix, so that ``np.asarray(attributions)`` is :meth:`to_numpy`."""
        if copy is False and dtype is not None and np.dtype(dtype) != self.scores.dtype:
            raise ValueError(
                f"cannot give the {self.scores.dtype} scores as {np.dtype(dtype)} without a copy"
            )
        scores = self.scores if dtype is None else self.scores.astype(dtype, copy=False)
        return scores.copy() if copy else scores

    def top(self, k: int = 10) -> Ranking:
        """The ``k`` highest-scoring training examples of every target, best first.

        Returns:
            :class:`Ranking` with ``indices`` and ``scores`` of shape ``(n_targets, k)``.
        """
        k = self._check_k(k)
        part = np.argpartition(-self.scores, k - 1, axis=1)[:, :k]
        part_scores = np.take_along_axis(self.scores, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        indices = np.take_along_axis(part, order, axis=1)
        return Ranking(indices, np.take_along_axis(self.scores, indices, axis=1))

    def proponents(self, target: int, k: int = 10) -> Ranking:
        """The ``k`` training examples that push target ``target``'s output up most, best first."""
        row = self._row(target)
        k = self._check_k(k)
        indices = np.argsort(-row, kind="stable")[:k]
        return Ranking(indices, row[indices])

    def opponents(self, target: int, k: int = 10) -> Ranking:
        """The ``k`` training examples that push target ``target``'s output down most."""
        row = self._row(target)
        k = self._check_k(k)
        indices = np.argsort(row, kind="stable")[:k]
        return Ranking(indices, row[indices])

    def sparsify(self, keep: float) -> Attributions:
        """Soft-threshold each row, keeping roughly the fraction ``keep`` of its entries nonzero.

        Each row ``τ_j`` becomes ``sign(τ_j)·max(|τ_j| − t_j, 0)`` with ``t_j`` the
        ``(1 − keep)``-quantile of ``|τ_j|`` (the sparsification of the TRAK paper).
        """
        if not 0 < keep <= 1:
            raise ValueError(f"keep must be a fraction in (0, 1], got {keep}")
        magnitude = np.abs(self.scores)
        threshold = np.quantile(magnitude, 1 - keep, axis=1, keepdims=True)
        scores = np.sign(self.scores) * np.maximum(magnitude - threshold, 0)
        return Attributions(
            scores, self.method, self.out_to_loss, {**self.info, "sparsify_keep": keep}
        )

    def save(self, location: str | Path, name: str = "scores") -> None:
        """Write to a datatrace store (a directory, created if needed) under ``scores/<name>``."""
        from datatrace.store import Store

        Store(location).save_attributions(name, self)

    @classmethod
    def load(cls, location: str | Path, name: str = "scores") -> Attributions:
        """Read attributions written by :meth:`save` (or by a run with a named result)."""
        from datatrace.store import Store

        return Store(location, read_only=True).load_attributions(name)

    def _row(self, target: int) -> np.ndarray:
        if not -self.n_targets <= target < self.n_targets:
            raise IndexError(f"target {target} out of range for {self.n_targets} targets")
        return self.scores[target]

    def _check_k(self, k: int) -> int:
        from datatrace._arguments import positive_integer

        return min(positive_integer("k", k), self.n_train)
