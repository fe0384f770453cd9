"""Does a subset design that varies whole regions of the training set estimate a coherent
forget set's joint effect better than random halves? (docs/unlearning.md, "Where the targets'
error comes from".)

    python benchmarks/unlearning_subset_design.py --store DIR              # 2,000 models per design
    python benchmarks/unlearning_subset_design.py --store DIR --subsets 600

Uses the stages of ``unlearning_klom.py`` (its ``Bench``: data, forget sets, 100 original models,
100 models retrained without each forget set; cached in ``DIR``) and trains two subset tables of
``--subsets`` models each on the benchmark's points:

- ``subsets``: random halves (α = 0.5), the benchmark's design;
- ``clustered``: the training images clustered by k-means in pixels at four scales (8, 16, 32, 64
  clusters); each mask picks one scale and, per cluster, keeps a fraction ``α_c ~ Beta(0.5,
  0.5)`` of its images (each image independently), so a cluster's share spans 0 to 1.

For each design and forget set, each centred logit of the points is regressed on the forget
set's count in the subset (alone, or with the count of each class outside the forget set as
covariates), and the slope times ``|F|`` is the joint effect; DMM's targets are the original
models' logits minus it. Printed per forget image: the error of the targets' mean margin against
the retrained models' mean margin, in units of the retrained models' standard deviation (mean,
spread, median absolute value), and the forget set's count across the subsets.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import unlearning_klom as uk
from datatrace.demo.models import make_model
from datatrace.subsets import SubsetExperiment

SCALES = (8, 16, 32, 64)
MASK_SEED = 1000
CLUSTERED_TRAIN_SEED = 7


def kmeans(points: np.ndarray, k: int, seed: int = 0, iterations: int = 50) -> np.ndarray:
    """Lloyd's k-means from ``k`` random points: each point's cluster, ``(n,)``."""
    rng = np.random.default_rng(seed)
    centres = points[rng.choice(len(points), k, replace=False)]
    for _ in range(iterations):
        assign = ((points[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        moved = np.stack(
            [points[assign == c].mean(0) if (assign == c).any() else centres[c] for c in range(k)]
        )
        if np.allclose(moved, centres):
            break
        centres = moved
    return assign


def clustered_masks(images: torch.Tensor, n_masks: int) -> np.ndarray:
    points = images.flatten(1).numpy().astype(np.float64)
    partitions = [kmeans(points, k) for k in SCALES]
    rng = np.random.default_rng(MASK_SEED)
    scale = rng.integers(0, len(SCALES), n_masks)
    keep = np.empty((n_masks, len(points)))
    for row in range(n_masks):
        keep[row] = rng.beta(0.5, 0.5, size=SCALES[scale[row]])[partitions[scale[row]]]
    return rng.random(keep.shape) < keep


def margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    true = np.take_along_axis(logits, labels[None, :, None], -1)[..., 0]
    other = logits.copy()
    np.put_along_axis(other, labels[None, :, None], -np.inf, -1)
    return true - other.max(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="directory for the cached stages")
    parser.add_argument("--subsets", type=int, default=2000, help="subset models per design")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench = uk.Bench(Path(args.store), uk.Config(subsets=args.subsets))
    n_points = len(bench.points)
    description = {"recipe": uk.RECIPE_DESCRIPTION, "evaluate": "point_logits"}
    shape = {"n_train": bench.n_train, "n_outputs": n_points * uk.N_CLASSES}
    tables = {
        "random halves": SubsetExperiment(
            bench.store, "subsets", **shape, n_masks=args.subsets, alpha=0.5,
            seed=bench.config.seed, description=description,
        ),
        "clustered": SubsetExperiment(
            bench.store, "clustered", **shape,
            masks=clustered_masks(bench.train_data[0], args.subsets),
            seed=CLUSTERED_TRAIN_SEED, description=description,
        ),
    }  # fmt: skip
    for table in tables.values():
        table.run(uk.RECIPE.train, bench.point_logits, progress=True)
    original = []
    for state in bench.originals():
        model = make_model(uk.RECIPE.model)
        model.load_state_dict(state)
        original.append(bench.point_logits(model))
    original = np.stack(original).reshape(-1, n_points, uk.N_CLASSES)
    labels = bench.train_data[1].numpy()
    point_labels = labels[bench.points]
    print(f"{args.subsets} subset models per design; errors in retrained standard deviations")
    for forget, indices in bench.forget_sets.items():
        in_forget = np.zeros(bench.n_train, bool)
        in_forget[indices] = True
        retrained = bench.retrained(forget, "retrain_1", bench.config.models)[:, 1797:]
        retrained = margins(retrained.reshape(-1, n_points, uk.N_CLASSES), point_labels)
        centre, spread = retrained.mean(0), retrained.std(0)
        rows = np.searchsorted(bench.points, indices)
        for name, table in tables.items():
            results = table.results()
            masks = np.asarray(results.masks, dtype=np.float64)
            outputs = np.asarray(results.outputs, dtype=np.float64)
            count = masks[:, in_forget].sum(1)
            for covariates in ("count", "count + classes"):
                columns = [np.ones(len(masks)), count]
                if covariates != "count":
                    columns += [
                        masks[:, ~in_forget & (labels == c)].sum(1) for c in range(uk.N_CLASSES)
                    ]
                coefficients, *_ = np.linalg.lstsq(np.column_stack(columns), outputs, rcond=None)
                effect = coefficients[1].reshape(n_points, uk.N_CLASSES) * len(indices)
                target = margins(original - effect[None], point_labels).mean(0)
                error = ((target - centre) / spread)[rows]
                print(
                    f"{forget:9s} {name:14s} {covariates:16s} error mean {error.mean():+.2f} "
                    f"spread {error.std():.2f} median |error| {np.median(np.abs(error)):.2f}  "
                    f"(forget count {count.mean():.1f} ± {count.std():.1f}, {count.min():.0f}–"
                    f"{count.max():.0f})"
                )


if __name__ == "__main__":
    main()
