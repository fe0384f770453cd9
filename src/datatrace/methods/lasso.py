"""Batched ℓ1-regularised least squares: many targets sharing one design matrix, solved at once.

For every target ``t`` (a column of ``Y``) and its own ``λ_t`` this minimises exactly
scikit-learn's ``Lasso(alpha=λ_t, fit_intercept=True)`` objective::

    (1 / (2 n_rows)) ‖y_t − X w_t − b_t‖² + λ_t ‖w_t‖₁          (b_t unpenalised)

The solver is FISTA (accelerated proximal gradient, Beck & Teboulle 2009) with adaptive restart
(O'Donoghue & Candès 2015), run on all targets together. All targets share ``X``, so each
iteration costs one product of the centred Gram matrix ``G = X_cᵀX_c / n`` with the
``(n_features, n_targets)`` weight block: a single matrix multiplication (on a CPU's BLAS or a GPU),
where coordinate descent would need one small update per feature. Only rows of the weight block
that are nonzero for some target enter the product, which makes the sparse start of a λ path cheap.

Each target stops on its own when its duality gap (the one scikit-learn uses) falls below
``tol · ‖y_t − ȳ_t‖² / n``; converged targets leave the batch, so the last slow targets do not
drag the others along.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

# Iterations between duality-gap checks: a check costs a few passes over the weight block, and
# converged targets leave the batch only at a check.
GAP_CHECK_EVERY = 2
# Power-iteration steps for the largest eigenvalue of G (the step size is 1/L). The estimate
# approaches L from below, so it is enlarged by LIPSCHITZ_SAFETY, and the solver also checks the
# curvature of every step and enlarges L again if a step reveals more.
POWER_ITERATIONS = 30
LIPSCHITZ_SAFETY = 1.05
# Use the support of the weights in the Gram product once it is at most this share of features
# (gathering the columns costs about as much as multiplying them for dense supports).
SPARSE_PRODUCT_SHARE = 0.5
# Use a precomputed Gram matrix when n_features ≤ this × n_rows: G·W then costs p²m against the
# 2·n·p·m of X_cᵀ(X_c W), and G needs p² memory.
GRAM_FEATURES_PER_ROW = 2.0


class LassoConvergenceWarning(UserWarning):
    """Some targets did not reach the duality-gap tolerance within ``max_iter`` iterations."""


@dataclass(frozen=True)
class LassoPath:
    """Solutions of the batched lasso along a λ path.

    Attributes:
        coef: ``(n_lambdas, n_targets, n_features)`` weights.
        intercept: ``(n_lambdas, n_targets)`` unpenalised biases.
        lambdas: ``(n_lambdas, n_targets)`` the λ of each solution.
        n_iter: ``(n_lambdas, n_targets)`` iterations used.
        gap: ``(n_lambdas, n_targets)`` duality gap reached, relative to ``‖y − ȳ‖²/n``.
    """

    coef: np.ndarray
    intercept: np.ndarray
    lambdas: np.ndarray
    n_iter: np.ndarray
    gap: np.ndarray


class CentredDesign:
    """The centred design ``X_c = X − x̄`` of some rows, as the products the solver needs.

    Args:
        X: ``(n_rows, n_features)`` design, already on its device and dtype (kept by reference).
        use_gram: precompute ``G = X_cᵀX_c / n`` (``None``: when it is the cheaper product).
    """

    def __init__(self, X: torch.Tensor, use_gram: bool | None = None):
        n_rows, n_features = X.shape
        if n_rows < 2:
            raise ValueError(f"need at least 2 rows to fit with an intercept, got {n_rows}")
        self.rows = X
        self.n_rows = n_rows
        self.n_features = n_features
        self.mean = X.mean(0)
        centred = X - self.mean
        if use_gram is None:
            use_gram = n_features <= GRAM_FEATURES_PER_ROW * n_rows
        self.gram = centred.T @ centred / n_rows if use_gram else None
        self.centred = None if use_gram else centred
        self.lipschitz = self._largest_eigenvalue() * LIPSCHITZ_SAFETY

    def gram_times(self, weights: torch.Tensor) -> torch.Tensor:
        """``G W`` for ``W`` of shape ``(n_features, m)``, using only W's nonzero rows."""
        support = torch.nonzero(weights.abs().amax(1) > 0).squeeze(1)
        if support.numel() == 0:
            return torch.zeros_like(weights)
        if support.numel() <= SPARSE_PRODUCT_SHARE * self.n_features:
            rows = weights.index_select(0, support)
            if self.gram is not None:
                return self.gram.index_select(1, support) @ rows
            return self.centred.T @ (self.centred.index_select(1, support) @ rows) / self.n_rows
        if self.gram is not None:
            return self.gram @ weights
        return self.centred.T @ (self.centred @ weights) / self.n_rows

    def cross(self, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Statistics of targets ``Y`` ``(n_rows, m)`` observed on the same rows.

        Returns:
            ``X_cᵀY_c / n`` ``(n_features, m)``, the means ``ȳ`` ``(m,)`` and ``‖Y_c‖² / n``
            ``(m,)`` in float64.
        """
        if Y.shape[0] != self.n_rows:
            raise ValueError(f"Y has {Y.shape[0]} rows, the design {self.n_rows}")
        y_mean = Y.mean(0)
        centred = Y - y_mean
        design = self.centred if self.centred is not None else self.rows - self.mean
        xty = design.T @ centred / self.n_rows
        return xty, y_mean, centred.double().pow(2).mean(0)

    def intercept(self, weights: torch.Tensor, y_mean: torch.Tensor) -> torch.Tensor:
        """``b = ȳ − x̄ᵀW`` ``(m,)``."""
        return y_mean - self.mean @ weights

    def _largest_eigenvalue(self) -> float:
        generator = torch.Generator(device="cpu").manual_seed(0)
        vector = torch.randn(self.n_features, 1, generator=generator, dtype=torch.float64)
        vector = vector.to(device=self.mean.device, dtype=self.mean.dtype)
        value = 0.0
        for _ in range(POWER_ITERATIONS):
            norm = vector.norm()
            if not norm > 0:
                break
            vector = vector / norm
            image = self.gram_times(vector)
            value = float((vector * image).sum())
            vector = image
        return max(value, float(torch.finfo(self.mean.dtype).eps))


def duality_gap(
    weights: torch.Tensor,
    gram_weights: torch.Tensor,
    xty: torch.Tensor,
    yy: torch.Tensor,
    lambdas: torch.Tensor,
) -> torch.Tensor:
    """Duality gap of each target's lasso (scikit-learn's, divided by ``n``), float64 ``(m,)``.

    Args:
        weights: ``(n_features, m)`` current weights ``W``.
        gram_weights: ``G W``.
        xty: ``X_cᵀY_c / n``.
        yy: ``‖Y_c‖² / n`` (float64).
        lambdas: ``(m,)``.
    """
    double = torch.float64
    lambdas = lambdas.double()
    w_xty = (weights * xty).sum(0, dtype=double)
    # ‖r‖²/n = ‖y_c‖²/n − 2wᵀX_cᵀy_c/n + wᵀGw
    residual_sq = (yy - 2 * w_xty + (weights * gram_weights).sum(0, dtype=double)).clamp_min(0)
    residual_y = yy - w_xty  # rᵀy_c / n
    dual_norm = (xty - gram_weights).abs().amax(0).double()  # ‖X_cᵀr‖∞ / n
    # scale the residual into the dual feasible set ‖X_cᵀθ‖∞ ≤ λ
    scale = torch.where(dual_norm > lambdas, lambdas / dual_norm.clamp_min(1e-300), 1.0)
    return (
        0.5 * residual_sq * (1 + scale**2)
        + lambdas * weights.abs().sum(0, dtype=double)
        - scale * residual_y
    )


def solve_lasso(
    design: CentredDesign,
    xty: torch.Tensor,
    yy: torch.Tensor,
    lambdas: torch.Tensor,
    start: torch.Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched FISTA for all targets at one λ each, warm-started at ``start``.

    Args:
        design: the centred rows.
        xty: ``(n_features, m)`` ``X_cᵀY_c / n``.
        yy: ``(m,)`` ``‖Y_c‖² / n`` (float64).
        lambdas: ``(m,)`` penalty of each target.
        start: ``(n_features, m)`` initial weights.
        tol: stop a target once its duality gap is at most ``tol · ‖y_c‖² / n``.
        max_iter: iterations at most.

    Returns:
        ``(weights (n_features, m), n_iter (m,), gap (m,))`` with the gap relative to
        ``‖y_c‖² / n``; targets still above the tolerance after ``max_iter`` iterations keep their
        last iterate.
    """
    n_targets = xty.shape[1]
    weights_out = start.clone()
    iterations_out = torch.full((n_targets,), max_iter, dtype=torch.long)
    gaps_out = torch.full((n_targets,), math.inf, dtype=torch.float64)
    active = torch.arange(n_targets, device=xty.device)
    lambdas = lambdas.to(start.dtype)
    yy_active = yy

    weights = start.clone()
    gram_weights = design.gram_times(weights)
    point, gram_point = weights, gram_weights  # the extrapolated (momentum) point and G·point
    momentum = torch.ones(n_targets, dtype=start.dtype, device=start.device)
    for iteration in range(1, max_iter + 1):
        step = 1.0 / design.lipschitz
        # proximal gradient step from the momentum point: soft-threshold(v, t) = v − clamp(v, ±t)
        new = torch.sub(gram_point, xty).mul_(-step).add_(point)
        bound = step * lambdas
        new.sub_(torch.maximum(torch.minimum(new, bound), -bound))
        gram_new = design.gram_times(new)
        change, gram_change = new - weights, gram_new - gram_weights
        # Gradient-based adaptive restart: drop the momentum of targets where it points uphill.
        restart = ((point - new) * change).sum(0) > 0
        next_momentum = (1 + torch.sqrt(1 + 4 * momentum**2)) / 2
        beta = torch.where(restart, 0.0, (momentum - 1) / next_momentum)
        momentum = torch.where(restart, 1.0, next_momentum)
        check = iteration % GAP_CHECK_EVERY == 0 or iteration == max_iter
        if check:
            # Largest curvature dᵀGd/‖d‖² along this step: more than L means the power
            # iteration underestimated L (then enlarge it and drop all momentum).
            move = new - point
            seen = (move * (gram_new - gram_point)).sum(0) / (move * move).sum(0).clamp_min(1e-30)
            curvature = float(seen.amax()) if seen.numel() else 0.0
            if curvature > design.lipschitz:
                design.lipschitz = curvature * LIPSCHITZ_SAFETY
                beta = torch.zeros_like(beta)
                momentum = torch.ones_like(momentum)
        point = torch.addcmul(new, change, beta)
        gram_point = torch.addcmul(gram_new, gram_change, beta)
        weights, gram_weights = new, gram_new
        if not check:
            continue
        gap = duality_gap(weights, gram_weights, xty, yy_active, lambdas)
        done = gap <= tol * yy_active
        if iteration == max_iter:
            done[:] = True
        if not done.any():
            continue
        finished = active[done]
        weights_out[:, finished] = weights[:, done]
        iterations_out[finished.cpu()] = iteration
        gaps_out[finished.cpu()] = (gap[done] / yy_active[done].clamp_min(1e-300)).cpu()
        keep = ~done
        active = active[keep]
        if active.numel() == 0:
            break
        weights, gram_weights = weights[:, keep], gram_weights[:, keep]
        point, gram_point = point[:, keep], gram_point[:, keep]
        momentum, xty = momentum[keep], xty[:, keep]
        yy_active, lambdas = yy_active[keep], lambdas[keep]
    return weights_out, iterations_out, gaps_out


