"""Datamodels (Ilyas et al. 2022): sparse linear models of each target's output on subset masks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from datatrace._arguments import named_device, non_negative_integer, positions, positive_integer
from datatrace._estimator import NotFittedError
from datatrace._subset_data import subset_data
from datatrace.attributions import Attributions
from datatrace.evaluation.lds import column_spearman
from datatrace.methods.lasso import (
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
# How λ is chosen: cross-validation pooled across targets on the LDS or the squared error, or
# (the earlier default) each target's own error on one held-out split.
SELECTIONS = ("lds", "mse", "validation")
# Standard errors by which the re-estimated joint effect of a group must differ from the sum of
# its weights to replace it (Datamodels.contribution): at 3, 0.4% of the outputs of a random
# forget set switch (noise), 5.5% of a coherent one's (docs/unlearning.md).
GROUP_TEST_Z = 3.0


class Datamodels:
    """Fit ``output_j ≈ mask · w_j + b_j`` for every target ``j`` with an ℓ1 penalty, all at once.

    Masks are standardised (each training example's column to mean 0 and standard deviation 1
    over all subsets), so the penalty treats examples alike. For each target, the lasso
    ``(1/(2 n_rows))‖y − X w − b‖² + λ‖w‖₁`` (bias unpenalised) is solved along a geometric
    path of ``λ``, each solution warm-starting the next, and all targets are solved together by
    a batched FISTA (see :mod:`datatrace.methods.lasso`).

    Choosing ``λ`` (``selection``, docs/datamodels.md):

    - ``"lds"`` (default) and ``"mse"``: ``cv_folds``-fold cross-validation pooled across
      targets. The path is shared by all targets, from the largest ``λ_max`` of any target (every
      weight zero) down to ``eps`` times their median; each fold's held-out subsets score every
      step for every target — by the Spearman correlation of predicted and measured outputs
      (what the LDS measures; a constant prediction scores 0) or by the squared error relative to
      the output's variance — and a target takes the step that maximises its own mean score plus
      ``target_shrinkage`` times the mean score of all targets. With 100 subsets one target's
      cross-validation is too noisy to choose by, and the pooled score (a shared λ scale) wins;
      with thousands, targets can afford their own λ. The shared path stops once the pooled
      score has not improved for ``early_stop_patience`` steps (after ``MIN_PATH_STEPS``). Each
      target is then refit on all subsets at its step (and averaged with the folds' fits,
      ``cv_averaging``).
    - ``"validation"``: the earlier rule. A path per target from its own ``λ_max`` down to
      ``eps · λ_max`` on all but ``val_fraction`` of the subsets, the squared error on those
      picking ``λ``, each target stopping early once that error has not improved for
      ``early_stop_patience`` steps; then a refit on all rows.

    The fitted weights are converted back to raw masks: ``masks @ weights_.T + bias_`` predicts the
    outputs. A training example present in every subset, or in none, has no measurable effect; its
    weight is 0.

    Args:
        l1_path_steps: number of λ values on the path.
        eps: smallest λ of the path as a fraction of ``λ_max`` (of the targets' median ``λ_max``
            for the pooled selections).
        selection: ``"lds"``, ``"mse"`` or ``"validation"`` (see above).
        cv_folds: folds of the pooled cross-validation (at least 2 subsets each).
        target_shrinkage: weight of the pooled score in each target's choice (``math.inf``: one
            step for all targets; 0: each target on its own).
        cv_averaging: pooled selections: the weights are the mean of the refit on all subsets
            and of the mean of the folds' fits at the chosen step (bagging the folds: a little
            less variance, measured +0.003 LDS on the digits at 100–2000 subsets); off, the
            refit alone, a lasso solution at ``lambda_``.
        relax: the relaxed lasso's debiasing, in ``[0, 1]``: each target's final weights move
            this share of the way to the least-squares fit on their own support (0: off, the
            lasso as it is; 1: least squares on the selected examples). It undoes the ℓ1
            shrinkage of the selected effects, not the zeros of the others.
        val_fraction: ``"validation"`` only: share of the subsets held out to choose ``λ``.
        early_stop_patience: path steps without a new best score before the path stops.
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
        lambda_path_: ``(l1_path_steps, n_targets)`` the λ path of each target (the same for
            every target with the pooled selections).
        cv_score_path_: ``(l1_path_steps, n_targets)`` pooled selections: mean cross-validated
            score of each target at each step (higher is better), NaN after the path stopped.
        val_mse_path_: ``(l1_path_steps, n_targets)`` ``"validation"``: validation mean squared
            error along the path, NaN after the target stopped early.
        path_steps_: ``(n_targets,)`` path steps computed before stopping.
        chosen_step_: ``(n_targets,)`` the path step each target was refit at.
        n_iter_: ``(n_targets,)`` solver iterations, path and refit together.
        max_gap_: ``(n_targets,)`` largest duality gap reached at any λ, relative to
            ``‖y − ȳ‖²/n_rows`` (above ``tol`` only where ``max_iter`` was too small).
        mask_mean_, mask_std_: ``(n_train,)`` standardisation of the masks (``std`` 0 for
            examples in every subset or in none).
        val_rows_: ``"validation"``: indices of the validation subsets.
        fold_of_: pooled selections: ``(n_subsets,)`` the cross-validation fold of each subset.
        attributions_: the :class:`~datatrace.Attributions` (also returned by
            :meth:`attributions`), with ``bias`` and ``lambda`` in its ``info``.
    """

    def __init__(
        self,
        *,
        l1_path_steps: int = 100,
        eps: float = 1e-4,
        selection: str = "lds",
        cv_folds: int = 5,
        target_shrinkage: float = 3.0,
        cv_averaging: bool = True,
        relax: float = 0.0,
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
        self.selection = selection
        self.cv_folds = cv_folds
        self.target_shrinkage = target_shrinkage
        self.cv_averaging = cv_averaging
        self.relax = relax
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
            "selection": self.selection,
            "cv_folds": self.cv_folds,
            "target_shrinkage": self.target_shrinkage,
            "cv_averaging": self.cv_averaging,
            "relax": self.relax,
            "val_fraction": self.val_fraction,
            "early_stop_patience": self.early_stop_patience,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "dtype": str(self.dtype).removeprefix("torch."),
            "seed": self.seed,
        }

    def _check_settings(self, n_rows: int) -> int:
        """Validate the settings; return the number of validation rows."""
        for name in ("l1_path_steps", "early_stop_patience", "max_iter", "cv_folds"):
            positive_integer(name, getattr(self, name))
        if self.batch_targets is not None:
            positive_integer("batch_targets", self.batch_targets, " or None")
        non_negative_integer("seed", self.seed)
        if not self.tol > 0:
            raise ValueError(f"tol must be positive, got {self.tol!r}")
        if not 0 < self.eps < 1:
            raise ValueError(
                f"eps is the smallest λ of the path as a fraction of λ_max, in (0, 1); got "
                f"{self.eps!r}"
            )
        if not 0 <= self.relax <= 1:
            raise ValueError(f"relax must be in [0, 1], got {self.relax}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.selection != "validation":
            if not self.target_shrinkage >= 0:
                raise ValueError(
                    f"target_shrinkage must be non-negative, got {self.target_shrinkage}"
                )
            if self.cv_folds < 2:
                raise ValueError(
                    f"cv_folds must be at least 2 (one fold to fit, one to score), got "
                    f"{self.cv_folds}; or selection='validation' for one held-out share"
                )
            if n_rows < 2 * self.cv_folds:
                raise ValueError(
                    f"{n_rows} subsets are too few for cv_folds={self.cv_folds}: need at least 2 "
                    "folds of at least 2 subsets each"
                )
            return 0
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

        Raises:
            ValueError: bad settings, masks and outputs that do not match, or masks that are
                all the same.
        """
        masks, outputs = subset_data(masks, outputs)
        n_rows, n_train = masks.shape
        n_targets = outputs.shape[1]
        n_val = self._check_settings(n_rows)
        if (masks == masks[:1]).all():
            raise ValueError(
                f"the {n_rows} masks are all the same, so no training example's effect can be "
                "estimated: the masks must say which examples each model was trained on (True "
                "where included), and the subsets must differ (e.g. random halves)"
            )
        device = named_device(self.device) if self.device is not None else torch.device("cpu")

        standardised = torch.as_tensor(masks, device=device).to(self.dtype)
        mean = standardised.mean(0)
        std = standardised.std(0, correction=0)
        scale = torch.where(std > 0, std, torch.ones_like(std))
        # Examples in every subset or in none become zero columns: weight 0, no effect.
        standardised.sub_(mean).div_(scale)
        full_design = CentredDesign(standardised)

        batch = self.batch_targets or n_targets
        self.weights_ = np.zeros((n_targets, n_train), dtype=np.float32)
        self.bias_ = np.zeros(n_targets)
        self.lambda_ = np.zeros(n_targets)
        self.lambda_path_ = np.zeros((self.l1_path_steps, n_targets))
        self.val_mse_path_ = np.full((self.l1_path_steps, n_targets), np.nan)
        self.cv_score_path_ = np.full((self.l1_path_steps, n_targets), np.nan)
        self.path_steps_ = np.zeros(n_targets, dtype=np.int64)
        self.chosen_step_ = np.zeros(n_targets, dtype=np.int64)
        self.n_iter_ = np.zeros(n_targets, dtype=np.int64)
        self.max_gap_ = np.zeros(n_targets)
        batches = [(lo, min(lo + batch, n_targets)) for lo in range(0, n_targets, batch)]

        def target_block(lo: int, hi: int) -> torch.Tensor:
            return torch.as_tensor(outputs[:, lo:hi], device=device).to(self.dtype)

        if self.selection == "validation":
            weights_of = self._fit_validation(
                standardised, full_design, target_block, batches, n_val, n_rows
            )
        else:
            weights_of = self._fit_cross_validated(
                standardised, full_design, target_block, batches, n_rows
            )
        for (lo, hi), (weights, y_mean) in zip(batches, weights_of):
            if self.relax:
                weights = self._relaxed(standardised, target_block(lo, hi), weights)
            bias = full_design.intercept(weights, y_mean)
            # Back to raw masks: w_raw = w / σ, b_raw = b − Σ μ w / σ.
            raw_weights = weights / scale[:, None] * (std > 0)[:, None]
            raw_bias = bias - mean @ raw_weights
            self.weights_[lo:hi] = raw_weights.T.cpu().numpy()
            self.bias_[lo:hi] = raw_bias.double().cpu().numpy()
        warn_unconverged(self.max_gap_, self.tol, self.max_iter)
        self.mask_mean_ = mean.double().cpu().numpy()
        self.mask_std_ = std.double().cpu().numpy()
        # kept for contribution(): joint effects are re-estimated from the fitting subsets
        self._fit_masks = np.asarray(masks, dtype=np.float32)
        self._fit_outputs = np.asarray(outputs, dtype=np.float64)
        self._contribution_cache = None
        self.attributions_ = Attributions(
            self.weights_,
            "datamodels",
            info={
                **self.config(),
                "bias": self.bias_.tolist(),
                "lambda": self.lambda_.tolist(),
                "n_subsets": n_rows,
                "mean_path_steps": float(self.path_steps_.mean()),
                "mean_chosen_step": float(self.chosen_step_.mean()),
            },
        )
        return self

    def _fit_validation(self, standardised, full_design, target_block, batches, n_val, n_rows):
        """``selection="validation"``: per-target paths and early stopping on one held-out split;
        returns the refit ``(weights, y_mean)`` of each batch."""
        device = standardised.device
        permutation = np.random.default_rng(self.seed).permutation(n_rows)
        val_rows, train_rows = np.sort(permutation[:n_val]), np.sort(permutation[n_val:])
        train_index = torch.as_tensor(train_rows, device=device)
        val_index = torch.as_tensor(val_rows, device=device)
        path_design = CentredDesign(standardised.index_select(0, train_index))
        val_design = standardised.index_select(0, val_index)
        self.val_rows_ = val_rows
        fitted = []
        total = len(batches) * (self.l1_path_steps + 1)
        with progress_bar(total, "datamodels", self.progress) as advance:
            for lo, hi in batches:
                Y = target_block(lo, hi)
                weights, lambdas, steps = self._path(
                    path_design, val_design, Y[train_index], Y[val_index], lo, advance
                )
                xty, y_mean, yy = full_design.cross(Y)
                weights, n_iter, gap = solve_lasso(
                    full_design, xty, yy, lambdas, weights, tol=self.tol, max_iter=self.max_iter
                )
                advance(1)
                self._record(lo, hi, lambdas, n_iter, gap)
                self.chosen_step_[lo:hi] = steps
                fitted.append((weights, y_mean))
        return fitted

    def _fit_cross_validated(self, standardised, full_design, target_block, batches, n_rows):
        """``selection="lds"`` or ``"mse"``: the shared path, cross-validated scores, pooled
        choices and the refit; returns the refit ``(weights, y_mean)`` of each batch."""
        device = standardised.device
        folds = self.cv_folds
        fold_of = np.empty(n_rows, dtype=np.int64)
        fold_of[np.random.default_rng(self.seed).permutation(n_rows)] = np.arange(n_rows) % folds
        self.fold_of_ = fold_of
        largest = torch.cat(
            [lambda_max(full_design.cross(target_block(lo, hi))[0]) for lo, hi in batches]
        )
        top = float(largest.max())
        bottom = self.eps * float(largest.median())
        if not top > 0:  # every output constant: nothing to fit
            top = bottom = 1.0
        ratios = torch.linspace(0, 1, self.l1_path_steps, dtype=torch.float64)
        path = top * (min(bottom, top) / top) ** ratios
        path = path.to(device=device, dtype=self.dtype)
        self.lambda_path_[:] = path.double().cpu().numpy()[:, None]
        designs = []
        for fold in range(folds):
            inside = torch.as_tensor(np.flatnonzero(fold_of != fold), device=device)
            outside = torch.as_tensor(np.flatnonzero(fold_of == fold), device=device)
            held_out = standardised.index_select(0, outside)
            designs.append(
                (CentredDesign(standardised.index_select(0, inside)), inside, held_out, outside)
            )
        total = len(batches) * (2 * folds + 1) * self.l1_path_steps
        with progress_bar(total, "datamodels", self.progress) as advance:
            for lo, hi in batches:
                self._cross_validate(designs, target_block(lo, hi), path, lo, advance)
            reached = ~np.isnan(self.cv_score_path_)
            pooled = np.where(
                reached.any(1),
                np.where(reached, self.cv_score_path_, 0).sum(1) / np.maximum(reached.sum(1), 1),
                -np.inf,
            )
            own = np.where(reached, self.cv_score_path_, -np.inf)
            if math.isinf(self.target_shrinkage):
                self.chosen_step_[:] = int(np.argmax(pooled))
            else:
                shrunk = own + self.target_shrinkage * pooled[:, None]
                self.chosen_step_[:] = shrunk.argmax(0)
            fitted = []
            for lo, hi in batches:
                Y = target_block(lo, hi)
                chosen = torch.as_tensor(self.chosen_step_[lo:hi], device=device)
                xty, y_mean, yy = full_design.cross(Y)
                weights = self._weights_at(full_design, xty, yy, chosen, path, lo, hi)
                if self.cv_averaging:
                    folded = torch.zeros_like(weights)
                    for design, inside, _, _ in designs:
                        fold_xty, _, fold_yy = design.cross(Y.index_select(0, inside))
                        folded += self._weights_at(design, fold_xty, fold_yy, chosen, path, lo, hi)
                    weights = (weights + folded / folds) / 2
                advance((folds + 1) * self.l1_path_steps)
                self.lambda_[lo:hi] = path[chosen].double().cpu().numpy()
                fitted.append((weights, y_mean))
        return fitted

    def _cross_validate(self, designs, Y, path, offset, advance) -> None:
        """Fill ``cv_score_path_`` for the targets ``Y`` ``(n_rows, m)`` starting at ``offset``.

        ``designs``: per fold, ``(design of the fitting subsets, their indices, held-out rows
        of the standardised masks, their indices)``.
        """
        m = Y.shape[1]
        columns = slice(offset, offset + m)
        if self.selection == "mse":
            variance = Y.double().var(0, correction=0).cpu().numpy()
            variance = np.where(variance > 0, variance, 1.0)
        folds = []
        for design, inside, held_out, outside in designs:
            xty, y_mean, yy = design.cross(Y.index_select(0, inside))
            measured = Y.index_select(0, outside).double().cpu().numpy()
            folds.append([design, held_out, measured, xty, y_mean, yy, torch.zeros_like(xty)])
        best, since_best = -math.inf, 0
        for step in range(self.l1_path_steps):
            scores = np.zeros(m)
            for fold in folds:
                design, held_out, measured, xty, y_mean, yy, weights = fold
                weights, n_iter, gap = solve_lasso(
                    design, xty, yy, path[step].expand(m), weights, tol=self.tol,
                    max_iter=self.max_iter,
                )  # fmt: skip
                fold[-1] = weights
                self.n_iter_[columns] += n_iter.numpy()
                self.max_gap_[columns] = np.maximum(self.max_gap_[columns], gap.numpy())
                predicted = held_out @ weights + design.intercept(weights, y_mean)
                predicted = predicted.double().cpu().numpy()
                if self.selection == "lds":
                    # a constant prediction (no weight yet) predicts nothing: 0, not undefined
                    scores += np.nan_to_num(column_spearman(predicted, measured))
                else:
                    scores -= ((predicted - measured) ** 2).mean(0) / variance
            scores /= len(folds)
            self.cv_score_path_[step, columns] = scores
            self.path_steps_[columns] = step + 1
            advance(len(folds))
            pooled = float(scores.mean())
            if pooled > best:
                best, since_best = pooled, 0
            else:
                since_best += 1
            if step + 1 >= MIN_PATH_STEPS and since_best >= self.early_stop_patience:
                advance(len(folds) * (self.l1_path_steps - step - 1))
                return

    def _relaxed(self, standardised, Y, weights) -> torch.Tensor:
        """The relaxed lasso: each target's weights moved by ``relax`` towards the least-squares
        fit of its outputs on the same support (the lasso's selection kept, its shrinkage undone
        in part). A support with as many examples as subsets − 1 or more is left as it is."""
        design = standardised.double().cpu().numpy()
        design = design - design.mean(0)
        outputs = Y.double().cpu().numpy()
        outputs = outputs - outputs.mean(0)
        relaxed = weights.double().cpu().numpy()
        for j in range(relaxed.shape[1]):
            support = np.flatnonzero(relaxed[:, j])
            if support.size == 0 or support.size >= len(design) - 1:
                continue
            least_squares = np.linalg.lstsq(design[:, support], outputs[:, j], rcond=None)[0]
            relaxed[support, j] += self.relax * (least_squares - relaxed[support, j])
        return torch.as_tensor(relaxed, dtype=weights.dtype, device=weights.device)

    def _weights_at(self, design, xty, yy, chosen, path, lo, hi) -> torch.Tensor:
        """Lasso weights of each target at its own step ``chosen`` of the shared ``path``,
        warm-started along it."""
        weights = torch.zeros_like(xty)
        result = torch.zeros_like(xty)
        for step in range(int(chosen.max()) + 1):
            weights, n_iter, gap = solve_lasso(
                design, xty, yy, path[step].expand(hi - lo), weights, tol=self.tol,
                max_iter=self.max_iter,
            )  # fmt: skip
            self._record(lo, hi, None, n_iter, gap)
            at_step = chosen == step
            result[:, at_step] = weights[:, at_step]
        return result

    def _record(self, lo, hi, lambdas, n_iter, gap) -> None:
        if lambdas is not None:
            self.lambda_[lo:hi] = lambdas.double().cpu().numpy()
        self.n_iter_[lo:hi] += n_iter.numpy()
        self.max_gap_[lo:hi] = np.maximum(self.max_gap_[lo:hi], gap.numpy())

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
        return best_weights, path.gather(0, best_step[None, :])[0], best_step.cpu().numpy()

    def contribution(self, indices: Any, estimate: str = "auto") -> np.ndarray:
        """What the training examples ``indices`` contribute together to each target's output:
        the output of a model trained on all of them minus that of one trained without them,
        ``(n_targets,)``.

        - ``"sum"``: ``Σ_{i∈F} w_i``, the datamodels' prediction. The ℓ1 penalty shrinks small
          weights to zero, so the joint contribution of many examples with small effects of one
          sign (most of one class) is underestimated, by 6× on the digits' coherent forget set.
        - ``"group"``: the joint contribution re-estimated from the fitting subsets, as one
          unpenalised coefficient: each subset's output, minus what the datamodels predict from
          the other examples, regressed on how many of ``indices`` the subset held, times
          ``|F|``. Unbiased for a linear joint effect, with the standard error of one
          regression coefficient on ``n_subsets`` rows.
        - ``"auto"`` (default): per target, the group estimate where it differs from the sum by
          more than :data:`GROUP_TEST_Z` of its standard errors, the sum elsewhere. A coherent
          set's joint effect on the outputs it moves stands out of the regression's noise; a
          random set's, and every effect on outputs it does not move, does not, and there the
          less noisy sum stands (measured in docs/unlearning.md: replacing the sum everywhere
          doubles the KLoM of retained examples).

        Used by :func:`datatrace.datamodel_matching` when it is given these datamodels.

        Args:
            indices: ``(|F|,)`` training indices.
            estimate: ``"auto"``, ``"group"`` or ``"sum"``.

        Returns:
            ``(n_targets,)`` float64.
        """
        if not hasattr(self, "attributions_"):
            raise NotFittedError("these Datamodels are not fitted yet: call fit(masks, outputs)")
        if estimate not in ("auto", "group", "sum"):
            raise ValueError(f"estimate must be 'auto', 'group' or 'sum', got {estimate!r}")
        n_train = self.weights_.shape[1]
        chosen = np.unique(positions(indices, n_train, "indices"))
        if chosen.size == 0 or chosen.min() < 0 or chosen.max() >= n_train:
            raise ValueError(
                f"indices must be a non-empty list of training indices in [0, {n_train}), got "
                f"{np.asarray(indices).tolist()[:10]}"
            )
        key = (chosen.tobytes(), estimate)
        cached = getattr(self, "_contribution_cache", None)
        if cached is not None and cached[0] == key:  # one forget set, many models to unlearn
            return cached[1].copy()
        result = self._contribution(chosen, estimate)
        self._contribution_cache = (key, result)
        return result.copy()

    def _contribution(self, chosen: np.ndarray, estimate: str) -> np.ndarray:
        weights = self.weights_.astype(np.float64)
        total = weights[:, chosen].sum(axis=1)
        if estimate == "sum":
            return total
        masks = self._fit_masks
        count = masks[:, chosen].sum(axis=1).astype(np.float64)
        count -= count.mean()
        spread = float(count @ count)
        if not spread > 0:
            raise ValueError(
                "the examples' count is the same in every fitting subset, so their joint effect "
                "cannot be estimated from them: use estimate='sum'"
            )
        others = weights.copy()
        others[:, chosen] = 0.0
        residual = self._fit_outputs - masks @ others.T
        residual -= residual.mean(axis=0)
        slope = count @ residual / spread
        group = slope * len(chosen)
        if estimate == "group":
            return group
        unexplained = residual - count[:, None] * slope[None, :]
        dof = max(len(count) - 2, 1)
        standard_error = np.sqrt((unexplained**2).sum(axis=0) / dof / spread) * len(chosen)
        return np.where(np.abs(group - total) > GROUP_TEST_Z * standard_error, group, total)

    def attributions(self) -> Attributions:
        """The weights as :class:`~datatrace.Attributions` ``(n_targets, n_train)``.

        ``info["bias"]`` and ``info["lambda"]`` hold each target's intercept and chosen λ, so that
        :func:`datatrace.evaluation.lds.predict_outputs` predicts outputs including the bias.
        """
        if not hasattr(self, "attributions_"):
            raise NotFittedError("these Datamodels are not fitted yet: call fit(masks, outputs)")
        return self.attributions_

    def predict(self, masks: Any) -> np.ndarray:
        """Predicted outputs ``masks @ weights_.T + bias_`` ``(n_subsets, n_targets)``."""
        from datatrace.evaluation.lds import predict_outputs

        return predict_outputs(self.attributions(), masks)
