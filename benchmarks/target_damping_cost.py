"""What the per-target damping of ``damping="auto"`` costs at scoring, against one damping.

    python benchmarks/target_damping_cost.py            # --proj-dims 512 2048 4096 --threads 1

On the bundled digits (1,500 training images, 297 test targets, the demo's MLP, 3 checkpoints
of 10 epochs): ``TRAK(damping="auto")`` and ``TRAK(damping=3.0)`` are fitted on the same
checkpoints, then the targets are scored three times; prints the fit, the first score call
(which factorises the kernel once per distinct per-target factor) and the fastest of the next
two, and how many factors each checkpoint's kernel holds. Wall seconds on a shared machine:
read the ratios.
"""

from __future__ import annotations

import argparse
import time

import torch

import datatrace as dt
from datatrace.demo.data import digits_split
from datatrace.demo.models import make_model
from datatrace.demo.training import train_checkpoints


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proj-dims", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, test = digits_split(n_test=297, seed=0)
    states = train_checkpoints(train, args.checkpoints, epochs=10)
    model = make_model("mlp")
    targets = (test.images, test.labels)
    print("| k | damping | fit s | first score s | later score s | factors per checkpoint |")
    print("|---:|---|---:|---:|---:|---|")
    for proj_dim in args.proj_dims:
        for damping in ("auto", 3.0):
            trak = dt.TRAK(model, dt.Classification(), proj_dim=proj_dim, damping=damping,
                           progress=False)  # fmt: skip
            start = time.perf_counter()
            trak.fit((train.images, train.labels), states)
            fit = time.perf_counter() - start
            start = time.perf_counter()
            trak.score(targets)
            first = time.perf_counter() - start
            later = []
            for _ in range(2):
                start = time.perf_counter()
                trak.score(targets)
                later.append(time.perf_counter() - start)
            factors = [len(kernel._factors) for kernel in trak.kernels_]
            print(f"| {proj_dim} | {damping} | {fit:.2f} | {first:.2f} | {min(later):.2f} | "
                  f"{factors} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