def lambda_max(xty: torch.Tensor) -> torch.Tensor:
    """The smallest λ at which every weight is zero, per target: ``max_j |X_cᵀY_c|_j / n``.

    Args:
        xty: ``(n_features, m)`` ``X_cᵀY_c / n`` (see :meth:`CentredDesign.cross`).

    Returns:
        ``(m,)``.
    """
    return xty.abs().amax(0)


def lambda_path(largest: torch.Tensor, n_steps: int, eps: float) -> torch.Tensor:
    """Geometric λ path from ``largest`` down to ``eps · largest`` in ``n_steps`` values.

    The same grid as scikit-learn's ``lasso_path(eps=eps, n_alphas=n_steps)``.

    Args:
        largest: ``(m,)`` the first λ of each target (usually :func:`lambda_max`).

    Returns:
        ``(n_steps, m)``.
    """
    if n_steps < 1:
        raise ValueError(f"the λ path needs at least 1 step, got {n_steps}")
    if not 0 < eps <= 1:
        raise ValueError(f"eps (smallest λ / largest λ) must be in (0, 1], got {eps}")
    exponents = torch.linspace(0, 1, n_steps, dtype=torch.float64)
    ratios = (eps**exponents).to(device=largest.device, dtype=largest.dtype)
    return ratios[:, None] * largest[None, :]


