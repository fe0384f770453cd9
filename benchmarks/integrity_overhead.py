"""What the store's integrity checks cost: their share of a TRAK fit, and a refit on a complete
store (which hashes every training example again), beside one training epoch on the same data.

The checks cannot be switched off, so their cost is measured by profiling: the time spent inside
each check function (cumulative, under ``cProfile``) as a share of the whole fit. Times are the
fastest of ``--repeats`` runs.

Usage: .venv/bin/python benchmarks/integrity_overhead.py [--width 256] [--proj-dim 1024]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import datatrace as dt

# (label, function name as cProfile records it, file it is defined in)
CHECKS = [
    ("Task.check_batch (labels, dtypes, one probing forward)", "check_batch", "classification.py"),
    ("completion marks against chunks present", "completed", "store.py"),
    ("per-example hashes", "example_fingerprints", "provenance.py"),
    ("finiteness of features and Q", "check_finite", "featurize.py"),
    ("stored hashes compared", "check_training_examples", "featurize.py"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256, help="hidden units of the MLP")
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="keep the fastest of this many")
    args = parser.parse_args()
    torch.set_num_threads(1)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, args.width), nn.Tanh(), nn.Linear(args.width, 10))

    def estimator(path: str) -> dt.TRAK:
        return dt.TRAK(
            model, dt.Classification(), proj_dim=args.proj_dim, store=path, progress=False
        )

    def epoch() -> None:
        optimiser = torch.optim.SGD(model.parameters(), lr=0.0)
        for start in range(0, len(X), 32):
            optimiser.zero_grad()
            nn.functional.cross_entropy(
                model(X[start : start + 32]), y[start : start + 32]
            ).backward()
            optimiser.step()

    best: dict[str, float] = {}
    shares: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        estimator(os.path.join(scratch, "warm")).fit((X[:64], y[:64]))  # first-call costs
        for repeat in range(args.repeats):
            path = os.path.join(scratch, f"run{repeat}")
            start = time.perf_counter()
            epoch()
            timings = {"one training epoch (batch 32)": time.perf_counter() - start}
            profile = cProfile.Profile()
            start = time.perf_counter()
            profile.runcall(estimator(path).fit, (X, y))
            timings["TRAK.fit into a new store (profiled)"] = time.perf_counter() - start
            start = time.perf_counter()
            estimator(path).fit((X, y))
            timings["fit again on the complete store"] = time.perf_counter() - start
            stats = pstats.Stats(profile).stats
            total = timings["TRAK.fit into a new store (profiled)"]
            for label, function, file in CHECKS:
                spent = sum(
                    entry[3]
                    for (path_, _, name), entry in stats.items()
                    if name == function and path_.endswith(file)
                )
                shares[label] = min(shares.get(label, 1.0), spent / total)
            for key, value in timings.items():
                best[key] = min(best.get(key, float("inf")), value)
    print(f"digits MLP 64-{args.width}-10, {len(X)} examples, k = {args.proj_dim}, one thread; ")
    print(f"fastest of {args.repeats}; load average {os.getloadavg()[0]:.2f}\n")
    epoch_s = best["one training epoch (batch 32)"]
    print("| | seconds | ÷ one epoch |\n|---|---:|---:|")
    for key, value in best.items():
        print(f"| {key} | {value:.3f} | {value / epoch_s:.1f} |")
    print("\n| check | share of the fit |\n|---|---:|")
    for label, share in shares.items():
        print(f"| {label} | {share:.1%} |")
    print(f"| all | {sum(shares.values()):.1%} |")


if __name__ == "__main__":
    main()
