"""The after-kernel ``K = ΦᵀΦ + λI`` and the TRAK score of one checkpoint.

Kept free of models and stores so that the formulas can be checked against closed forms.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import numpy as np
import torch

DEFAULT_DAMPING = 1.0
"""Default damping, relative to the mean diagonal entry of ``ΦᵀΦ`` (``λ = 1.0 · tr(ΦᵀΦ)/k``).

Relative damping makes the default independent of the gradients' scale (a model's size, its
projection and its loss scale all change ``ΦᵀΦ`` by orders of magnitude). The value was chosen by
LDS over 0.01–10 on digits MLPs and CNNs with 1 and 5 checkpoints and k = 512 and 2048: 1.0 was
best on average (docs/trak.md has the table). Larger values move TRAK towards gradient dot
products (``K⁻¹ → I/λ``); smaller ones towards the undamped kernel."""


class SingularKernelWarning(UserWarning):
    """``ΦᵀΦ`` is singular: the projection dimension is at least the number of training examples."""


def absolute_damping(gram: np.ndarray, relative: float) -> float:
    """``λ = relative · mean(diag(ΦᵀΦ))``.

    Raises:
        ValueError: ``relative`` is negative, or the features are all zero.
    """
    if relative < 0:
        raise ValueError(f"damping must be non-negative, got {relative}")
    scale = float(np.mean(np.diag(gram)))
    if not scale > 0:
        raise ValueError(
            "every projected gradient is zero, so there is nothing to attribute: check that the "
            "selected parameters influence the task's output"
        )
    return relative * scale


def warn_if_singular(dim: int, n_train: int, damping: float) -> None:
    if dim >= n_train:
        warnings.warn(
            f"the projection dimension k={dim} is at least the number of training examples "
            f"n={n_train}: ΦᵀΦ is singular and the scores depend on the damping "
            f"(λ={damping:.3g}) as much as on the data. Prefer k < n, or choose the damping "
            "by LDS.",
            SingularKernelWarning,
            stacklevel=3,
        )


def cholesky(gram: np.ndarray, damping: float) -> torch.Tensor:
    """Lower Cholesky factor of ``ΦᵀΦ + λI`` in float64.

    Raises:
        np.linalg.LinAlgError: the damped kernel is not positive definite (``λ = 0`` on a singular
            ``ΦᵀΦ``); the message says to add damping.
    """
    kernel = torch.as_tensor(gram, dtype=torch.float64).clone()
    kernel.diagonal().add_(damping)
    factor, info = torch.linalg.cholesky_ex(kernel)
    if info.item() != 0:
        raise np.linalg.LinAlgError(
            f"the kernel ΦᵀΦ + λI with λ={damping:.3g} is not positive definite (ΦᵀΦ is "
            "singular): use a positive damping"
        )
    return factor


def solve_targets(factor: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
    """``K⁻¹ Φ'ᵀ`` in float64, ``(k, n_targets)``, from the Cholesky factor of ``K``."""
    return torch.cholesky_solve(target_features.to(torch.float64).T, factor)


def checkpoint_scores(
    factor: torch.Tensor,
    target_features: torch.Tensor,
    train_chunks: Iterable[tuple[int, int, np.ndarray]],
    n_train: int,
) -> np.ndarray:
    """``T = Φ' K⁻¹ Φᵀ`` for one checkpoint, ``(n_targets, n_train)`` float32.

    Args:
        factor: Cholesky factor of ``K`` (from :func:`cholesky`).
        target_features: ``(n_targets, k)``.
        train_chunks: ``(start, stop, features)`` row blocks of the training features ``Φ``.
        n_train: total number of training examples.
    """
    solved = solve_targets(factor, target_features).to(torch.float32)
    scores = np.empty((target_features.shape[0], n_train), dtype=np.float32)
    for start, stop, block in train_chunks:
        scores[:, start:stop] = (torch.as_tensor(block) @ solved).T.numpy()
    return scores
