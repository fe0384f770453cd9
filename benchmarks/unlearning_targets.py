"""How far datamodel matching's targets are from retraining, per forget image, without fine-tuning.

Usage: python benchmarks/unlearning_targets.py --store DIR [--alpha 0.5 0.3] [--subsets 600]

``benchmarks/unlearning_klom.py``'s set-up (its ``Bench``: the digits, the two forget sets, 100
original models, 100 models retrained without each forget set; cached in the same ``--store``
layout, so a store of that benchmark is reused) and, per ``--alpha``, ``--subsets`` models trained
on random subsets of that fraction, whose centred logits of the attributed points are regressed
directly — no datamodels fit — on counts of the forget set in each subset. Each estimator gives a
predicted change ``Δ_j`` of forget image ``j``'s logits (full training set minus retrained); the
predicted retrained margins are the original models' logits minus ``Δ_j``. Printed per forget
set and estimator: the error of their mean from the retrained models' mean margin, in units of
the retrained models' spread on that image (mean, standard deviation and median of its absolute
value over the 100 forget images), and the median KLoM of the predicted margins against the
retrained ones (what matching these targets perfectly would reach):

- ``count``: each logit regressed on the number of forget images in the subset, times ``|F|``
  (the group estimate of ``Datamodels.contribution`` without the datamodels' other weights);
- ``self + rest``: image ``j``'s own presence and the count of the other forget images apart;
- ``local K, shape``: also the count of ``j``'s ``K`` nearest forget images (in pixels) apart,
  entering as ``shape`` (``linear``, ``quadratic`` or ``sqrt``): whether the joint effect is
  local and non-linear in how many close neighbours remain;
- ``margin count``: the margin itself regressed on the count (the change then applied to the
  true class's logit).

Measured figures and what they show: docs/unlearning.md ("Where the targets' error comes from").
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
import torch

import unlearning_klom as uk
from datatrace.applications.unlearning import klom
from datatrace.demo.models import make_model
from datatrace.subsets import SubsetExperiment


def subset_table(bench: uk.Bench, alpha: float, n_masks: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks ``(R, n_train)`` and centred point logits ``(R, n_points, 10)`` at fraction ``alpha``
    (the benchmark's own table at its α, another table otherwise)."""
    name = "subsets" if alpha == bench.config.alpha else f"subsets-a{round(alpha * 100)}"
    experiment = SubsetExperiment(
        bench.store,
        name,
        n_train=bench.n_train,
        n_outputs=len(bench.points) * uk.N_CLASSES,
        n_masks=n_masks,
        alpha=alpha,
        seed=bench.config.seed,
        description={"recipe": uk.RECIPE_DESCRIPTION, "evaluate": "point_logits"},
    )
    experiment.run(uk.RECIPE.train, bench.point_logits, progress=True)
    results = experiment.results()
    masks = np.asarray(results.masks, dtype=np.float64)
    outputs = np.asarray(results.outputs, dtype=np.float64)
    return masks, outputs.reshape(len(masks), len(bench.points), uk.N_CLASSES)


def margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``logit_y − logsumexp_{c≠y} logit_c`` over the last axis; ``labels`` broadcast to it."""
    labels = np.broadcast_to(labels, logits.shape[:-1])[..., None]
    true = np.take_along_axis(logits, labels, -1)[..., 0]
    others = logits.copy()
    np.put_along_axis(others, labels, -np.inf, -1)
    top = others.max(-1, keepdims=True)
    return true - (top[..., 0] + np.log(np.exp(others - top).sum(-1)))


def effect(design: np.ndarray, outputs: np.ndarray, full: np.ndarray, none: np.ndarray):
    """Least-squares fit of ``outputs`` on ``design``; the fitted change from row ``full`` of
    the design (the full training set) to row ``none`` (without the forget set)."""
    coefficients = np.linalg.lstsq(design, outputs, rcond=None)[0]
    return (full - none) @ coefficients


def target_errors(original, labels, truth, change, margin=False):
    """The predicted retrained margins (the original models' logits less ``change``, or their
    margins less it with ``margin``) and each image's error in retrained spreads."""
    if margin:
        predicted = margins(original, labels) - change[None]
    else:
        predicted = margins(original - change[None], labels)
    return predicted, (predicted.mean(0) - truth.mean(0)) / truth.std(0)


