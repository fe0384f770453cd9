"""LDS of datamodels (by number of models) and of TRAK (damping chosen by LDS) on digits.

    python benchmarks/datamodels_digits.py --store digits.zarr     # resumable; --help for options

What runs. ``datatrace.demo.subsets.DigitsSubsets`` (an MLP trained 30 epochs on a subset of the
1,500 bundled training digits; outputs: margins of the 297 test digits) in two subset experiments
of one store, both at α = 0.5 with different mask seeds: ``eval`` (``--eval-models`` models, the
LDS ground truth, never fitted on) and ``fit`` (``--fit-models`` models, for datamodels). Both
resume where they stopped, so the script can be interrupted and rerun.

* Datamodels (``Datamodels()`` defaults) fitted on the first ``R`` rows of ``fit`` for each ``R``
  of ``--sizes``; LDS on all of ``eval``.
* TRAK (``k = --proj-dim``, sparse projector) with 1 and ``--checkpoints`` checkpoints trained on
  all 1,500 digits with the same recipe: LDS at the default damping on all of ``eval``; then
  ``select_damping`` on the first half of ``eval`` and the LDS of the default and of the chosen
  damping on the second half (choosing and reporting on the same subsets would be optimistic).

Everything runs on one thread (``--threads``).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from datatrace import TRAK, Classification, SingularKernelWarning
from datatrace.demo.lds import ground_truth
from datatrace.demo.subsets import DigitsSubsets
from datatrace.evaluation.lds import lds
from datatrace.evaluation.tuning import select_damping
from datatrace.methods.datamodels import Datamodels


def run_experiments(args: argparse.Namespace, digits: DigitsSubsets):
    """The ``eval`` and ``fit`` subset experiments, computed or resumed: their results."""
    results = {}
    for name, rows, seed in (("eval", args.eval_models, 1), ("fit", args.fit_models, 0)):
        started = time.perf_counter()
        results[name] = ground_truth(
            args.store, name, digits, digits.n_outputs, rows, 0.5, seed, progress=True
        )
        print(f"subsets {name}: {rows} models ready ({time.perf_counter() - started:.0f} s)")
    return results["eval"], results["fit"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="datamodels-digits.zarr")
    parser.add_argument("--eval-models", type=int, default=120)
    parser.add_argument("--fit-models", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    digits = DigitsSubsets(epochs=args.epochs, threads=args.threads)
    held_out, fit = run_experiments(args, digits)
    half = len(held_out) // 2
    tune = (held_out.masks[:half], held_out.outputs[:half])
    report = (held_out.masks[half:], held_out.outputs[half:])

    print("\n| method | models trained | LDS (95% CI) | fit time (CPU s) |")
    print("|---|---:|---|---:|")
    for size in args.sizes:
        size = min(size, len(fit))
        started = time.process_time()
        datamodels = Datamodels(progress=False).fit(fit.masks[:size], fit.outputs[:size])
        cpu = time.process_time() - started
        result = lds(datamodels, held_out)
        print(f"| datamodels | {size} | {_format(result)} | {cpu:.1f} |")

    from datatrace.demo.subsets import _split

    train_split, test_split = _split(digits.split_seed)
    train_data = (train_split.images, train_split.labels)
    targets = (test_split.images, test_split.labels)
    models = [digits.train(np.arange(digits.n_train), seed) for seed in range(args.checkpoints)]
    tuning_rows = []
    for count in sorted({1, args.checkpoints}):
        checkpoints = [model.state_dict() for model in models[:count]]
        trak = TRAK(models[0], Classification(), proj_dim=args.proj_dim, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SingularKernelWarning)
            started = time.process_time()
            trak.fit(train_data, checkpoints)
            scores = trak.score(targets)
            cpu = time.process_time() - started
            name = f"TRAK, k={args.proj_dim}, default damping"
            print(f"| {name} | {count} | {_format(lds(scores, held_out))} | {cpu:.1f} |")
            started = time.process_time()
            selection = select_damping(trak, train_data, targets, *tune)
            selection_cpu = time.process_time() - started
            default = lds(scores, *report)
            trak.store, trak.damping = trak.store_, selection.best
            chosen = lds(trak.fit(train_data, checkpoints).score(targets), *report)
        tuning_rows.append((count, selection, selection_cpu, default, chosen))

    print(f"\nDamping chosen by LDS on the first {half} held-out subsets, reported on the other "
          f"{len(held_out) - half}:")  # fmt: skip
    grid = tuning_rows[0][1].grid
    print("| checkpoints | " + " | ".join(f"{d:g}" for d in grid) + " | chosen | CPU s | "
          "LDS at 1.0 | LDS at chosen |")  # fmt: skip
    print("|---" * (len(grid) + 5) + "|")
    for count, selection, cpu, default, chosen in tuning_rows:
        cells = " | ".join(f"{value:.3f}" for value in selection.lds)
        print(f"| {count} | {cells} | {selection.best:g} | {cpu:.1f} | {_format(default)} | "
              f"{_format(chosen)} |")  # fmt: skip


def _format(result) -> str:
    low, high = result.ci
    undefined = f", {result.n_undefined} undefined" if result.n_undefined else ""
    return f"{result.mean:.3f} ({low:.3f}–{high:.3f}{undefined})"


if __name__ == "__main__":
    main()
