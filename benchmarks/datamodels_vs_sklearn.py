"""datatrace's batched datamodels solver against scikit-learn's lasso, one target at a time.

    python benchmarks/datamodels_vs_sklearn.py                  # 500 targets × 2,000 × 1,000
    python benchmarks/datamodels_vs_sklearn.py --help

The problem. ``--subsets`` random masks at α = 0.5 over ``--n-train`` training examples, and
``--targets`` outputs that are a sparse linear function of the mask (``--true-weights`` nonzero
weights of magnitude 0.5–1.5 per target) plus Gaussian noise of standard deviation ``--noise``
(the default makes noise about 60 % of the output variance, as in real datamodels).

The procedure, the same on both sides. Masks standardised with all-subset statistics; 10 % of the
subsets held out; per target a geometric λ path from λ_max down (100 steps, eps = 1e-4) fitted on
the other 90 %, stopped once the held-out MSE has not improved for 3 steps (after at least 10);
the best λ refit on all subsets. Solver tolerance: duality gap ≤ 1e-4 · ‖y − ȳ‖²/n on both sides
(scikit-learn's criterion, which datatrace uses), at most 1000 iterations per λ.

* datatrace: ``Datamodels(selection="validation")`` (float32, batched FISTA over all targets):
  the per-target path with early stopping that scikit-learn's ``lasso_path`` can replay step
  for step (the default pooled cross-validation runs the same solver on every fold).
* scikit-learn: for each target, ``lasso_path`` over *exactly the λ steps datatrace computed for
  that target* (so scikit-learn does no more path than needed and pays nothing for early
  stopping), with the Gram matrix of the training rows precomputed once and shared by all
  targets (``precompute=G, Xy=Xᵀy``: the fastest way to run scikit-learn's coordinate descent when
  subsets outnumber training examples); the held-out MSE along its path picks λ; then
  ``Lasso(alpha=λ, precompute=G_all, warm_start=True)`` refits on all subsets from the path
  solution. float64 (scikit-learn's usual precision). Only ``--sklearn-targets`` targets are
  solved and the time is extrapolated linearly to all targets (each target is an independent
  problem of the same size, so the time is linear in the number of targets).

Both run on one thread (``torch.set_num_threads(1)`` and ``threadpoolctl`` for the BLAS under
numpy/scikit-learn). Reported: wall-clock time and process CPU time (the latter is less sensitive
to other processes sharing the machine), the ratio, and agreement on the targets solved by both:
the chosen λ step, the largest weight difference relative to the largest weight, and the LDS of
both on 500 fresh subsets.
"""

from __future__ import annotations

import argparse
import platform
import time
from contextlib import contextmanager

import numpy as np
import sklearn
import torch
from sklearn.linear_model import Lasso, lasso_path
from threadpoolctl import threadpool_limits

from datatrace.evaluation.lds import lds
from datatrace.methods.datamodels import Datamodels

FRESH_SUBSETS = 500


def make_problem(args: argparse.Namespace):
    """Masks, outputs, fresh masks and outputs, and the true weights ``(n_targets, n_train)``."""
    rng = np.random.default_rng(args.seed)
    weights = np.zeros((args.targets, args.n_train))
    for row in weights:
        chosen = rng.choice(args.n_train, args.true_weights, replace=False)
        row[chosen] = rng.choice([-1, 1], args.true_weights) * rng.uniform(
            0.5, 1.5, args.true_weights
        )

    def draw(rows):
        masks = rng.random((rows, args.n_train)) < 0.5
        return masks, masks @ weights.T + args.noise * rng.standard_normal((rows, args.targets))

    return (*draw(args.subsets), *draw(FRESH_SUBSETS), weights)


@contextmanager
def timed(record: dict, key: str):
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    record[key] = (time.perf_counter() - wall, time.process_time() - cpu)


