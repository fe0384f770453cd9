"""Counterfactual removal and brittleness of TRAK attributions on the bundled digits.

Usage: python benchmarks/counterfactual_digits.py [--targets 6] [--seeds 3] [--store DIR]

TRAK (3 MLP checkpoints, k = 1024) attributes the test margins; for the first ``--targets``
correctly classified test images, models are retrained (``DigitsSubsets``: MLP, 30 epochs,
1 thread) without each target's top-k proponents and without k random images, and the drops of
the target's margin are compared. Then brittleness: the smallest top-proponent set whose removal
flips each target (one model per candidate, sizes 1, 2, 4, …, 256, then bisection).
With ``--store`` the retrained models are kept and a rerun resumes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from datatrace import TRAK, Classification
from datatrace.demo import digits_split, make_model, train_checkpoints
from datatrace.demo.subsets import TEST_SIZE, DigitsSubsets
from datatrace.evaluation.counterfactual import brittleness, counterfactual_removal

N_CHECKPOINTS, PROJ_DIM, KS, MAX_SIZE = 3, 1024, (10, 50, 100), 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=6, help="test images to test")
    parser.add_argument("--seeds", type=int, default=3, help="models per removal")
    parser.add_argument("--store", default=None, help="store for the retrained models")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    train, test = digits_split(n_test=TEST_SIZE, seed=0)
    checkpoints = train_checkpoints(train, N_CHECKPOINTS, epochs=30, seed=0)
    trak = TRAK(make_model("mlp", seed=0), Classification(), proj_dim=PROJ_DIM, progress=False)
    attributions = trak.fit(train.as_tuple(), checkpoints=checkpoints).score(test.as_tuple())
    print(f"TRAK on {len(train)} train / {len(test)} test: {time.perf_counter() - started:.0f} s")

    digits = DigitsSubsets()
    model = make_model("mlp", seed=0)
    model.load_state_dict(checkpoints[0])
    correct = np.flatnonzero(model(test.images).argmax(1).numpy() == test.labels.numpy())
    targets = correct[: args.targets]
    started = time.perf_counter()
    result = counterfactual_removal(
        attributions, targets, digits.train, digits.evaluate, k=KS, n_seeds=args.seeds,
        store=args.store, description=digits.description(),
    )  # fmt: skip
    print(
        f"\ncounterfactual removal: {len(targets)} targets × k {KS} × {args.seeds} seeds, "
        f"{result.models_trained} models in {time.perf_counter() - started:.0f} s"
    )
    print(f"mean margin with the full training set: {result.full_output.mean():.2f}")
    print(f"{'k':>5}  {'drop (top-k)':>13}  {'drop (random k)':>16}  {'flipped (top-k)':>16}")
    for row in result.summary():
        print(
            f"{row['k']:>5}  {row['drop_top']:>13.2f}  {row['drop_random']:>16.2f}  "
            f"{row['flipped_top']:>16.0%}"
        )

    started = time.perf_counter()
    brittle = brittleness(
        attributions, targets, digits.train, digits.evaluate, max_size=MAX_SIZE, store=args.store,
        description=digits.description(),
    )  # fmt: skip
    print(f"\nbrittleness (max {MAX_SIZE}, 1 seed): {time.perf_counter() - started:.0f} s")
    for target, size, status, margin in zip(
        brittle.targets, brittle.size, brittle.status, brittle.full_output
    ):
        tried = len(brittle.trials[list(brittle.targets).index(target)])
        print(f"  test {target:>3}: margin {margin:6.2f} → {status} at {size} ({tried} sizes)")


if __name__ == "__main__":
    main()
