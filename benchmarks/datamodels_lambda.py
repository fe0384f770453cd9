"""Datamodels' choice of λ against the number of subset models, beside a scikit-learn reference.

    python benchmarks/datamodels_lambda.py --store lds-digits.zarr      # the lds_digits store

The digits ground truth of ``lds_digits.py`` (resumable in the same store): 200 held-out MLPs
trained on random halves, and up to 2,000 fitting models on other halves. For the first
``R`` fitting models (``--sizes``), LDS on the held-out models of:

* ``Datamodels()``: the default, λ by 5-fold cross-validated LDS pooled across targets;
* ``Datamodels(selection="mse")``: the same pooling on the squared error;
* ``Datamodels(selection="validation")``: the rule of earlier versions (each target's own
  squared error on 10% of the subsets);
* the reference a user would write with scikit-learn: ``Lasso`` on standardised masks with one
  α for every target, α among 20 values from the largest target's λ_max down to 1e-2 × their
  median, chosen by 5-fold cross-validation of the LDS on the fitting rows (never the held-out
  ones); a constant prediction counts as 0 in that cross-validation, as in ``lds``.

One thread. The LDS counts a target whose predictions are constant as 0 (``lds``).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from datatrace.demo.subsets import DigitsSubsets
from datatrace.evaluation.lds import column_spearman, lds
from datatrace.methods.datamodels import Datamodels
from lds_digits import EVAL_SEED, FIT_SEED, experiment

ALPHAS = 20
FOLDS = 5


def sklearn_reference(masks: np.ndarray, outputs: np.ndarray) -> tuple[np.ndarray, float]:
    """Raw-mask weights ``(n_targets, n_train)`` of one-α Lasso chosen by CV of the LDS."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso
    from sklearn.model_selection import KFold

    mean, std = masks.mean(0), masks.std(0)
    std = np.where(std > 0, std, 1.0)
    X = (masks - mean) / std
    centred = outputs - outputs.mean(0)
    largest = np.abs((X - X.mean(0)).T @ centred).max(0) / len(X)
    alphas = np.geomspace(largest.max(), 1e-2 * np.median(largest), ALPHAS)
    score = np.zeros(ALPHAS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for inside, outside in KFold(FOLDS, shuffle=True, random_state=0).split(X):
            for index, alpha in enumerate(alphas):  # decreasing α: warm starts
                model = Lasso(alpha=alpha, max_iter=2000, tol=1e-4)
                model.fit(X[inside], outputs[inside])
                correlation = column_spearman(model.predict(X[outside]), outputs[outside])
                score[index] += np.nan_to_num(correlation).mean() / FOLDS
        best = float(alphas[int(np.argmax(score))])
        model = Lasso(alpha=best, max_iter=2000, tol=1e-4).fit(X, outputs)
    return model.coef_ / std, best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="lds-digits.zarr")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 500, 1000, 2000])
    parser.add_argument("--eval-models", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    digits = DigitsSubsets(epochs=30, threads=1)
    truth = experiment(args.store, "eval", digits, args.eval_models, EVAL_SEED)
    fit = experiment(args.store, "fit", digits, max(args.sizes), FIT_SEED)
    methods = {
        "datatrace (default: pooled CV of the LDS)": lambda m, y: Datamodels(progress=False).fit(
            m, y
        ),
        "datatrace selection='mse'": lambda m, y: Datamodels(selection="mse", progress=False).fit(
            m, y
        ),
        "datatrace selection='validation' (earlier default)": lambda m, y: Datamodels(
            selection="validation", progress=False
        ).fit(m, y),
        "scikit-learn Lasso, one α by 5-fold CV of the LDS": lambda m, y: sklearn_reference(
            m.astype(np.float64), y
        )[0],
    }
    rows = []
    for size in args.sizes:
        masks, outputs = fit.masks[:size], fit.outputs[:size]
        for name, run in methods.items():
            started = time.process_time()
            with threadpool_limits(1):
                result = run(masks, outputs)
            seconds = time.process_time() - started
            score = lds(result, truth.masks, truth.outputs)
            rows.append((size, name, score, seconds))
            low, high = score.ci
            print(
                f"# {size} {name}: {score.mean:.3f} [{low:.3f}, {high:.3f}] {seconds:.0f} s",
                flush=True,
            )
    print(
        f"\nLDS on {len(truth.masks)} held-out digits MLPs ({digits.n_outputs} targets); "
        "CPU seconds of the fit, 1 thread\n"
    )
    print("| models | method | LDS | 95% CI | CPU s |")
    print("|---:|---|---:|---|---:|")
    for size, name, score, seconds in rows:
        low, high = score.ci
        print(f"| {size} | {name} | {score.mean:.3f} | {low:.3f}–{high:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
