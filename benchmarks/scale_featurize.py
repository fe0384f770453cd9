"""Featurizing on a backend: a small CNN with 2 worker processes against 1, same store?

Usage: python benchmarks/scale_featurize.py [--n-train 1500] [--proj-dim 1024] [--chunk 100]
                                            [--checkpoints 2] [--channels 32] [--repeats 3]
                                            [--ray]

Featurizes the bundled digits' training split with the digits CNN (``make_model("cnn")``, two
3×3 convolutions of ``--channels`` and ``2 × --channels`` channels, then a linear head) under
``--checkpoints`` checkpoints into a fresh local store, with ``GradientFeatures.featurize_train``
(features, Q, example hashes, partial Grams; no kernel), in each of these ways:

  in-process, 2 threads   what ``TRAK.fit(...)`` does by default on this machine (2 cores);
  in-process, 1 thread    the single-worker reference;
  LocalBackend(1)         one worker process (1 thread): the backend's own overhead;
  LocalBackend(2)         two worker processes (1 thread each), pool already started;
  LocalBackend(2), cold   the same, including starting the pool (imports torch in each worker);
  RayBackend(2 × 1 CPU)   with ``--ray``: a local Ray instance with 2 CPUs, started.

Prints the fastest of ``--repeats`` timings of each (the machine is shared: the fastest is the
least disturbed; the load average is printed with each), the speed-up against the 1-thread
reference, and whether every array of the store (features, Q, hashes, marks, partial Grams) is
bit for bit the reference's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
import zarr

from datatrace import Classification
from datatrace.demo import digits_split, make_model
from datatrace.grads.featurize import GradientFeatures
from datatrace.grads.projectors import make_projector
from datatrace.store import Store
from datatrace.subsets import LocalBackend, RayBackend

ARRAYS = ("features", "out_to_loss", "example_hash", "done", "partial_gram")


def store_arrays(path: str, n_checkpoints: int) -> dict[str, np.ndarray]:
    root = zarr.open_group(path, mode="r")
    return {
        f"{index}/{name}": root[f"features/{index}/{name}"][:]
        for index in range(n_checkpoints)
        for name in ARRAYS
        if name in root[f"features/{index}"]  # no partial Grams when k > n (the dual)
    }


def featurize(args, directory: str, name: str, backend, threads: int) -> tuple[float, str]:
    """Seconds of one featurization into a fresh store, and the store's path."""
    images, labels = digits_split()[0].as_tuple()
    data = images[: args.n_train], labels[: args.n_train]
    model = make_model("cnn", seed=0, channels=args.channels)
    checkpoints = [
        make_model("cnn", seed=seed, channels=args.channels).state_dict()
        for seed in range(args.checkpoints)
    ]
    features = GradientFeatures(
        model,
        Classification(),
        make_projector("sparse", args.proj_dim),
        batch_size=args.batch_size,
        chunk_rows=args.chunk,
        progress=False,
    )
    path = os.path.join(directory, name)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        features.featurize_train(data, checkpoints, Store(path), backend=backend)
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)
    return seconds, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=1500)
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--checkpoints", type=int, default=2)
    parser.add_argument("--channels", type=int, default=32, help="of the CNN's first layer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ray", action="store_true", help="also run on a local Ray instance")
    args = parser.parse_args()

    pool1 = LocalBackend(processes=1)
    pool2 = LocalBackend(processes=2)
    ways = [
        ("in-process, 2 threads", lambda: None, 2),
        ("in-process, 1 thread", lambda: None, 1),
        ("LocalBackend(1)", lambda: pool1, 1),
        ("LocalBackend(2)", lambda: pool2, 1),
        ("LocalBackend(2), cold", lambda: LocalBackend(processes=2), 1),
    ]
    if args.ray:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ways.append(("RayBackend(2 × 1 CPU)", lambda: RayBackend(num_cpus=1), 1))

    with tempfile.TemporaryDirectory() as directory:
        # Warm up this process, start the kept pools and Ray's workers once (starting a pool is
        # the "cold" row's cost).
        warm = [None, pool1, pool2] + ([RayBackend(num_cpus=1)] if args.ray else [])
        for position, backend in enumerate(warm):
            featurize(args, directory, f"warmup-{position}", backend, 1)
        results, paths = {}, {}
        for repeat in range(args.repeats):
            for name, make_backend, threads in ways:
                backend = make_backend()
                load = os.getloadavg()[0]
                seconds, path = featurize(args, directory, f"{name}-{repeat}", backend, threads)
                if name.endswith("cold"):
                    backend.shutdown()
                results.setdefault(name, []).append((seconds, load))
                paths[name] = path
        reference = store_arrays(paths["in-process, 1 thread"], args.checkpoints)
        base = min(seconds for seconds, _ in results["in-process, 1 thread"])
        print(
            f"digits CNN, n_train={args.n_train}, k={args.proj_dim}, chunk={args.chunk}, "
            f"{args.checkpoints} checkpoints, {os.cpu_count()} cores; fastest of {args.repeats}"
        )
        print(f"{'way':24} {'seconds':>8} {'speed-up':>9} {'load':>5}  identical")
        for name, timings in results.items():
            seconds, load = min(timings)
            arrays = store_arrays(paths[name], args.checkpoints)
            same = arrays.keys() == reference.keys() and all(
                np.array_equal(arrays[key], reference[key]) for key in reference
            )
            print(f"{name:24} {seconds:8.2f} {base / seconds:8.2f}× {load:5.1f}  {same}")
    pool1.shutdown()
    pool2.shutdown()


if __name__ == "__main__":
    main()
