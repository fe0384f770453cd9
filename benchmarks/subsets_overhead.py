"""What a subset experiment costs besides training: the store per row, Ray per task.

Usage: python benchmarks/subsets_overhead.py [--rows 100] [--repeats 5] [--models 16] [--no-ray]

Prints, on this machine:
  1. seconds per digits subset model (MLP, 30 epochs, α = 0.5 → 750 images, 1 torch thread),
     trained and evaluated directly, without the store;
  2. store overhead per row: runs whose train/evaluate do nothing, so all of their time is
     claiming, reading the mask, writing outputs/seeds/done and releasing (n_train = 1500,
     n_outputs = 297, like the digits), on a local directory;
  3. the same no-op rows through a 2-process pool and through Ray (a local instance with 2 CPUs),
     once their workers are started: the per-row overhead of each backend;
  4. digits models through each backend: wall time per model (throughput), workers started;
  5. what starting the workers costs, once per pool or Ray session.
Per-row figures are the median and the minimum over ``--repeats`` runs: on a machine shared with
other work the minimum is the least disturbed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from datatrace.demo.subsets import DigitsSubsets
from datatrace.subsets import LocalBackend, RayBackend, SubsetExperiment, random_masks

N_TRAIN, N_OUTPUTS = 1500, 297


def noop_train(train_indices: np.ndarray, seed: int) -> int:
    return seed


def noop_evaluate(model: int) -> np.ndarray:
    return np.zeros(N_OUTPUTS, dtype=np.float32)


def timed_run(directory: str, name: str, rows: int, train, evaluate, backend) -> float:
    """Seconds of a run over a fresh experiment of ``rows`` rows (the run only, not the setup)."""
    experiment = SubsetExperiment(
        os.path.join(directory, name), name, n_train=N_TRAIN, n_outputs=N_OUTPUTS, n_masks=rows
    )
    experiment.run(train, evaluate, backend=backend, progress=False)
    return experiment.last_run_.seconds


def per_row(directory, name, rows, repeats, train, evaluate, backend) -> tuple[float, float]:
    """Median and minimum over ``repeats`` runs of the seconds per row."""
    times = [
        timed_run(directory, f"{name}-{repeat}", rows, train, evaluate, backend) / rows
        for repeat in range(repeats)
    ]
    return float(np.median(times)), float(np.min(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100, help="no-op rows per overhead run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per no-op measurement")
    parser.add_argument("--models", type=int, default=16, help="digits models per backend")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray measurements")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {os.cpu_count()} CPU cores; load average {os.getloadavg()[0]:.1f}")
    digits = DigitsSubsets()
    masks = random_masks(N_TRAIN, args.models, 0.5, seed=1)
    digits.evaluate(digits.train(np.flatnonzero(masks[0]), 0))  # load data, warm up
    times = []
    for row, mask in enumerate(masks):
        started = time.perf_counter()
        digits.evaluate(digits.train(np.flatnonzero(mask), row))
        times.append(time.perf_counter() - started)
    results: list[tuple[str, float, float]] = [
        ("digits model, direct (no store)", float(np.median(times)), float(np.min(times)))
    ]
    startup: list[tuple[str, float]] = []
    backends: list[tuple[str, object]] = [
        ("in-process", "local"),
        ("2 processes", LocalBackend(processes=2)),
    ]
    if not args.no_ray:
        import ray

        started = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        startup.append(("ray.init(num_cpus=2)", time.perf_counter() - started))
        backends.append(("Ray (2 CPUs)", RayBackend()))
    with tempfile.TemporaryDirectory() as directory:
        for index, (label, backend) in enumerate(backends[1:]):
            # Start the workers, and have them import torch, datatrace and load the digits.
            seconds = timed_run(
                directory, f"warm-{index}", 4, digits.train, digits.evaluate, backend
            )
            startup.append((f"first run of 4 digits models, {label}", seconds))
        for index, (label, backend) in enumerate(backends):
            median, least = per_row(
                directory, f"noop-{index}", args.rows, args.repeats, noop_train, noop_evaluate,
                backend,
            )  # fmt: skip
            results.append((f"no-op row, {label}", median, least))
        for index, (label, backend) in enumerate(backends):
            median, least = per_row(
                directory, f"digits-{index}", args.models, 1, digits.train, digits.evaluate,
                backend,
            )  # fmt: skip
            results.append((f"digits model, {label} (wall / models)", median, least))
    if not args.no_ray:
        ray.shutdown()
    width = max(len(label) for label, _, _ in results)
    print(f"{'per row':<{width}}  {'median s':>9}  {'min s':>9}")
    for label, median, least in results:
        print(f"{label:<{width}}  {median:9.4f}  {least:9.4f}")
    print("once per pool / Ray session:")
    for label, seconds in startup:
        print(f"  {label}: {seconds:.1f} s")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
