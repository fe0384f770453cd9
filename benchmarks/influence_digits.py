"""LDS of influence functions (EK-FAC, K-FAC, diagonal, identity) against TRAK on the digits.

    python benchmarks/influence_digits.py --store lds-digits.zarr     # resumable; --help

The classic protocol, as in lds_digits.py (and sharing its ground truth when given the same
store): ``--eval-models`` (default 200, as there; about a minute of training on one thread,
once) MLPs trained (30 epochs, the demo's recipe) on random halves of the
1,500 training digits, fresh seeds; outputs: margins of the 297 test digits. All methods
attribute the same checkpoint (the MLP trained on all 1,500 digits, seed 0): TRAK with one
checkpoint (sparse JL, each ``k`` of ``--proj-dims``, default damping) and
:class:`InfluenceFunctions` with each Hessian, each relative damping of ``--dampings``
(λ = damping · mean eigenvalue per block), each number of ``--refine-steps`` (preconditioned
CG towards the exact damped Fisher inverse), each of ``--fishers`` (``empirical``,
``sampled``) and each of ``--gradients`` (``hooks``: the layers' per-example gradients from
layer hooks, the default; ``vmap``: every parameter's through ``torch.func``). Time: wall and CPU
seconds of fit + score, and CPU seconds as a multiple of training that checkpoint once (each the
fastest of ``--repeats`` runs). Runs on ``--threads`` torch threads (default 1: the machine may be
shared).
"""

from __future__ import annotations

import argparse
import itertools
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

import datatrace as dt
from datatrace.demo.lds import ground_truth
from datatrace.demo.subsets import DigitsSubsets, _split
from datatrace.evaluation.lds import LDSResult, lds

# The ground truth of lds_digits.py: halves of the training set, mask seed 1.
ALPHA, EVAL_SEED = 0.5, 1
BATCH_SIZE = 32


def timed(run: Callable[..., object], *args, **kwargs) -> tuple[object, float, float]:
    """``run(*args, **kwargs)`` with its wall and CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="lds-digits.zarr")
    parser.add_argument("--eval-models", type=int, default=200)
    parser.add_argument("--proj-dims", type=int, nargs="+", default=[2048])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--hessians", nargs="+", default=["ekfac", "kfac", "diagonal", "identity"])
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.1])
    parser.add_argument("--refine-steps", type=int, nargs="+", default=[0])
    parser.add_argument("--fishers", nargs="+", default=["empirical"])
    parser.add_argument("--gradients", nargs="+", default=["hooks"], help="hooks and/or vmap")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the fastest counts")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    digits = DigitsSubsets(epochs=args.epochs, threads=args.threads)
    started = time.perf_counter()
    truth = ground_truth(
        args.store, "eval", digits, digits.n_outputs, args.eval_models, ALPHA, EVAL_SEED, True
    )
    print(f"# {args.eval_models} ground-truth models ({time.perf_counter() - started:.0f} s)")
    train_split, test_split = _split(digits.split_seed)
    train, targets = train_split.as_tuple(), test_split.as_tuple()
    trainings = [
        timed(digits.train, np.arange(digits.n_train), 0) for _ in range(max(args.repeats, 1))
    ]
    model, training_wall, training_cpu = min(trainings, key=lambda run: run[2])
    task = dt.Classification()
    print(f"# checkpoint trained in {training_wall:.1f} s ({training_cpu:.1f} s CPU)", flush=True)

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

    def fit_and_score(estimator):
        return estimator.fit(train).score(targets)

    def fastest(estimator):
        """``timed(fit_and_score, estimator)``, the run with the least CPU time."""
        runs = [timed(fit_and_score, estimator) for _ in range(max(args.repeats, 1))]
        return min(runs, key=lambda run: run[2])

    for proj_dim in args.proj_dims:
        trak = dt.TRAK(model, task, proj_dim=proj_dim, batch_size=BATCH_SIZE, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dt.SingularKernelWarning)
            scores, wall, cpu = fastest(trak)
        add("TRAK", f"1 ckpt, k={proj_dim}", scores, wall, cpu)
    for hessian in args.hessians:
        identity = hessian == "identity"
        settings = itertools.product(
            args.fishers[:1] if identity else args.fishers,
            [0.0] if identity else args.dampings,
            [0] if identity else args.refine_steps,
            args.gradients,
        )
        for fisher, damping, steps, gradients in settings:
            estimator = dt.InfluenceFunctions(
                model, task, hessian=hessian, damping=damping, refine_steps=steps,
                fisher=fisher, batch_size=BATCH_SIZE, gradients=gradients, progress=False,
            )  # fmt: skip
            scores, wall, cpu = fastest(estimator)
            setting = "1 ckpt" + ("" if identity else f", {fisher} Fisher, damping {damping:g}")
            setting += f", {steps} CG steps" if steps else ""
            setting += f", {gradients}" if len(args.gradients) > 1 else ""
            add(f"influence ({hessian})", setting, scores, wall, cpu)

    print(
        f"\nLDS (classic protocol) on the bundled digits: {len(truth.masks)} ground-truth MLPs "
        f"trained on random halves of {digits.n_train} images, {digits.n_outputs} test targets, "
        f"{torch.get_num_threads()} torch thread(s); one training of the checkpoint: "
        f"{training_wall:.1f} s wall, {training_cpu:.1f} s CPU. × one training: CPU seconds "
        "(wall time varies with the load of shared cores).\n"
    )
    print("| method | setting | LDS | 95% CI | wall s | CPU s | × one training |")
    print("|---|---|---:|---|---:|---:|---:|")
    for method, setting, result, wall, cpu in rows:
        low, high = result.ci
        print(
            f"| {method} | {setting} | {result.mean:.3f} | {low:.3f}–{high:.3f} | "
            f"{wall:.1f} | {cpu:.1f} | {cpu / training_cpu:.1f} |"
        )


if __name__ == "__main__":
    main()