def print_errors(forget, errors, name, change, *, margin=False) -> None:
    predicted, error = errors(change, margin)
    truth = errors.args[2]
    print(
        f"  {forget:8s} {name:24s} error mean {error.mean():+6.2f}  sd {error.std():5.2f}  "
        f"median |error| {np.median(np.abs(error)):5.2f}  "
        f"KLoM median {np.median(klom(predicted, truth)):5.2f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.5])
    parser.add_argument("--subsets", type=int, default=600)
    parser.add_argument("--neighbours", type=int, nargs="*", default=[5, 10, 20])
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench = uk.Bench(args.store, uk.Config())
    labels = bench.train_data[1].numpy()
    pixels = bench.train_data[0].flatten(1).numpy()
    original = []
    for state in bench.originals():
        model = make_model(uk.RECIPE.model)
        model.load_state_dict(state)
        original.append(bench.point_logits(model).reshape(len(bench.points), uk.N_CLASSES))
    original = np.stack(original)  # (models, points, classes)
    retrained = {
        forget: bench.retrained(forget, "retrain_1", bench.config.models)[:, : bench.n_train]
        for forget in bench.forget_sets
    }
    for alpha in args.alpha:
        masks, outputs = subset_table(bench, alpha, args.subsets)
        n_subsets = len(masks)
        print(f"\nα = {alpha}: {n_subsets} subset models")
        for forget, indices in bench.forget_sets.items():
            rows = np.searchsorted(bench.points, indices)
            truth = retrained[forget][:, indices]
            size = len(indices)
            count = masks[:, indices].sum(1)
            ones = np.ones(n_subsets)

            errors = functools.partial(target_errors, original[:, rows], labels[indices], truth)
            report = functools.partial(print_errors, forget, errors)

            design = np.column_stack([ones, count])
            report("count", np.stack([
                effect(design, outputs[:, row], np.array([1, size]), np.array([1, 0]))
                for row in rows
            ]))  # fmt: skip
            # Sampling noise of that estimate: the same fit on two disjoint halves of the subsets
            # differs by twice its variance at half the models, i.e. 4× its variance at all of them.
            halves = np.array_split(np.random.default_rng(0).permutation(n_subsets), 2)
            half_errors = [
                errors(np.stack([
                    effect(design[half], outputs[half, row], np.array([1, size]), np.array([1, 0]))
                    for row in rows
                ]))[1]
                for half in halves
            ]  # fmt: skip
            noise = np.std(half_errors[0] - half_errors[1]) / 2
            total = errors(np.stack([
                effect(design, outputs[:, row], np.array([1, size]), np.array([1, 0]))
                for row in rows
            ]))[1].std()  # fmt: skip
            print(
                f"  {forget:8s} {'count: noise, the rest':24s} sd of its error from sampling "
                f"{noise:5.2f} (split halves), the rest {np.sqrt(max(total**2 - noise**2, 0)):5.2f}"
            )
            changes = []
            for image, row in zip(indices, rows):
                own = masks[:, image]
                design = np.column_stack([ones, own, count - own])
                changes.append(effect(design, outputs[:, row], np.array([1, 1, size - 1]),
                                      np.array([1, 0, 0])))  # fmt: skip
            report("self + rest", np.stack(changes))
            shapes = {
                "linear": lambda local: [local],
                "quadratic": lambda local: [local, local**2],
                "sqrt": lambda local: [np.sqrt(local + 1)],
            }
            for k in args.neighbours:
                for shape, terms in shapes.items():
                    changes = []
                    for image, row in zip(indices, rows):
                        others = indices[indices != image]
                        nearest = others[
                            np.argsort(np.linalg.norm(pixels[others] - pixels[image], axis=1))[:k]
                        ]
                        own, local = masks[:, image], masks[:, nearest].sum(1)
                        design = np.column_stack([ones, own, *terms(local), count - own - local])
                        full = np.array([1, 1, *terms(np.float64(k)), size - 1 - k])
                        none = np.array([1, 0, *terms(np.float64(0)), 0])
                        changes.append(effect(design, outputs[:, row], full, none))
                    report(f"local {k}, {shape}", np.stack(changes))
            subset_margins = margins(outputs[:, rows], labels[indices])
            design = np.column_stack([ones, count])
            report("margin count", np.array([
                effect(design, subset_margins[:, column], np.array([1, size]), np.array([1, 0]))
                for column in range(size)
            ]), margin=True)  # fmt: skip


if __name__ == "__main__":
    main()
