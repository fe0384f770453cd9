"""ModelDiff on planted patches: does the top direction find the subpopulation only A can use?

Usage: python benchmarks/modeldiff_planted.py [--fractions 0.15 0.2] [--seeds 0 1 2]

For each share of patched 0s and each seed of the patched subpopulation
(:class:`datatrace.demo.planted.PlantedPatch`: A trains on the images as they are, B erases the
top-left corner), TRAK (2 checkpoints per algorithm, k = 1024) attributes the 297 test images
(45 patched) and ModelDiff compares A with B four ways: TRAK's kernel term T (Q divided out) or
its scores T ⊙ Q, directions ranked by the explained-variance gap or in plain PCA order. For the
top direction of each comparison the table gives the share of its squared norm on the patched
examples ("mass"), precision@10 at its positive and negative ends, and the variance of A's and
B's attributions along it. Then the counterfactual: the patch drawn on the unpatched test images
of other classes, margin towards 0, 3 models per algorithm. About 30 s per configuration on one
CPU thread.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import numpy as np
import torch

from datatrace import TRAK, Classification
from datatrace.applications.modeldiff import A_VS_B, B_VS_A, ModelDiff, verify_direction
from datatrace.demo import make_model
from datatrace.demo.planted import PlantedPatch

K = 10


def cells(direction, patched: np.ndarray) -> str:
    """Mass on the patched examples, precision@K at both ends, variance of A and of B."""
    mass = float((direction.component[patched] ** 2).sum())
    positive = np.isin(direction.train_positive, patched).mean()
    negative = np.isin(direction.train_negative, patched).mean()
    return (f"{mass:.2f} | {positive:.1f} | {negative:.1f} | "
            f"{direction.variance_a:.4f} | {direction.variance_b:.4f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.15, 0.2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--check-seeds", type=int, default=3, help="models per algorithm")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        "| fraction | seed | scores | order | A vs B: mass | prec+ | prec− | var A | var B "
        "| B vs A: mass | prec+ | prec− | var A | var B |"
    )
    print("|---" * 14 + "|")
    checks = []
    for fraction in args.fractions:
        for seed in args.seeds:
            started = time.perf_counter()
            planted = PlantedPatch(fraction=fraction, seed=seed)
            data = planted.data()
            n_train = len(data.train_labels)
            attributions = {}
            for name, train, images in (
                ("a", planted.train_a, data.train_a),
                ("b", planted.train_b, data.train_b),
            ):
                states = [copy.deepcopy(train(np.arange(n_train), s).state_dict()) for s in (0, 1)]
                trak = TRAK(make_model("mlp"), Classification(), proj_dim=1024, batch_size=128,
                            progress=False)  # fmt: skip
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    trak.fit((images, data.train_labels), states)
                attributions[name] = trak.score((data.targets, data.target_labels))

            for divide in (True, False):
                for rank_by in ("variance_gap", "residual_variance"):
                    diff = ModelDiff(
                        n_components=3, top_k=K, rank_by=rank_by, divide_out_to_loss=divide
                    ).fit(attributions["a"], attributions["b"])
                    top_a = cells(diff.directions(A_VS_B)[0], data.patched)
                    top_b = cells(diff.directions(B_VS_A)[0], data.patched)
                    scores = "T" if divide else "T ⊙ Q"
                    order = rank_by.replace("_", " ")
                    print(f"| {fraction} | {seed} | {scores} | {order} | {top_a} | {top_b} |")
            labels = data.target_labels.numpy()
            others = np.setdiff1d(
                np.flatnonzero(labels != planted.patched_class), data.patched_targets
            )
            check = verify_direction(
                planted.train_a, planted.train_b, data.targets[torch.as_tensor(others)],
                planted.add_patch, planted.margin_to_patched_class, n_train=n_train,
                n_targets=len(others), n_seeds=args.check_seeds, seed=100, progress=False,
            )  # fmt: skip
            checks.append((fraction, seed, len(data.patched), check, time.perf_counter() - started))
    print("\n| fraction | seed | patched | change A | change B | A − B (± s.e.) | seconds |")
    print("|---|---|---|---|---|---|---|")
    for fraction, seed, n_patched, check, seconds in checks:
        print(
            f"| {fraction} | {seed} | {n_patched} | {check.mean_a:+.3f} ± {check.stderr_a:.3f} | "
            f"{check.mean_b:+.3f} ± {check.stderr_b:.3f} | {check.difference:+.3f} ± "
            f"{check.difference_stderr:.3f} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
