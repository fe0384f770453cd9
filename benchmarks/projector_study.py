"""TRAK's quality and featurizing time with each projector, on the model families of families.py.

    python benchmarks/projector_study.py --out runs/damping-study --families digits-mlp digits-cnn

For each family (built, or reused from ``--out`` where ``damping_study.py`` cached it) and each
of its projection dimensions, TRAK is fitted with its defaults (damping from the features) and
each projector — ``sparse`` (per-example gradients, then sparse JL), ``factorized`` (per-layer
Gaussian Kronecker factors, LoGra), ``factgrass`` (per-layer masks then sparse JL) and
``tensorsketch`` (per-layer TensorSketch), the last three with the gradient-energy split — and the
family's metric (LDS or MRR) is computed for the first checkpoint and for the whole ensemble.
Featurizing time is the wall time of ``fit`` (features of every checkpoint and the kernel),
beside the time of one training epoch's forward and backward passes of the family's task output
over the same data and batch size (the limit). Prints one table per family and writes
``--out/projectors.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

import datatrace as dt
import families
from datatrace.data import Examples, batch_to
from datatrace.grads.checkpoints import load_checkpoint
from datatrace.grads.per_example import module_state

PROJECTORS = ("sparse", "tensorsketch", "factgrass", "factorized")
BATCH_SIZE = 32


def epoch_seconds(family: families.Family, batch_size: int) -> float:
    """One forward and backward pass of the task's output over the training set (the limit)."""
    model = family.model
    state = module_state(model, load_checkpoint(family.checkpoints[0], model, "cpu"))
    model.load_state_dict(state, strict=False)
    examples = Examples(family.train)
    start = time.perf_counter()
    for lo in range(0, examples.n, batch_size):
        batch = batch_to(examples.read(lo, min(lo + batch_size, examples.n)), "cpu")
        model.zero_grad()
        family.task.output(model, batch).sum().backward()
    return time.perf_counter() - start


def run(family: families.Family, projector: str, proj_dim: int) -> dict:
    def fitted(checkpoints) -> dt.TRAK:
        settings = dict(projector=projector, proj_dim=proj_dim, params=family.params)
        trak = dt.TRAK(family.model, family.task, batch_size=BATCH_SIZE, progress=False, **settings)
        return trak.fit(family.train, checkpoints)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        trak = fitted(family.checkpoints)
        fit_s = time.perf_counter() - start
        ensemble = trak.score(family.targets).scores
        single = fitted(family.checkpoints[:1]).score(family.targets).scores
    return {
        "projector": projector,
        "proj_dim": proj_dim,
        "feature_dim": trak.feature_dim_,
        "fit_s": fit_s,
        "one": family.evaluate(single),
        "ensemble": family.evaluate(ensemble),
        "checkpoints": len(family.checkpoints),
    }


def table(name: str, rows: list[dict], epoch_s: float) -> str:
    lines = [
        f"\n{name} (one epoch of forward+backward, batch {BATCH_SIZE}: {epoch_s:.2f} s)\n",
        "| projector | k asked (got) | metric, 1 checkpoint | metric, ensemble | fit s | ÷ epoch"
        " × checkpoints |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        limit = epoch_s * r["checkpoints"]
        lines.append(
            f"| {r['projector']} | {r['proj_dim']} ({r['feature_dim']}) | {r['one']:.3f} | "
            f"{r['ensemble']:.3f} | {r['fit_s']:.1f} | {r['fit_s'] / limit:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/damping-study"))
    parser.add_argument("--families", nargs="+", default=list(families.BUILDERS))
    parser.add_argument("--projectors", nargs="+", default=list(PROJECTORS))
    parser.add_argument("--proj-dims", nargs="+", type=int, help="default: each family's own")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results_path = args.out / "projectors.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    print(f"load average at start: {os.getloadavg()[0]:.2f}; threads {args.threads}")
    for name in args.families:
        family = families.BUILDERS[name](args.out / "families" / name)
        epoch_s = min(epoch_seconds(family, BATCH_SIZE) for _ in range(2))
        rows = []
        for proj_dim in args.proj_dims or family.proj_dims:
            for projector in args.projectors:
                rows.append(run(family, projector, proj_dim))
                print(
                    f"  {name} {projector} k={proj_dim}: {rows[-1]['ensemble']:.3f} "
                    f"({rows[-1]['fit_s']:.1f} s)",
                    flush=True,
                )
        # Rows of other projectors and dimensions measured before are kept.
        done = {(r["projector"], r["proj_dim"]) for r in rows}
        earlier = [
            r
            for r in results.get(name, {}).get("rows", [])
            if (r["projector"], r["proj_dim"]) not in done
        ]
        results[name] = {"epoch_s": epoch_s, "rows": earlier + rows}
        print(table(name, rows, epoch_s), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))
    summary = [
        (name, np.mean([r["ensemble"] for r in entry["rows"] if r["projector"] == p]))
        for name, entry in results.items()
        for p in args.projectors
    ]
    print("\nmean ensemble metric per family and projector:", summary)


if __name__ == "__main__":
    main()
