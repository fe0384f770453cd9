"""Every attribution method on one model, under both LDS protocols, with its compute.

    python benchmarks/methods_digits.py --store methods-digits.zarr     # resumable; --help
    python benchmarks/methods_digits.py --family text --store methods-text.zarr

Model (``--family``, built by methods_runs.py): ``digits``, the digits MLP of
metagradients_digits.py (64 → 32 tanh → 10, float64) on the first ``--n-train`` of the 1,500
training digits, targets the first ``--targets`` of the 297 test digits; ``text``, the head of
families.py's MiniLM text classifier (pretrained pooler 384 → 384 tanh and a new classifier,
float64) on the frozen encoder's states of 400 training docstrings (cached in ``--store``),
targets the first ``--targets`` of 100 test docstrings. Both are trained by datatrace's
deterministic loop (:mod:`datatrace.methods.training`: SGD with momentum, batch 64, ``--epochs``
epochs); outputs are the targets' margins. Every method attributes the same run: the
one trained with the seed of the small-drop table (its models' shared seed), so each method's
scores are computed once and scored against both ground truths.

Ground truth, as subset experiments in ``--store`` (a rerun trains only what is missing):

* classic: random halves, each model trained with a fresh seed (initialisation and data
  order) by the same recipe on its half alone;
* small-drop: subsets that each leave out ``--drop-fraction`` (default 1%) of the training
  set, every model trained with the attributed run's seed and data order
  (:func:`datatrace.methods.training.train_subset`, seed policy ``fixed``).

The first ``--subsets`` rows of each table are the ground truth; the next ``--datamodel-models``
rows are the fitting data of that protocol's datamodels (disjoint rows of one table, so that the
small-drop fitting models share the attributed run's seed).

Rows: TRAK (sparse JL, ``k = --proj-dim``, default damping) with the attributed checkpoint and
with 10 checkpoints (that run and 9 more seeds), influence functions with EK-FAC and K-FAC
(empirical Fisher, relative damping 0.1 as in influence_digits.py), metagradients (exact, through
the attributed run), datamodels, and the gradient dot product on the attributed checkpoint.
Compute: CPU seconds of fit + score, and their multiple of one training run of the attributed
model measured in this process; TRAK-10 adds its 9 extra trainings, and datamodels the training
of their fitting models (CPU of a sample of them, retrained here, times their number: cached
models cost nothing on a rerun but a user pays for them once). CPU rather than wall time,
because wall time on a shared machine mostly measures the others' load. Runs on ``--threads``
torch threads (default 1). Prints the table as markdown and writes it with the configuration to
``--json``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch

import datatrace as dt
from datatrace.evaluation.lds import LDSResult, lds
from datatrace.methods.datamodels import Datamodels
from datatrace.subsets import SubsetResults
from influence_digits import timed
from metagradients_digits import ground_truth
from methods_runs import FAMILIES, family_runs

# Mask seeds of the two tables (each holds the ground truth and the datamodels' fitting rows).
MASK_SEEDS = {"classic": 11, "small-drop": 12}
# TRAK's ensemble: the attributed run plus the next seeds (seed + 1, ..., seed + 9).
ENSEMBLE = 10
# Batch size of per-example gradients (TRAK, influence functions, gradient dot product).
GRADIENT_BATCH = 32
# Relative damping of influence functions: influence_digits.py's default, flat in 0.1–1 there.
INFLUENCE_DAMPING = 0.1
# Fitting models retrained here to measure one's CPU time (datamodels' compute).
TIMING_SAMPLE = 5


def split_rows(
    results: SubsetResults, n_truth: int, n_fit: int
) -> tuple[SubsetResults, SubsetResults]:
    """Rows ``[0, n_truth)`` (ground truth) and ``[n_truth, n_truth + n_fit)`` (datamodels'
    fitting data); a table made by a larger run may hold more rows, which are left out."""
    parts = []
    fitting = (results.rows >= n_truth) & (results.rows < n_truth + n_fit)
    for keep in (results.rows < n_truth, fitting):
        parts.append(
            SubsetResults(
                results.masks[keep], results.outputs[keep], results.rows[keep], results.seeds[keep]
            )
        )
    return parts[0], parts[1]


def training_cpu(runs, fitting: SubsetResults) -> float:
    """CPU seconds of training one fitting model, the mean over ``TIMING_SAMPLE`` of them."""
    started = time.process_time()
    sample = min(TIMING_SAMPLE, len(fitting.masks))
    for mask, seed in zip(fitting.masks[:sample], fitting.seeds[:sample]):
        runs.train(np.flatnonzero(mask), int(np.ravel(seed)[0]))
    return (time.process_time() - started) / max(sample, 1)


def damping_setting(value: str) -> str | float:
    """``--trak-damping``: ``"auto"`` or a number."""
    return value if value == "auto" else float(value)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=FAMILIES, default="digits", help="the model")
    parser.add_argument("--store", default=None, help="default methods-FAMILY.zarr")
    parser.add_argument("--json", default=None, help="where the table goes (methods-FAMILY.json)")
    parser.add_argument(
        "--n-train", type=int, default=None, help="training examples (default all: 1500, 400)"
    )
    parser.add_argument(
        "--targets", type=int, default=None, help="test examples attributed (all: 297, 100)"
    )
    parser.add_argument("--subsets", type=int, default=200, help="ground-truth models each")
    parser.add_argument(
        "--datamodel-models", type=int, default=2000, help="datamodels' fitting models each"
    )
    parser.add_argument("--drop-fraction", type=float, default=0.01)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument(
        "--trak-damping", type=damping_setting, default="auto",
        help="TRAK's damping: 'auto' (its default) or a number (relative to tr(ΦᵀΦ)/k)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.store = args.store or f"methods-{args.family}.zarr"
    args.json = args.json or f"methods-{args.family}.json"

    small_drop_runs, classic_runs = family_runs(args.family, args.store, args.epochs, args.n_train)
    args.n_train = small_drop_runs.n_train
    test_inputs, test_labels = small_drop_runs.test_data
    args.targets = len(test_labels) if args.targets is None else args.targets
    if not 1 <= args.targets <= len(test_labels):
        raise SystemExit(f"--targets must be between 1 and {len(test_labels)}, got {args.targets}")
    rows_total = args.subsets + args.datamodel_models
    prefix = small_drop_runs.prefix()
    tables = {
        "classic": ground_truth(
            args.store, f"{prefix}/classic", classic_runs, rows_total,
            seed=MASK_SEEDS["classic"],
        ),
        "small-drop": ground_truth(
            args.store, f"{prefix}/small-drop", small_drop_runs, rows_total,
            seed=MASK_SEEDS["small-drop"], drop_fraction=args.drop_fraction,
            seed_policy="fixed",
        ),
    }  # fmt: skip
    seed = tables["small-drop"].row_seeds(0)[0]
    columns = slice(0, args.targets)
    truths, fittings = {}, {}
    for protocol, table in tables.items():
        truth, fitting = split_rows(table.results(), args.subsets, args.datamodel_models)
        truths[protocol] = (truth.masks, truth.outputs[:, columns])
        fittings[protocol] = fitting

    train = small_drop_runs.train_data
    targets = (test_inputs[columns], test_labels[columns])
    task = dt.Classification()
    full = np.arange(args.n_train)
    small_drop_runs.train(full, seed)  # the first run pays torch.func's one-off setup: untimed
    model, training_wall, one_training = timed(small_drop_runs.train, full, seed)
    with torch.no_grad():
        accuracy = (model(test_inputs).argmax(1) == test_labels).double().mean().item()
    n_steps = len(small_drop_runs.recipe(seed).data_order(args.n_train))
    print(
        f"# attributed run: seed {seed}, {n_steps} steps, test accuracy {accuracy:.3f}, "
        f"one training {training_wall:.2f} s ({one_training:.2f} CPU s)",
        flush=True,
    )
    others, _, others_cpu = timed(
        lambda: [small_drop_runs.train(full, seed + offset) for offset in range(1, ENSEMBLE)]
    )
    states = [model.state_dict()] + [other.state_dict() for other in others]

    rows: list[dict] = []

    def add(method: str, setting: str, per_protocol: dict, cpu: float, extra_cpu: float = 0.0):
        row = {
            "method": method, "setting": setting, "cpu_s": cpu + extra_cpu,
            "fit_score_cpu_s": cpu, "training_cpu_s": extra_cpu, "lds": {},
        }  # fmt: skip
        for protocol, attributions in per_protocol.items():
            if attributions is None:
                row["lds"][protocol] = None
                continue
            masks, outputs = truths[protocol]
            result: LDSResult = lds(attributions, masks, outputs, protocol=protocol)
            row["lds"][protocol] = {"mean": result.mean, "ci": list(result.ci)}
        row["x_training"] = row["cpu_s"] / one_training
        rows.append(row)
        summary = ", ".join(
            f"{protocol} {value['mean']:.3f}" if value else f"{protocol} —"
            for protocol, value in row["lds"].items()
        )
        print(f"# {method} ({setting}): LDS {summary}; {row['cpu_s']:.1f} CPU s", flush=True)

    def fit_and_score(estimator, *checkpoints):
        return estimator.fit(train, *checkpoints).score(targets)

    def both(attributions) -> dict:
        return {"classic": attributions, "small-drop": attributions}

    for count in (1, ENSEMBLE):
        trak = dt.TRAK(
            model, task, proj_dim=args.proj_dim, damping=args.trak_damping,
            batch_size=GRADIENT_BATCH, progress=False,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dt.SingularKernelWarning)
            scores, _, cpu = timed(fit_and_score, trak, states[:count])
        extra = others_cpu if count > 1 else 0.0
        setting = f"{count} ckpt, k={args.proj_dim}, damping {args.trak_damping}"
        setting += f" (relative {np.mean(trak.relative_damping_):.2g})"
        add("TRAK", setting, both(scores), cpu, extra)

    for hessian in ("ekfac", "kfac"):
        influence = dt.InfluenceFunctions(
            model, task, hessian=hessian, damping=INFLUENCE_DAMPING,
            batch_size=GRADIENT_BATCH, progress=False,
        )  # fmt: skip
        scores, _, cpu = timed(fit_and_score, influence)
        setting = f"1 ckpt, empirical Fisher, damping {INFLUENCE_DAMPING:g}"
        add(f"influence ({hessian})", setting, both(scores), cpu)

    metagradients = dt.Metagradients(
        small_drop_runs.make_model, task, target_batch=args.targets,
        **small_drop_runs.recipe(seed).config(),
    )  # fmt: skip
    scores, _, cpu = timed(fit_and_score, metagradients)
    difference = max(
        (a - b).abs().max().item()
        for a, b in zip(metagradients.model_.parameters(), model.parameters())
    )
    print(f"# metagradients' run vs the attributed model: max |Δθ| = {difference:.1e}")
    add("metagradients", f"exact, {metagradients.run_.n_steps} steps", both(scores), cpu)

    for protocol, runs in (("classic", classic_runs), ("small-drop", small_drop_runs)):
        fitting = fittings[protocol]
        if len(fitting.masks) < 2:
            continue
        datamodels, _, cpu = timed(
            Datamodels(progress=False).fit, fitting.masks, fitting.outputs[:, columns]
        )
        models_cpu = training_cpu(runs, fitting) * len(fitting.masks)
        per_protocol = {name: None for name in tables}
        per_protocol[protocol] = datamodels
        setting = f"{len(fitting.masks)} {protocol} models"
        add("datamodels", setting, per_protocol, cpu, models_cpu)

    gradient_dot = dt.GradientDot(
        model, task, proj_dim=None, projector="identity", batch_size=GRADIENT_BATCH,
        progress=False,
    )  # fmt: skip
    scores, _, cpu = timed(fit_and_score, gradient_dot)
    add("gradient dot product", "1 ckpt, exact gradients", both(scores), cpu)

    print(
        f"\nBoth LDS protocols on {small_drop_runs.title} ({args.n_train} training "
        f"{small_drop_runs.examples}, {args.targets} test targets, {args.epochs} epochs of SGD): "
        f"{args.subsets} ground-truth "
        f"models per protocol; classic: random halves, fresh seeds; small-drop: "
        f"{args.drop_fraction:.0%} left out, the attributed run's seed and data order. One "
        f"training of the attributed model: {one_training:.2f} CPU s; "
        f"{torch.get_num_threads()} torch thread(s).\n"
    )
    print(
        "| method | setting | LDS classic (95% CI) | LDS small-drop (95% CI) | CPU s "
        "| × one training |"
    )
    print("|---|---|---|---|---:|---:|")
    for row in rows:
        cells = []
        for protocol in tables:
            value = row["lds"][protocol]
            if value is None:
                cells.append("—")
            else:
                low, high = value["ci"]
                cells.append(f"{value['mean']:.3f} ({low:.3f}–{high:.3f})")
        print(
            f"| {row['method']} | {row['setting']} | {cells[0]} | {cells[1]} | "
            f"{row['cpu_s']:.1f} | {row['x_training']:.1f} |"
        )
    record = {
        "config": vars(args),
        "attributed_seed": int(seed),
        "test_accuracy": accuracy,
        "one_training_cpu_s": one_training,
        "rows": rows,
    }
    with open(args.json, "w") as handle:
        json.dump(record, handle, indent=2)
    print(f"\n# written to {args.json}")


if __name__ == "__main__":
    main()