def sklearn_datamodels(masks, outputs, model: Datamodels, targets: np.ndarray):
    """The same procedure with scikit-learn, target by target.

    Returns:
        (raw weights (len(targets), n_train), chosen λ step of each target)
    """
    mean, std = masks.mean(0), masks.std(0)
    X = (masks - mean) / np.where(std > 0, std, 1)
    val = model.val_rows_
    train = np.setdiff1d(np.arange(len(masks)), val)
    X_train, X_val = X[train], X[val]
    train_mean = X_train.mean(0)
    centred = X_train - train_mean
    gram = centred.T @ centred
    all_centred = X - X.mean(0)
    all_gram = all_centred.T @ all_centred
    weights, chosen = [], []
    for j in targets:
        y = outputs[train, j]
        alphas = model.lambda_path_[: model.path_steps_[j], j]
        _, coefs, _ = lasso_path(
            centred,
            y - y.mean(),
            alphas=alphas,
            precompute=gram,
            Xy=centred.T @ (y - y.mean()),
            tol=model.tol,
            max_iter=model.max_iter,
        )
        bias = y.mean() - train_mean @ coefs
        val_mse = ((outputs[val, j][:, None] - X_val @ coefs - bias) ** 2).mean(0)
        best = int(np.argmin(val_mse))
        refit = Lasso(
            alpha=alphas[best],
            precompute=all_gram,
            warm_start=True,
            tol=model.tol,
            max_iter=model.max_iter,
        )
        refit.coef_ = coefs[:, best].copy()
        refit.fit(X, outputs[:, j])
        weights.append(refit.coef_ / np.where(std > 0, std, 1))
        chosen.append(best)
    return np.array(weights), np.array(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, default=500)
    parser.add_argument("--subsets", type=int, default=2000)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--true-weights", type=int, default=20)
    parser.add_argument("--noise", type=float, default=3.0)
    parser.add_argument("--sklearn-targets", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    masks, outputs, fresh_masks, fresh_outputs, true_weights = make_problem(args)
    times: dict[str, tuple[float, float]] = {}
    with threadpool_limits(1):
        ours = Datamodels(selection="validation", progress=False)
        with timed(times, "datatrace"):
            ours.fit(masks, outputs)
        ours64 = Datamodels(selection="validation", progress=False, dtype=torch.float64)
        with timed(times, "datatrace float64"):
            ours64.fit(masks, outputs)
        subset = np.linspace(0, args.targets - 1, min(args.sklearn_targets, args.targets))
        subset = np.unique(subset.astype(int))
        with timed(times, "scikit-learn"):
            sk_weights, sk_chosen = sklearn_datamodels(masks, outputs, ours, subset)
    scale = len(subset) / args.targets
    times["scikit-learn"] = tuple(t / scale for t in times["scikit-learn"])

    our_chosen = np.array(
        [int(np.flatnonzero(ours.lambda_path_[:, j] == ours.lambda_[j])[0]) for j in subset]
    )
    our_weights = ours.weights_[subset].astype(np.float64)
    largest = np.abs(sk_weights).max()
    difference = np.abs(our_weights - sk_weights).max() / largest
    lds_ours = lds(ours.weights_[subset], fresh_masks, fresh_outputs[:, subset]).mean
    lds_sklearn = lds(sk_weights, fresh_masks, fresh_outputs[:, subset]).mean
    lds_truth = lds(true_weights[subset], fresh_masks, fresh_outputs[:, subset]).mean

    print(
        f"{args.targets} targets × {args.subsets} subsets × {args.n_train} training examples, "
        f"{args.true_weights} true weights per target, noise σ = {args.noise}; 1 thread"
    )
    print(
        f"torch {torch.__version__}, scikit-learn {sklearn.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        f"path steps per target: mean {ours.path_steps_.mean():.1f}, max "
        f"{ours.path_steps_.max()}; scikit-learn solved {len(subset)} targets (time × "
        f"{1 / scale:.0f})\n"
    )
    sk_wall, sk_cpu = times["scikit-learn"]
    print("| solver | wall s | CPU s | scikit-learn / this (wall) | (CPU) |")
    print("|---|---:|---:|---:|---:|")
    for name in ("datatrace", "datatrace float64", "scikit-learn"):
        wall, cpu = times[name]
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {sk_wall / wall:.1f}× | {sk_cpu / cpu:.1f}× |")
    same = (our_chosen == sk_chosen).mean()
    adjacent = (np.abs(our_chosen - sk_chosen) <= 1).mean()
    print(
        f"\nagreement on {len(subset)} targets: same λ step {same:.0%} (within one step "
        f"{adjacent:.0%}); max |Δw| / max |w| = {difference:.2e} (float32, tol 1e-4 on both "
        f"sides); LDS on {FRESH_SUBSETS} fresh subsets: datatrace {lds_ours:.4f}, scikit-learn "
        f"{lds_sklearn:.4f}, true weights {lds_truth:.4f}"
    )


if __name__ == "__main__":
    main()
