"""Metagradients (MAGIC) on the bundled digits, scored by the small-drop LDS protocol.

    python benchmarks/metagradients_digits.py                 # SGD and Adam, ~3 min on 1 thread
    python benchmarks/metagradients_digits.py --optimizers sgd --subsets 200 --store mg.zarr

Model: the digits MLP (64 → 32 tanh → 10, float64) trained by datatrace's deterministic loop
(:mod:`datatrace.methods.training`) on the 1,500 training digits, batch 64, ``--epochs``
(default 10) epochs: 240 steps. Targets: margins of the 297 test digits. Attributions:
``∂ margin / ∂ w_i`` by :class:`datatrace.Metagradients` (checkpointed replay, segment ``⌈√T⌉``,
all targets in one replay).

Ground truth, as subset experiments (in ``--store``, or in memory by default):

* ``small-drop``: ``--subsets`` (default 100) subsets that each leave out ``--drop-fraction``
  (default 1%, 15 digits) of the training set, every model trained with the attributed run's
  seed (same initialisation, same data order with the dropped digits removed) — the seed policy
  ``fixed``;
* ``small-drop, across seeds``: ``--across-seeds`` (default 50) such subsets, each model trained
  with its own seed (initialisation and data order), policy ``per-row``;
* ``classic``: ``--classic`` (default 50) random halves with fresh seeds, for comparison.

Each row prints the LDS with its 95% bootstrap interval over targets, and the compute of the
attribution (fit + score) in CPU seconds and as a multiple of one training run measured in the
same process (CPU time, because wall time on a shared machine mostly measures the others' load;
both are printed in the ``#`` lines).
Runs on ``--threads`` torch threads (default 1: the machine may be shared).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from datatrace import Metagradients
from datatrace.demo.data import digits_split
from datatrace.evaluation.lds import lds
from datatrace.methods.training import TrainingRecipe, train_subset
from datatrace.subsets import SubsetExperiment
from datatrace.tasks import Classification
from datatrace.tasks.classification import classification_margin

HIDDEN = 32
BATCH_SIZE = 64
WEIGHT_DECAY = 5e-4
# Learning rates at which both optimisers fit the digits in 10 epochs (test accuracy ≈ 0.96).
SETTINGS = {
    "sgd": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
    "adam": {"optimizer": "adam", "lr": 3e-3},
}
# Mask seeds of the ground-truth tables (different from each other: no shared subsets).
MASK_SEEDS = {"fixed": 1, "across": 2, "classic": 3}


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 10)).double()


class DigitsRuns:
    """train/evaluate of the subset experiments: the deterministic run with ``seed`` as both
    the initialisation seed and the data-order seed."""

    def __init__(self, optimizer: str, epochs: int):
        train, test = digits_split()
        self.train_data = (train.images.reshape(-1, 64).double(), train.labels)
        self.test_data = (test.images.reshape(-1, 64).double(), test.labels)
        self.optimizer = optimizer
        self.epochs = epochs

    def recipe(self, seed: int) -> TrainingRecipe:
        return TrainingRecipe(
            epochs=self.epochs, batch_size=BATCH_SIZE, seed=seed, weight_decay=WEIGHT_DECAY,
            **SETTINGS[self.optimizer],
        )  # fmt: skip

    def train(self, train_indices: np.ndarray, seed: int) -> nn.Module:
        return train_subset(make_model(seed), self.train_data, self.recipe(seed), train_indices)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> np.ndarray:
        inputs, labels = self.test_data
        return classification_margin(model(inputs), labels).numpy()

    def description(self) -> dict:
        return {"benchmark": "metagradients_digits", **self.recipe(0).config(), "seed": None}


def ground_truth(store, name, runs: DigitsRuns, rows: int, **options) -> SubsetExperiment:
    experiment = SubsetExperiment(
        store, f"{runs.optimizer}/{name}", n_train=len(runs.train_data[1]),
        n_outputs=len(runs.test_data[1]), n_masks=rows, description=runs.description(),
        **options,
    )  # fmt: skip
    started = time.perf_counter()
    experiment.run(runs.train, runs.evaluate, progress=False)
    print(
        f"# {runs.optimizer} {name}: {rows} models ({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    return experiment


def benchmark(optimizer: str, args: argparse.Namespace, store) -> list[tuple]:
    runs = DigitsRuns(optimizer, args.epochs)
    fixed = ground_truth(
        store, "small-drop", runs, args.subsets, seed=MASK_SEEDS["fixed"],
        drop_fraction=args.drop_fraction, seed_policy="fixed",
    )  # fmt: skip
    seed = fixed.row_seeds(0)[0]  # the seed of every small-drop model: the attributed run's
    started, started_cpu = time.perf_counter(), time.process_time()
    runs.train(np.arange(len(runs.train_data[1])), seed)
    one_training = time.perf_counter() - started
    one_training_cpu = time.process_time() - started_cpu

    started_cpu = time.process_time()
    estimator = Metagradients(
        make_model, Classification(), epochs=args.epochs, batch_size=BATCH_SIZE, seed=seed,
        weight_decay=WEIGHT_DECAY, target_batch=len(runs.test_data[1]), **SETTINGS[optimizer],
    ).fit(runs.train_data)  # fmt: skip
    attributions = estimator.score(runs.test_data)
    cpu = time.process_time() - started_cpu
    with torch.no_grad():
        accuracy = (estimator.model_(runs.test_data[0]).argmax(1) == runs.test_data[1]).double()
    print(
        f"# {optimizer}: {estimator.run_.n_steps} steps, test accuracy {accuracy.mean():.3f}, "
        f"one training {one_training:.2f} s ({one_training_cpu:.2f} CPU s), metagradients fit "
        f"{estimator.fit_seconds_:.1f} s + score {attributions.info['score_seconds']:.1f} s "
        f"({cpu:.1f} CPU s)",
        flush=True,
    )
    tables = [("small-drop (fixed seed)", fixed, "small-drop")]
    if args.across_seeds:
        across = ground_truth(
            store, "small-drop-seeds", runs, args.across_seeds, seed=MASK_SEEDS["across"],
            drop_fraction=args.drop_fraction, seed_policy="per-row",
        )  # fmt: skip
        tables.append(("small-drop (across seeds)", across, "small-drop"))
    if args.classic:
        classic = ground_truth(store, "classic", runs, args.classic, seed=MASK_SEEDS["classic"])
        tables.append(("classic (halves, fresh seeds)", classic, "classic"))
    rows = []
    for label, table, protocol in tables:
        result = lds(attributions, table.results(), protocol=protocol)
        rows.append((optimizer, label, len(table.results()), result, cpu, one_training_cpu))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adam"], choices=SETTINGS)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--subsets", type=int, default=100, help="small-drop subsets, fixed seed")
    parser.add_argument("--across-seeds", type=int, default=50, help="small-drop, own seeds")
    parser.add_argument("--classic", type=int, default=50, help="random halves, fresh seeds")
    parser.add_argument("--drop-fraction", type=float, default=0.01)
    parser.add_argument("--store", default=None, help="a store to keep the subset models in")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for optimizer in args.optimizers:
        rows += benchmark(optimizer, args, args.store)
    print()
    print("| optimiser | protocol | subsets | LDS (95% CI) | CPU seconds | × one training (CPU) |")
    print("|---|---|---|---|---|---|")
    for optimizer, label, n_subsets, result, seconds, one_training in rows:  # CPU seconds
        low, high = result.ci
        print(
            f"| {optimizer} | {label} | {n_subsets} | {result.mean:.3f} ({low:.3f}–{high:.3f}) "
            f"| {seconds:.1f} | {seconds / one_training:.0f} |"
        )


if __name__ == "__main__":
    main()
