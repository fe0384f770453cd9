"""ModelDiff's planted difference under the old defaults, the new ones, and the best setting.

    python benchmarks/modeldiff_defaults.py            # --seeds 0 1 2 --fraction 0.2

The planted case of ``modeldiff_planted.py`` (:class:`datatrace.demo.planted.PlantedPatch`: A
trains on the images as they are, B erases the top-left corner where a share of training 0s
carry a patch). Per seed, TRAK on 2 checkpoints per algorithm and ModelDiff on the 297 test
images; reported: precision of the patched training images among the top ``K`` (10, and the
number of patched images) of the first A-vs-B direction's positive end, for

* the old defaults: ``TRAK(proj_dim=2048, damping=1.0, projector="sparse")`` (damping relative
  to the mean diagonal of ``ΦᵀΦ``; sparse JL was the default projection of small models) and
  ``ModelDiff(divide_out_to_loss=False)``;
* the new defaults: ``TRAK()`` and ``ModelDiff()``;
* every combination of ``k`` in 256, 1024, 2048, relative damping in 0.1, 1, 10 and Q divided
  out or not (the best is the row the table's "best" column reports).

``--label-smoothing 0.1`` trains both algorithms with label smoothing: no example is then fit to
``Q ≈ 0``, ``Q`` does not collapse on the patched images, and ModelDiff compares ``T ⊙ Q``.
One CPU thread.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import warnings

import numpy as np
import torch

from datatrace import TRAK, Classification
from datatrace.applications.modeldiff import A_VS_B, ModelDiff
from datatrace.demo import make_model
from datatrace.demo.planted import PlantedPatch

PROJ_DIMS = (256, 1024, 2048)
DAMPINGS = (0.1, 1.0, 10.0)


def precision(attributions: dict, patched: np.ndarray, divide, k: int) -> float:
    diff = ModelDiff(n_components=3, top_k=k, divide_out_to_loss=divide)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diff.fit(attributions["a"], attributions["b"])
    return float(np.isin(diff.directions(A_VS_B)[0].train_positive, patched).mean())


def attribute_both(data, states: dict, **settings) -> dict:
    """TRAK attributions of the test images under A's and B's checkpoints."""
    result = {}
    for name, images in (("a", data.train_a), ("b", data.train_b)):
        trak = TRAK(make_model("mlp"), Classification(), batch_size=128, progress=False,
                    **settings)  # fmt: skip
        trak.fit((images, data.train_labels), states[name])
        result[name] = trak.score((data.targets, data.target_labels))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="of both algorithms' training loss (with it, Q does not collapse)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        planted = PlantedPatch(
            fraction=args.fraction, seed=seed, label_smoothing=args.label_smoothing
        )
        data = planted.data()
        n_train = len(data.train_labels)
        states = {
            name: [copy.deepcopy(train(np.arange(n_train), s).state_dict()) for s in (0, 1)]
            for name, train in (("a", planted.train_a), ("b", planted.train_b))
        }
        n_patched = len(data.patched)
        settings = {
            "old defaults": (
                attribute_both(data, states, proj_dim=2048, damping=1.0, projector="sparse"),
                False,
            ),
            "new defaults": (attribute_both(data, states), "auto"),
        }
        grid = {}
        for proj_dim, damping in itertools.product(PROJ_DIMS, DAMPINGS):
            scores = attribute_both(data, states, proj_dim=proj_dim, damping=damping)
            for divide in (True, False):
                grid[(proj_dim, damping, divide)] = scores
        for k in (10, n_patched):
            row = {"seed": seed, "k": k, "n_patched": n_patched}
            for label, (scores, divide) in settings.items():
                row[label] = precision(scores, data.patched, divide, k)
            best = max(
                (precision(scores, data.patched, key[2], k), key) for key, scores in grid.items()
            )
            row["best"], row["best setting"] = best
            rows.append(row)
            print(row, flush=True)
    print(
        f"\nModelDiff on the planted patch (share {args.fraction}, label smoothing "
        f"{args.label_smoothing}); precision of the patched"
    )
    print("training images at the top-K of the first A-vs-B direction\n")
    print("| seed | K | old defaults | new defaults | best | best (k, damping, Q divided out) |")
    print("|---|---|---:|---:|---:|---|")
    for row in rows:
        print(
            f"| {row['seed']} | {row['k']} | {row['old defaults']:.2f} | "
            f"{row['new defaults']:.2f} | {row['best']:.2f} | {row['best setting']} |"
        )


if __name__ == "__main__":
    main()
