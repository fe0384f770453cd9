"""Datamodels (Ilyas et al. 2022): sparse linear models of each target's output on subset masks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from datatrace._estimator import NotFittedError
from datatrace._subset_data import subset_data
from datatrace.attributions import Attributions
from datatrace.lasso import (
    CentredDesign,
    lambda_max,
    lambda_path,
    solve_lasso,
    warn_unconverged,
)
from datatrace.progress import progress_bar

# Path steps taken before early stopping may end a target's path (fast_l1's min_lams_to_try):
# the validation error is flat near λ_max, where every weight is zero.
MIN_PATH_STEPS = 10


class Datamodels:
    """Fit ``output_j ≈ mask · w_j + b_j`` for every target ``j`` with an ℓ1 penalty, all at once.

    Masks are standardised (each training example's column to mean 0 and standard deviation 1
    over all subsets), so the penalty treats examples alike. For each target, the lasso
    ``(1/(2 n_rows))‖y − X w − b‖² + λ‖w‖₁`` (bias unpenalised) is solved on the training rows
    along a geometric path from ``λ_max`` (all weights zero) down to ``eps · λ_max``, each solution
    warm-starting the next; the error on held-out validation rows picks ``λ``, and the path of a
    target stops early once that error has not improved for ``early_stop_patience`` steps (after
    at least ``MIN_PATH_STEPS``). Finally each target is refit on all rows at its chosen ``λ``.
    All targets are solved together by a batched FISTA (see :mod:`datatrace.lasso`).

    The fitted weights are converted back to raw masks: ``masks @ weights_.T + bias_`` predicts the
    outputs. A training example present in every subset, or in none, has no measurable effect; its
    weight is 0.

    Args:
        l1_path_steps: number of λ values on the path.
        eps: smallest λ of the path as a fraction of ``λ_max``.
        val_fraction: share of the subsets held out to choose ``λ`` (at least 2 rows).
        early_stop_patience: path steps without a new best validation error before a target stops.
        max_iter: solver iterations at most per λ.
        tol: per target and λ, stop once the duality gap is at most ``tol · ‖y − ȳ‖²/n_rows``.
        device: where to compute (default CPU; ``"cuda"`` for a GPU).
        dtype: floating-point type of the computation.
        batch_targets: targets solved together (default all); fewer need less memory, about
            ``8 · n_train · batch_targets`` numbers on the device besides the ``n_train²`` Gram.
        seed: seed of the random choice of validation rows.
        progress: show a progress bar.

    Attributes (after ``fit``):
        weights_: ``(n_targets, n_train)`` weights for raw 0/1 masks.
        bias_: ``(n_targets,)`` intercepts for raw masks.
        lambda_: ``(n_targets,)`` chosen λ (for standardised masks).
        lambda_path_: ``(l1_path_steps, n_targets)`` the λ path of each target.
        val_mse_path_: ``(l1_path_steps, n_targets)`` validation mean squared error along the path,
            NaN after the target stopped early.
        path_steps_: ``(n_targets,)`` path steps computed before stopping.
        n_iter_: ``(n_targets,)`` solver iterations, path and refit together.
        max_gap_: ``(n_targets,)`` largest duality gap reached at any λ, relative to
            ``‖y − ȳ‖²/n_rows`` (above ``tol`` only where ``max_iter`` was too small).
        mask_mean_, mask_std_: ``(n_train,)`` standardisation of the masks (``std`` 0 for
            examples in every subset or in none).
        val_rows_: indices of the validation subsets.
        attributions_: the :class:`~datatrace.Attributions` (also returned by
            :meth:`attributions`), with ``bias`` and ``lambda`` in its ``info``.
    """

    def __init__(
        self,
        *,
        l1_path_steps: int = 100,
        eps: float = 1e-4,
        val_fraction: float = 0.1,
        early_stop_patience: int = 3,
        max_iter: int = 1000,
        tol: float = 1e-4,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        batch_targets: int | None = None,
        seed: int = 0,
        progress: bool = True,
    ):
        self.l1_path_steps = l1_path_steps
        self.eps = eps
        self.val_fraction = val_fraction
        self.early_stop_patience = early_stop_patience
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.dtype = dtype
        self.batch_targets = batch_targets
        self.seed = seed
        self.progress = progress

    def config(self) -> dict[str, Any]:
        """The settings, JSON-serialisable."""
        return {
            "l1_path_steps": self.l1_path_steps,
            "eps": self.eps,
            "val_fraction": self.val_fraction,
            "early_stop_patience": self.early_stop_patience,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "dtype": str(self.dtype).removeprefix("torch."),
            "seed": self.seed,
        }

    def _check_settings(self, n_rows: int) -> int:
        """Validate the settings; return the number of validation rows."""
        if self.l1_path_steps < 1:
            raise ValueError(f"l1_path_steps must be at least 1, got {self.l1_path_steps}")
        if self.early_stop_patience < 1:
            raise ValueError(
                f"early_stop_patience must be at least 1, got {self.early_stop_patience}"
            )
        if self.max_iter < 1 or self.tol <= 0:
            raise ValueError(f"need max_iter ≥ 1 and tol > 0, got {self.max_iter} and {self.tol}")
        if self.batch_targets is not None and self.batch_targets < 1:
            raise ValueError(f"batch_targets must be positive, got {self.batch_targets}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        n_val = math.ceil(self.val_fraction * n_rows)
        if n_val < 2 or n_rows - n_val < 2:
            raise ValueError(
                f"{n_rows} subsets are too few to hold out val_fraction={self.val_fraction} "
                f"({n_val} rows) for choosing λ and fit on the rest: need at least 2 of each"
            )
        return n_val

    def fit(self, masks: Any, outputs: Any = None) -> Datamodels:
        """Fit one sparse linear model per target.

        Args:
            masks: ``(n_subsets, n_train)`` bool or 0/1, or an object with ``.masks`` and
                ``.outputs`` (e.g. ``SubsetExperiment(...).results()``).
            outputs: ``(n_subsets, n_targets)``, or ``(n_subsets, n_seeds, n_targets)`` averaged
                over seeds.

        Returns:
            ``self``.
        """
        masks, outputs = subset_data(masks, outputs)
        n_rows, n_train = masks.shape
        n_targets = outputs.shape[1]
        n_val = self._check_settings(n_rows)
        device = torch.device(self.device) if self.device is not None else torch.device("cpu")
        permutation = np.random.default_rng(self.seed).permutation(n_rows)
        val_rows, train_rows = np.sort(permutation[:n_val]), np.sort(permutation[n_val:])

        standardised = torch.as_tensor(masks, device=device).to(self.dtype)
        mean = standardised.mean(0)
        std = standardised.std(0, correction=0)
        scale = torch.where(std > 0, std, torch.ones_like(std))
        # Examples in every subset or in none become zero columns: weight 0, no effect.
        standardised.sub_(mean).div_(scale)
        train_index = torch.as_tensor(train_rows, device=device)
        val_index = torch.as_tensor(val_rows, device=device)
        path_design = CentredDesign(standardised.index_select(0, train_index))
        val_design = standardised.index_select(0, val_index)
        full_design = CentredDesign(standardised)

        batch = self.batch_targets or n_targets
        self.weights_ = np.zeros((n_targets, n_train), dtype=np.float32)
        self.bias_ = np.zeros(n_targets)
        self.lambda_ = np.zeros(n_targets)
        self.lambda_path_ = np.zeros((self.l1_path_steps, n_targets))
        self.val_mse_path_ = np.full((self.l1_path_steps, n_targets), np.nan)
        self.path_steps_ = np.zeros(n_targets, dtype=np.int64)
        self.n_iter_ = np.zeros(n_targets, dtype=np.int64)
        self.max_gap_ = np.zeros(n_targets)
        total = -(-n_targets // batch) * (self.l1_path_steps + 1)
        with progress_bar(total, "datamodels", self.progress) as advance:
            for lo in range(0, n_targets, batch):
                hi = min(lo + batch, n_targets)
                Y = torch.as_tensor(outputs[:, lo:hi], device=device).to(self.dtype)
                weights, lambdas = self._path(
                    path_design, val_design, Y[train_index], Y[val_index], lo, advance
                )
                xty, y_mean, yy = full_design.cross(Y)
                weights, n_iter, gap = solve_lasso(
                    full_design, xty, yy, lambdas, weights, tol=self.tol, max_iter=self.max_iter
                )
                advance(1)
                bias = full_design.intercept(weights, y_mean)
                # Back to raw masks: w_raw = w / σ, b_raw = b − Σ μ w / σ.
                raw_weights = weights / scale[:, None] * (std > 0)[:, None]
                raw_bias = bias - mean @ raw_weights
                self.weights_[lo:hi] = raw_weights.T.cpu().numpy()
                self.bias_[lo:hi] = raw_bias.double().cpu().numpy()
                self.lambda_[lo:hi] = lambdas.double().cpu().numpy()
                self.n_iter_[lo:hi] += n_iter.numpy()
                self.max_gap_[lo:hi] = np.maximum(self.max_gap_[lo:hi], gap.numpy())
        warn_unconverged(self.max_gap_, self.tol, self.max_iter)
        self.mask_mean_ = mean.double().cpu().numpy()
        self.mask_std_ = std.double().cpu().numpy()
        self.val_rows_ = val_rows
        self.attributions_ = Attributions(
            self.weights_,
            "datamodels",
            info={
                **self.config(),
                "bias": self.bias_.tolist(),
                "lambda": self.lambda_.tolist(),
                "n_subsets": n_rows,
                "n_val": n_val,
                "mean_path_steps": float(self.path_steps_.mean()),
            },
        )
        return self

    def _path(
        self,
        design: CentredDesign,
        val_design: torch.Tensor,
        Y_train: torch.Tensor,
        Y_val: torch.Tensor,
        offset: int,
        advance,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the λ path of one batch of targets with early stopping on the validation rows.

        Returns:
            ``(weights (n_train, m) at the best λ, best λ (m,))``.
        """
        xty, y_mean, yy = design.cross(Y_train)
        m = xty.shape[1]
        path = lambda_path(lambda_max(xty), self.l1_path_steps, self.eps)
        weights = torch.zeros_like(xty)
        best_weights = torch.zeros_like(xty)
        best_mse = torch.full((m,), math.inf, dtype=torch.float64, device=xty.device)
        best_step = torch.zeros(m, dtype=torch.long, device=xty.device)
        since_best = torch.zeros(m, dtype=torch.long, device=xty.device)
        active = torch.arange(m, device=xty.device)
        columns = slice(offset, offset + m)
        self.lambda_path_[:, columns] = path.double().cpu().numpy()
        for step in range(self.l1_path_steps):
            solution, n_iter, gap = solve_lasso(
                design,
                xty[:, active],
                yy[active],
                path[step, active],
                weights[:, active],
                tol=self.tol,
                max_iter=self.max_iter,
            )
            weights[:, active] = solution
            rows = offset + active.cpu().numpy()
            self.n_iter_[rows] += n_iter.numpy()
            self.max_gap_[rows] = np.maximum(self.max_gap_[rows], gap.numpy())
            bias = design.intercept(solution, y_mean[active])
            errors = Y_val[:, active] - val_design @ solution - bias
            mse = errors.double().pow(2).mean(0)
            self.val_mse_path_[step, rows] = mse.cpu().numpy()
            improved = mse < best_mse[active]
            better = active[improved]
            best_mse[better] = mse[improved]
            best_step[better] = step
            best_weights[:, better] = solution[:, improved]
            since_best[active] = torch.where(improved, 0, since_best[active] + 1)
            self.path_steps_[rows] = step + 1
            advance(1)
            if step + 1 >= MIN_PATH_STEPS:
                active = active[since_best[active] < self.early_stop_patience]
            if active.numel() == 0:
                advance(self.l1_path_steps - step - 1)
                break
        return best_weights, path.gather(0, best_step[None, :])[0]

    def attributions(self) -> Attributions:
        """The weights as :class:`~datatrace.Attributions` ``(n_targets, n_train)``.

        ``info["bias"]`` and ``info["lambda"]`` hold each target's intercept and chosen λ, so that
        :func:`datatrace.evaluate.predict_outputs` predicts outputs including the bias.
        """
        if not hasattr(self, "attributions_"):
            raise NotFittedError("these Datamodels are not fitted yet: call fit(masks, outputs)")
        return self.attributions_

    def predict(self, masks: Any) -> np.ndarray:
        """Predicted outputs ``masks @ weights_.T + bias_`` ``(n_subsets, n_targets)``."""
        from datatrace.evaluate import predict_outputs

        return predict_outputs(self.attributions(), masks)
