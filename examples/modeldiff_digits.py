"""ModelDiff on a planted difference: what training data does algorithm A use that B does not?

On the bundled digits, a share of the training 0s carry a bright 2×2 patch in the top-left corner.
Algorithm A trains on the images as they are; algorithm B trains with an augmentation that erases
that corner (:class:`datatrace.demo.planted.PlantedPatch`). TRAK attributes the test images
(45 of them patched) under each algorithm, ModelDiff compares the two, and a counterfactual check
adds the patch to test images of other classes and measures how far it moves the margin towards
0 under models of A and of B. Writes the attributions and images to a store and an HTML report;
about a minute on one CPU thread::

    python examples/modeldiff_digits.py --out modeldiff-digits   # --help for options
    datatrace modeldiff modeldiff-digits/store --a planted-a --b planted-b \\
        --train-images modeldiff-digits/train_a.npy --target-images modeldiff-digits/targets.npy \\
        --report modeldiff-digits/cli-report.html --divide-out-to-loss
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from datatrace import TRAK, Classification
from datatrace.applications.modeldiff import A_VS_B, B_VS_A, ModelDiff, verify_direction
from datatrace.demo import make_model
from datatrace.demo.planted import PlantedPatch
from datatrace.report import Section
from datatrace.report.modeldiff import write_modeldiff_report
from datatrace.store import Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="modeldiff-digits", help="output directory")
    parser.add_argument("--fraction", type=float, default=0.2, help="share of the 0s patched")
    parser.add_argument("--checkpoints", type=int, default=2, help="TRAK checkpoints per algorithm")
    parser.add_argument("--proj-dim", type=int, default=1024, help="TRAK projection dimension")
    parser.add_argument("--seeds", type=int, default=5, help="models per algorithm in the check")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patched subpopulation")
    parser.add_argument("--top-k", type=int, default=10, help="examples shown per direction end")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    store = Store(out / "store")
    planted = PlantedPatch(fraction=args.fraction, seed=args.seed)
    data = planted.data()
    n_train = len(data.train_labels)
    started = time.perf_counter()

    attributions = {}
    for name, train, images in (
        ("a", planted.train_a, data.train_a),
        ("b", planted.train_b, data.train_b),
    ):
        checkpoints = [
            copy.deepcopy(train(np.arange(n_train), seed).state_dict())
            for seed in range(args.checkpoints)
        ]
        trak = TRAK(make_model(planted.model), Classification(), proj_dim=args.proj_dim,
                    batch_size=128, progress=False)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # k = 1024 < n_train: no singular kernel here
            trak.fit((images, data.train_labels), checkpoints)
        attributions[name] = trak.score((data.targets, data.target_labels))
        store.save_attributions(f"planted-{name}", attributions[name])
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "train_a.npy", data.train_a.numpy())
    np.save(out / "targets.npy", data.targets.numpy())
    np.save(out / "train_labels.npy", data.train_labels.numpy())
    np.save(out / "target_labels.npy", data.target_labels.numpy())
    elapsed = time.perf_counter() - started
    print(f"TRAK of A and B ({args.checkpoints} checkpoints each): {elapsed:.0f} s")

    def mass(direction):
        return float((direction.component[data.patched] ** 2).sum())

    def precision(indices):
        return float(np.isin(indices, data.patched).mean())

    rows = []
    for divide in (True, False):
        diff = ModelDiff(n_components=3, top_k=args.top_k, divide_out_to_loss=divide).fit(
            attributions["a"], attributions["b"]
        )
        for which in (A_VS_B, B_VS_A):
            for direction in diff.directions(which):
                rows.append([
                    "T (Q divided out)" if divide else "T ⊙ Q", which, direction.rank + 1,
                    mass(direction), precision(direction.train_positive),
                    precision(direction.train_negative),
                    float(np.isin(direction.targets, data.patched_targets).mean()),
                    direction.variance_a, direction.variance_b,
                ])  # fmt: skip
        if divide:
            shown = diff
    columns = [
        "scores", "comparison", "rank", "mass on patched", f"precision@{args.top_k} +",
        f"precision@{args.top_k} −", "aligned targets patched", "variance A", "variance B",
    ]  # fmt: skip
    print(f"\n{len(data.patched)} patched training images of {n_train}:")
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row))

    labels = data.target_labels.numpy()
    others = np.setdiff1d(np.flatnonzero(labels != planted.patched_class), data.patched_targets)
    started = time.perf_counter()
    check = verify_direction(
        planted.train_a, planted.train_b, data.targets[torch.as_tensor(others)],
        planted.add_patch, planted.margin_to_patched_class, n_train=n_train,
        n_targets=len(others), n_seeds=args.seeds, seed=100, store=store,
        description={"planted": planted.description(), "check": "patch on other classes"},
    )  # fmt: skip
    print(
        f"\ncounterfactual ({args.seeds} models each, {time.perf_counter() - started:.0f} s): "
        f"patch on {len(others)} test images of other classes moves the margin towards "
        f"{planted.patched_class} by {check.mean_a:+.3f} ± {check.stderr_a:.3f} under A and "
        f"{check.mean_b:+.3f} ± {check.stderr_b:.3f} under B"
    )

    def per_model(change):
        return [round(float(value), 3) for value in change.mean(axis=1)]

    check_section = Section(
        "Counterfactual check: add the patch to test images of other classes",
        f"Change of the margin towards class {planted.patched_class} (its logit minus the "
        "log-sum-exp of the others) when the patch is drawn on "
        f"{len(others)} unpatched test images of other classes; {args.seeds} models per algorithm, "
        "mean over images, ± standard error over models.",
        columns=["algorithm", "mean change", "standard error", "per model"],
        rows=[
            ["A (plain)", check.mean_a, check.stderr_a, per_model(check.change_a)],
            ["B (corner erased)", check.mean_b, check.stderr_b, per_model(check.change_b)],
        ],
    )  # fmt: skip
    report = write_modeldiff_report(
        out / "report.html", shown, train_images=data.train_a, target_images=data.targets,
        train_labels=data.train_labels, target_labels=data.target_labels,
        names=("A (plain)", "B (corner erased)"),
        summary={"attributions": f"TRAK, {args.checkpoints} checkpoints, k={args.proj_dim}",
                 "patched training images": len(data.patched)},
        sections=[check_section], title="ModelDiff on digits with a planted patch",
    )  # fmt: skip
    print(f"report: {report}")


if __name__ == "__main__":
    main()
