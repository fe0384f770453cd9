"""LDS of every attribution method on the bundled digits, against one ground truth.

    python benchmarks/lds_digits.py --store lds-digits.zarr      # resumable; --help for options

Ground truth: ``--eval-models`` (default 200) MLPs trained (30 epochs, the demo's recipe) on
random halves of the 1,500 training digits; outputs: margins of the 297 test digits. Fitting data
for datamodels: another ``--fit-models`` such models with other masks. Both are subset
experiments in ``--store``, so an interrupted run resumes and a rerun trains nothing.

Rows of the table, all scored by LDS on the same ground truth, with wall and CPU time of the
attribution itself (training of checkpoints and subset models is reported separately):

* TRAK (sparse JL, ``k = --proj-dim``, default damping) with 1, 5 and 10 checkpoints (MLPs
  trained on all 1,500 digits, seeds 0..9);
* the baselines (gradient dot product, gradient cosine, representation similarity), on the same
  checkpoints; the gradient ones reuse TRAK's stored features, as in the demo;
* datamodels fitted on the first 100, 200, 500, 1000, 2000 fitting models;
* traker 0.3.2 (CPU ``BasicProjector``, float32) on the same checkpoints and ``k``: as it is
  used by default (``lambda_reg = 0``), and with datatrace's damping converted to its feature
  scale (see vs_traker.py).

Runs on ``--threads`` torch threads (default 1: the machine may be shared).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

import datatrace as dt
from datatrace.demo.lds import ground_truth
from datatrace.demo.subsets import DigitsSubsets, _split
from datatrace.evaluation.lds import LDSResult, lds
from datatrace.methods.datamodels import Datamodels
from datatrace.subsets import SubsetResults
from vs_traker import INSTALL_HINT, run_traker, traker_feature_scale

# Fraction of the training set in every subset model's data.
ALPHA = 0.5
# Mask seeds of the two experiments (different seeds: the ground truth is never fitted on).
EVAL_SEED, FIT_SEED = 1, 0
# Batch size of per-example gradients in both TRAK implementations.
BATCH_SIZE = 32
# traker's BasicProjector default block size (vs_traker.py explains why it must stay below k).
TRAKER_BLOCK_SIZE = 100


def experiment(store: str, name: str, digits: DigitsSubsets, rows: int, seed: int) -> SubsetResults:
    """The subset experiment ``name`` with ``rows`` finished rows (trained now if missing)."""
    started = time.perf_counter()
    results = ground_truth(store, name, digits, digits.n_outputs, rows, ALPHA, seed, progress=True)
    print(
        f"# subsets {name}: {rows} models ready ({time.perf_counter() - started:.0f} s)", flush=True
    )
    return results


def timed(run: Callable[..., object], *args, **kwargs) -> tuple[object, float, float]:
    """``run(*args, **kwargs)`` with its wall and CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="lds-digits.zarr")
    parser.add_argument("--eval-models", type=int, default=200)
    parser.add_argument("--fit-models", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 500, 1000, 2000])
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-traker", action="store_true", help="skip the traker rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.no_traker:
        try:
            import trak  # only checks that traker is installed
        except ImportError:
            raise SystemExit(INSTALL_HINT) from None

    digits = DigitsSubsets(epochs=args.epochs, threads=args.threads)
    truth = experiment(args.store, "eval", digits, args.eval_models, EVAL_SEED)
    fit = experiment(args.store, "fit", digits, max(args.sizes), FIT_SEED)
    train_split, test_split = _split(digits.split_seed)
    train, targets = train_split.as_tuple(), test_split.as_tuple()

    started = time.perf_counter()
    models = [
        digits.train(np.arange(digits.n_train), seed) for seed in range(max(args.checkpoints))
    ]
    print(
        f"# {len(models)} checkpoints trained ({time.perf_counter() - started:.0f} s)", flush=True
    )
    states = [model.state_dict() for model in models]
    model, task = models[0], dt.Classification()
    n_params = sum(p.numel() for p in model.parameters())

    rows: list[tuple[str, str, LDSResult, float, float]] = []

    def add(method: str, setting: str, attributions, wall: float, cpu: float) -> None:
        result = lds(attributions, truth.masks, truth.outputs)
        rows.append((method, setting, result, wall, cpu))
        low, high = result.ci
        print(
            f"# {method} ({setting}): LDS {result.mean:.3f} [{low:.3f}, {high:.3f}] "
            f"{wall:.1f} s wall, {cpu:.1f} s CPU",
            flush=True,
        )

    shared = {"proj_dim": args.proj_dim, "batch_size": BATCH_SIZE, "progress": False}

    def fit_and_score(estimator, checkpoints):
        return estimator.fit(train, checkpoints).score(targets)

    for count in args.checkpoints:
        store = dt.Store()
        trak = dt.TRAK(model, task, store=store, **shared)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dt.SingularKernelWarning)
            scores, wall, cpu = timed(fit_and_score, trak, states[:count])
        add("TRAK", f"{count} ckpt, k={args.proj_dim}", scores, wall, cpu)
        for baseline in (
            dt.GradientDot(model, task, store=store, **shared),
            dt.GradientCosine(model, task, store=store, **shared),
            dt.RepresentationSimilarity(model, task, progress=False),
        ):
            scores, wall, cpu = timed(fit_and_score, baseline, states[:count])
            add(type(baseline).__name__, f"{count} ckpt", scores, wall, cpu)
        if not args.no_traker:
            damping = float(np.mean(trak.damping_))
            scale = traker_feature_scale(args.proj_dim, n_params)
            for label, lambda_reg in (
                ("λ=0 (its default)", 0.0),
                ("datatrace's λ", damping * scale),
            ):
                run, wall, cpu = timed(
                    run_traker,
                    model,
                    states[:count],
                    train_split,
                    test_split,
                    args.proj_dim,
                    lambda_reg,
                    BATCH_SIZE,
                    TRAKER_BLOCK_SIZE,
                    0,
                )
                setting = f"{count} ckpt, k={args.proj_dim}, {label}"
                add("traker 0.3.2", setting, run.scores, wall, cpu)

    for size in args.sizes:
        datamodels, wall, cpu = timed(
            Datamodels(progress=False).fit, fit.masks[:size], fit.outputs[:size]
        )
        add("datamodels", f"{size} models", datamodels, wall, cpu)

    print(
        f"\nLDS on the bundled digits: {len(truth.masks)} ground-truth MLPs trained on random "
        f"halves of {digits.n_train} images, {digits.n_outputs} test targets, "
        f"{torch.get_num_threads()} torch thread(s). Time: the attribution only (datamodels: "
        "the regression; their models' training is not included).\n"
    )
    print("| method | setting | LDS | 95% CI | wall s | CPU s |")
    print("|---|---|---:|---|---:|---:|")
    for method, setting, result, wall, cpu in rows:
        low, high = result.ci
        print(
            f"| {method} | {setting} | {result.mean:.3f} | {low:.3f}–{high:.3f} | "
            f"{wall:.1f} | {cpu:.1f} |"
        )


if __name__ == "__main__":
    main()