def as_tensor(
    values: np.ndarray | torch.Tensor, name: str, device: torch.device | str | None, dtype
) -> torch.Tensor:
    """``values`` as a tensor on ``device`` (default CPU) with ``dtype``."""
    tensor = torch.as_tensor(values)
    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8)
    if tensor.dtype.is_complex:
        raise ValueError(f"{name} must be real numbers, got {tensor.dtype}")
    return tensor.to(device=device or "cpu", dtype=dtype)


def fit_lasso_path(
    X: np.ndarray | torch.Tensor,
    Y: np.ndarray | torch.Tensor,
    lambdas: np.ndarray | torch.Tensor | float,
    *,
    tol: float = 1e-4,
    max_iter: int = 1000,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> LassoPath:
    """Lasso solutions of every target at every λ, warm-started along the path.

    Minimises ``(1/(2 n_rows))‖y_t − X w − b‖² + λ‖w‖₁`` with an unpenalised intercept ``b`` for
    each target ``t`` (scikit-learn's ``Lasso(alpha=λ, fit_intercept=True)``), on ``X`` as given:
    standardise it first if the penalty should treat features alike.

    Args:
        X: ``(n_rows, n_features)`` design.
        Y: ``(n_rows, n_targets)`` targets (or ``(n_rows,)`` for one).
        lambdas: a scalar, ``(n_lambdas,)`` shared by all targets, or ``(n_lambdas, n_targets)``;
            solved in the given order, each warm-started from the previous (decreasing is fastest).
            λ = 0 (least squares) is allowed, but its duality gap only reaches 0 when the fit is
            exact, so it runs ``max_iter`` iterations otherwise.
        tol: per target, stop once the duality gap is at most ``tol · ‖y − ȳ‖² / n_rows``
            (scikit-learn's criterion). In float32 gaps below about ``1e-6`` relative cannot be
            resolved: use ``dtype=torch.float64`` for tighter tolerances.
        max_iter: iterations at most per λ (a :class:`LassoConvergenceWarning` names the targets
            that needed more).
        device: where to compute (``"cuda"`` for a GPU); default CPU.
        dtype: floating-point type of the computation.

    Returns:
        :class:`LassoPath` with ``coef`` of shape ``(n_lambdas, n_targets, n_features)``.
    """
    X = as_tensor(X, "X", device, dtype)
    Y = as_tensor(Y, "Y", device, dtype)
    if Y.ndim == 1:
        Y = Y[:, None]
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X must be (n_rows, n_features) and Y (n_rows, n_targets) with the same rows, got "
            f"{tuple(X.shape)} and {tuple(Y.shape)}"
        )
    n_targets = Y.shape[1]
    grid = torch.as_tensor(lambdas, dtype=torch.float64)
    if grid.ndim == 0:
        grid = grid.reshape(1)
    if grid.ndim == 1:
        grid = grid[:, None].expand(-1, n_targets)
    if grid.ndim != 2 or grid.shape[1] != n_targets:
        raise ValueError(
            f"lambdas must be a scalar, (n_lambdas,) or (n_lambdas, {n_targets}), got shape "
            f"{tuple(grid.shape)}"
        )
    if bool((grid < 0).any()):
        raise ValueError("lambdas must be non-negative")
    design = CentredDesign(X)
    xty, y_mean, yy = design.cross(Y)
    weights = torch.zeros_like(xty)
    coefs, intercepts, iterations, gaps = [], [], [], []
    for step_lambdas in grid.to(device=X.device):
        weights, n_iter, gap = solve_lasso(
            design, xty, yy, step_lambdas, weights, tol=tol, max_iter=max_iter
        )
        coefs.append(weights.T.cpu().numpy())
        intercepts.append(design.intercept(weights, y_mean).cpu().numpy())
        iterations.append(n_iter.numpy())
        gaps.append(gap.numpy())
    gaps = np.stack(gaps)
    warn_unconverged(gaps, tol, max_iter)
    return LassoPath(
        np.stack(coefs), np.stack(intercepts), grid.numpy().copy(), np.stack(iterations), gaps
    )


def warn_unconverged(gaps: np.ndarray, tol: float, max_iter: int) -> None:
    """Warn when some relative duality gaps are above ``tol``."""
    unconverged = (
        int(np.any(gaps > tol, axis=0).sum()) if gaps.ndim > 1 else int((gaps > tol).sum())
    )
    if unconverged:
        warnings.warn(
            f"{unconverged} target(s) did not reach the duality-gap tolerance {tol:g} within "
            f"max_iter={max_iter} iterations (largest relative gap {np.nanmax(gaps):.3g}): raise "
            "max_iter or tol",
            LassoConvergenceWarning,
            stacklevel=3,
        )
