"""The demo: train small digit classifiers, attribute their test predictions with TRAK, report.

Everything goes into one output directory, so that a rerun resumes instead of recomputing::

    <out>/config.json            the resolved DemoConfig (rerun with ``datatrace demo --config``)
    <out>/checkpoints/           model_{i}.pt state dicts and training.json (what trained them)
    <out>/store/                 the TRAK store: features, kernels, and the scores under "test"
    <out>/report.html            the self-contained HTML report
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from datatrace._arguments import non_negative_integer, positive_integer, thread_count
from datatrace._settings import JsonSettings, setting
from datatrace.attributions import Attributions
from datatrace.demo.data import Split, digits_split
from datatrace.demo.lds import (
    MethodScore,
    baseline_attributions,
    ground_truth,
    lds_rows,
    lds_table,
    score_methods,
)
from datatrace.demo.models import MODELS, make_model
from datatrace.demo.training import accuracy, train_checkpoints
from datatrace.methods.trak import TRAK
from datatrace.progress import progress_bar
from datatrace.store import Store
from datatrace.tasks import Classification

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
TRAINING_FILE = "training.json"
STORE_DIR = "store"
REPORT_FILE = "report.html"
SCORES_NAME = "test"
# Test examples held out by the digits split (the remaining 1,500 are the training set).
TEST_SIZE = 297
# Settings left unset (None) take these values: a real run, or ``quick`` for tests and a first
# look (seconds). The full run keeps k below n_train ≈ 1500, where TRAK's kernel is not singular.
FULL_PRESET = {"n_models": 3, "epochs": 30, "proj_dim": 1024, "n_train": None, "lds_models": 64}
QUICK_PRESET = {"n_models": 2, "epochs": 3, "proj_dim": 64, "n_train": 300, "lds_models": 8}
# Name of the subset experiment (models trained on random halves) in the demo's store.
GROUND_TRUTH_NAME = "lds"
# Fraction of the training set each ground-truth model sees.
GROUND_TRUTH_ALPHA = 0.5
# Up to this share of the shown test images are misclassified ones (at least one, if any).
MISCLASSIFIED_SHARE = 1 / 3
# Examples per gradient batch: the MLP's per-example gradients of 256 examples take ~27 MB.
BATCH_SIZE = 256
# How the report names TRAK.kernel_weights_.
KERNEL_LABELS = {
    "gauss-newton": "Gauss–Newton ΦᵀRΦ, R = Q(1 − Q)",
    "none": "ΦᵀΦ",
    "mixed": "Gauss–Newton where Q allowed, ΦᵀΦ elsewhere",
}


class OutputMismatchError(ValueError):
    """The output directory holds results of a demo run with different settings."""


@dataclass
class DemoConfig(JsonSettings):
    """Settings of the demo; saved as ``<out>/config.json`` beside its results.

    Fields left at ``None`` take the value of the preset: the full run, or the tiny ``quick`` one
    (see ``FULL_PRESET`` and ``QUICK_PRESET``); :meth:`resolved` fills them in.
    """

    KIND = "demo config"

    out: str = setting("directory for checkpoints, store, report and config", "datatrace-demo")
    model: str = setting(f"architecture of the classifiers: {', '.join(sorted(MODELS))}", "mlp")
    n_models: int | None = setting("models trained with different seeds, one checkpoint each (3)")
    epochs: int | None = setting("training epochs per model (30)")
    proj_dim: int | None = setting("TRAK projection dimension k, a multiple of 4 (1024)")
    n_train: int | None = setting("training examples used, from the shuffled split (all 1500)")
    lds_models: int | None = setting(
        "models trained on random halves of the training set, the ground truth of the LDS "
        "(64; 0 skips the LDS)"
    )
    n_targets: int = setting("test images shown in the terminal and the report", 6)
    k: int = setting("proponents and opponents shown per test image", 5)
    seed: int = setting("seed of the data split, the models and the projections", 0)
    quick: bool = setting(
        "tiny settings for tests: 2 models, 3 epochs, k=64, 300 train, 8 LDS models", False
    )
    progress: bool = setting("show progress bars", True)
    # One thread by default: the demo's models are so small that a second one gains little, and
    # when other processes share the cores, torch's spinning threads run 10-20× slower.
    threads: int = setting("torch CPU threads during the run (0: leave torch's setting)", 1)

    def resolved(self) -> DemoConfig:
        """This config with unset fields taken from the preset, checked.

        Raises:
            ValueError: an unknown model or a setting out of range.
        """
        preset = QUICK_PRESET if self.quick else FULL_PRESET
        config = replace(
            self,
            **{name: value for name, value in preset.items() if getattr(self, name) is None},
        )
        if config.model not in MODELS:
            raise ValueError(f"unknown model {config.model!r}: choose from {sorted(MODELS)}")
        thread_count(config.threads)
        if config.lds_models is not None:
            non_negative_integer("lds_models", config.lds_models, " (0: no LDS)")
        for name in ("n_models", "epochs", "proj_dim", "n_train", "n_targets", "k"):
            value = getattr(config, name)
            if value is not None:
                positive_integer(name, value)
        return config


@dataclass
class DemoResult:
    """What :func:`run_demo` produced.

    Attributes:
        config: the resolved config.
        attributions: TRAK scores ``(n_test, n_train)`` of every test image.
        report_path: the HTML report.
        config_path: the saved config.
        accuracies: test accuracy of each model, ``(n_models,)``.
        ensemble_accuracy: test accuracy of the models' mean probabilities.
        predictions: ``(n_test,)`` labels predicted by the ensemble.
        shown: test indices shown in the terminal and the report.
        timings: wall time in seconds of each stage, in order.
        trained_models: models trained by this run (the others were read from the output).
        featurized_chunks: row chunks of training features computed by this run (the others were
            already in the store).
        lds: LDS of TRAK and the baselines against the ground truth (empty if skipped).
    """

    config: DemoConfig
    attributions: Attributions
    report_path: Path
    config_path: Path
    accuracies: list[float]
    ensemble_accuracy: float
    predictions: np.ndarray
    shown: list[int]
    timings: dict[str, float]
    trained_models: int
    featurized_chunks: int
    lds: list[MethodScore]


def run_demo(config: DemoConfig | None = None, console: Console | None = None) -> DemoResult:
    """Train digit classifiers, attribute every test prediction with TRAK and write a report.

    Reruns with the same output directory reuse the trained checkpoints and the TRAK store.

    Args:
        config: settings (default: ``DemoConfig()``).
        console: where to print (default: a new rich console on stdout).

    Returns:
        :class:`DemoResult`.

    Raises:
        OutputMismatchError: the output directory holds checkpoints trained differently.
        StoreMismatchError: its store holds features of a different run (e.g. another ``proj_dim``).
    """
    config = (config or DemoConfig()).resolved()
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, console or Console())
    finally:
        torch.set_num_threads(threads)


def _run(config: DemoConfig, console: Console) -> DemoResult:
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(
            f"the demo's output {out} is a file: choose a directory (it is created if missing)"
        )
    timings: dict[str, float] = {}

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        timings[name] = time.perf_counter() - start

    with stage("data"):
        train, test = digits_split(n_test=TEST_SIZE, seed=config.seed)
        if config.n_train is not None:
            if config.n_train > len(train):
                raise ValueError(f"n_train must be at most {len(train)}, got {config.n_train}")
            train = train.subset(np.arange(config.n_train))
    console.print(
        f"[bold]datatrace demo[/]: TRAK on 8×8 digits · {config.n_models} {config.model} models, "
        f"{config.epochs} epochs · k={config.proj_dim} · {len(train)} train / {len(test)} test "
        f"→ {_escape(out)}"
    )

    with stage("training"):
        checkpoints, trained = _checkpoints(config, train, out / CHECKPOINT_DIR)
    model = make_model(config.model, seed=config.seed)
    accuracies, probabilities = [], []
    for state in checkpoints:
        model.load_state_dict(state)
        accuracies.append(accuracy(model, test))
        with torch.no_grad():
            probabilities.append(model(test.images).softmax(-1))
    predictions = torch.stack(probabilities).mean(0).argmax(-1).numpy()
    labels = test.labels.numpy()
    ensemble_accuracy = float((predictions == labels).mean())
    console.print(
        "test accuracy: models "
        + ", ".join(f"{value:.1%}" for value in accuracies)
        + f"; ensemble [bold]{ensemble_accuracy:.1%}[/]"
        + (f" (trained {trained}, reused {len(checkpoints) - trained})" if trained else " (reused)")
    )

    store_path = out / STORE_DIR
    done_before = _completed_chunks(store_path)
    trak = TRAK(
        model,
        Classification(),
        proj_dim=config.proj_dim,
        store=store_path,
        seed=config.seed,
        batch_size=BATCH_SIZE,
        progress=config.progress,
    )
    with stage("featurizing"):
        trak.fit(train.as_tuple(), checkpoints=checkpoints)
    with stage("scoring"):
        attributions = trak.score(test.as_tuple(), name=SCORES_NAME)
    featurized = _completed_chunks(store_path) - done_before
    shown = choose_targets(labels, predictions, config.n_targets)
    console.print(attribution_table(attributions, shown, train, test, predictions, config.k))
    method_scores = []
    if config.lds_models:
        method_scores = _lds(
            config, model, checkpoints, train, test, trak, attributions, timings, stage
        )
        console.print(lds_table(method_scores, config.lds_models))

    with stage("report"):
        # Imported here: matplotlib and jinja2 take a second to import, which `datatrace info`
        # and `datatrace --version` (which import this module for DemoConfig) need not pay.
        from datatrace.report import Section, q_dominance, write_report

        report_path = write_report(
            out / REPORT_FILE,
            attributions,
            train_labels=train.labels.numpy(),
            target_labels=labels,
            train_images=train.images.numpy(),
            target_images=test.images.numpy(),
            predictions=predictions,
            targets=shown,
            k=config.k,
            summary=_summary(config, trak, attributions, accuracies, ensemble_accuracy),
            sections=[
                *_lds_sections(method_scores, config.lds_models),
                Section(
                    "Wall time",
                    caption="Seconds per stage of this run, before the report (stages whose "
                    "results were already in the output directory take almost none).",
                    columns=["stage", "seconds"],
                    rows=[[name, round(seconds, 2)] for name, seconds in timings.items()],
                ),
            ],
            title="datatrace demo: TRAK on 8×8 digits",
            cmap="gray_r",
            image_range=(0.0, 1.0),
        )
    dominance = q_dominance(attributions, train.labels.numpy(), labels, config.k)
    if dominance is not None and dominance["dominates"]:
        console.print(
            f"[yellow]note:[/] Q dominates the rankings: the top-{config.k} proponents' median Q "
            f"is {dominance['median_top']:.2g}, {dominance['ratio']:.0f}× the training set's; "
            f"{dominance['same_label']:.0%} of them share the target's label "
            f"({dominance['same_label_without_q']:.0%} when ranked by score ÷ Q). See the report."
        )
    # Written last, so that the config beside the results is always the one that made them (a
    # run refused for mismatching settings leaves the previous one in place).
    config_path = config.to_json(out / CONFIG_FILE)
    console.print(_timing_table(timings, featurized, trained))
    console.print(f"report: [bold]{_escape(report_path)}[/]")
    console.print(f"config: {_escape(config_path)} (rerun: datatrace demo --config <file>)")
    return DemoResult(
        config=config,
        attributions=attributions,
        report_path=report_path,
        config_path=config_path,
        accuracies=accuracies,
        ensemble_accuracy=ensemble_accuracy,
        predictions=predictions,
        shown=shown,
        timings=timings,
        trained_models=trained,
        featurized_chunks=featurized,
        lds=method_scores,
    )


def _lds(
    config: DemoConfig,
    model,
    checkpoints,
    train: Split,
    test: Split,
    trak: TRAK,
    attributions: Attributions,
    timings: dict[str, float],
    stage,
) -> list[MethodScore]:
    """Train (or read) the ground truth, run the baselines, and score every method by LDS."""
    from datatrace.demo.subsets import DigitsSubsets

    digits = DigitsSubsets(
        model=config.model,
        epochs=config.epochs,
        split_seed=config.seed,
        max_train=len(train),
        threads=0,
    )
    with stage("ground truth"):
        truth = ground_truth(
            trak.store_,
            GROUND_TRUTH_NAME,
            digits,
            len(test),
            config.lds_models,
            GROUND_TRUTH_ALPHA,
            config.seed,
            config.progress,
        )
    with stage("baselines"):
        baselines = baseline_attributions(
            model,
            checkpoints,
            train,
            test,
            trak.store_,
            config.proj_dim,
            config.seed,
            BATCH_SIZE,
            config.progress,
        )
    trak_seconds = timings["featurizing"] + timings["scoring"]
    return score_methods([(attributions, trak_seconds), *baselines], truth)


def _lds_sections(scores: list[MethodScore], n_models: int | None) -> list:
    from datatrace.report import Section

    if not scores:
        return []
    return [
        Section(
            "Linear datamodeling score (LDS)",
            caption=(
                f"How well each method predicts what models trained on other data do: for "
                f"{n_models} models trained on random halves of the training set, the Spearman "
                "correlation, over models, between the sum of the scores of the training "
                "examples a model saw and its actual margin on the target, averaged over the "
                "test images (95% interval by resampling test images). Higher is better; "
                "seconds are the attribution's wall time (the gradient baselines reuse TRAK's "
                "stored features, so they pay only their scoring)."
            ),
            columns=["method", "LDS", "CI low", "CI high", "seconds"],
            rows=lds_rows(scores),
        )
    ]


def choose_targets(labels: np.ndarray, predictions: np.ndarray, n: int) -> list[int]:
    """Test indices to show, chosen deterministically.

    Correctly classified images of as many different classes as possible (the first of each
    class, in class order), then misclassified ones (the first by index): up to
    ``MISCLASSIFIED_SHARE`` of ``n`` and at least one when there is one.

    Args:
        labels: ``(n_test,)`` true labels.
        predictions: ``(n_test,)`` predicted labels.
        n: how many to choose (fewer if the test set is smaller).

    Returns:
        Up to ``n`` distinct test indices.
    """
    labels = np.asarray(labels)
    wrong = np.flatnonzero(np.asarray(predictions) != labels)
    n = min(n, len(labels))
    n_wrong = min(len(wrong), max(1, int(n * MISCLASSIFIED_SHARE)))
    correct = np.flatnonzero(np.asarray(predictions) == labels)
    rank_in_class = np.zeros(len(correct), dtype=np.int64)
    seen: dict[int, int] = {}
    for position, index in enumerate(correct):
        rank_in_class[position] = seen.get(int(labels[index]), 0)
        seen[int(labels[index])] = rank_in_class[position] + 1
    order = np.lexsort((correct, labels[correct], rank_in_class))
    n_correct = min(len(correct), n - n_wrong)
    return [int(i) for i in correct[order][:n_correct]] + [int(i) for i in wrong[:n_wrong]]


def attribution_table(
    attributions: Attributions,
    shown: list[int],
    train: Split,
    test: Split,
    predictions: np.ndarray,
    k: int,
) -> Table:
    """A rich table of the top-``k`` proponents and opponents of each shown test image."""
    table = Table(title=f"Top {k} proponents and opponents", title_justify="left")
    table.add_column("test image")
    for side in ("proponent", "opponent"):
        style = "green" if side == "proponent" else "red"
        table.add_column(side, justify="right", style=style)
        table.add_column("label", justify="right")
        table.add_column("score", justify="right", style=style)
    for target in shown:
        label, predicted = int(test.labels[target]), int(predictions[target])
        verdict = "[green]✓[/]" if label == predicted else f"[red]✗ predicted {predicted}[/]"
        description = [f"#{target}", f"label {label}", verdict]
        proponents = attributions.proponents(target, k)
        opponents = attributions.opponents(target, k)
        for rank in range(len(proponents.indices)):
            row = [description[rank] if rank < len(description) else ""]
            for ranking in (proponents, opponents):
                index = int(ranking.indices[rank])
                row += [f"#{index}", str(int(train.labels[index])), f"{ranking.scores[rank]:+.3g}"]
            table.add_row(*row)
        table.add_section()
    return table


def _checkpoints(
    config: DemoConfig, train: Split, directory: Path
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """The state dicts of the models, read from ``directory`` or trained (and saved there).

    Returns:
        ``(checkpoints, number trained by this call)``.
    """
    settings = {
        "model": config.model,
        "epochs": config.epochs,
        "seed": config.seed,
        "n_train": len(train),
    }
    record = directory / TRAINING_FILE
    if record.exists():
        recorded = json.loads(record.read_text())
        differences = [
            f"{key} {recorded.get(key)!r} there, {value!r} now"
            for key, value in settings.items()
            if recorded.get(key) != value
        ]
        if differences:
            raise OutputMismatchError(
                f"the checkpoints in {directory} were trained with other settings ("
                + "; ".join(differences)
                + "): choose another --out, or delete that directory to retrain"
            )
    else:
        directory.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(settings, indent=2) + "\n")
    paths = [directory / f"model_{index}.pt" for index in range(config.n_models)]
    missing = [index for index, path in enumerate(paths) if not path.exists()]
    with progress_bar(len(missing), f"training {config.model} models", config.progress) as advance:
        for index in missing:
            (state,) = train_checkpoints(
                train, 1, model=config.model, epochs=config.epochs, seed=config.seed + index
            )
            partial = paths[index].with_suffix(".pt.partial")
            torch.save(state, partial)
            os.replace(partial, paths[index])  # a crash never leaves a half-written checkpoint
            advance(1)
    checkpoints = [torch.load(path, map_location="cpu", weights_only=True) for path in paths]
    return checkpoints, len(missing)


def _completed_chunks(store_path: Path) -> int:
    """Row chunks of training features marked done in the store, over all checkpoints."""
    if not store_path.exists():
        return 0
    store = Store(store_path, read_only=True)
    return sum(
        int(store.root[f"features/{group}/done"][:].sum())
        for group in store.groups("features")
        if "done" in store.root[f"features/{group}"]
    )


def _summary(
    config: DemoConfig,
    trak: TRAK,
    attributions: Attributions,
    accuracies: list[float],
    ensemble_accuracy: float,
) -> dict[str, Any]:
    info = attributions.info
    return {
        "method": attributions.method,
        "model": f"{config.model} ({info['n_params']:,} parameters)",
        "checkpoints": f"{info['n_checkpoints']} ({config.epochs} epochs each)",
        "proj_dim": info["feature_dim"],
        "projector": info["projector"]["name"],
        "kernel": KERNEL_LABELS.get(trak.kernel_weights_, trak.kernel_weights_),
        "damping": f"{info['damping']}: λ = {np.mean(trak.relative_damping_):.3g} × mean diag "
        f"of ΦᵀΦ (λ ≈ {np.mean(trak.damping_):.3g})",
        "n_train": attributions.n_train,
        "n_targets": f"{attributions.n_targets} (test set)",
        "test accuracy": f"{ensemble_accuracy:.1%} ensemble, "
        f"{min(accuracies):.1%}–{max(accuracies):.1%} per model",
        "seed": config.seed,
    }


def _timing_table(timings: dict[str, float], featurized: int, trained: int) -> Table:
    table = Table(title="Wall time", title_justify="left")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    notes = {
        "training": f"{trained} trained" if trained else "reused",
        "featurizing": f"{featurized} chunks computed" if featurized else "reused",
    }
    table.add_column("note")
    for name, seconds in timings.items():
        table.add_row(name, f"{seconds:.2f}", notes.get(name, ""))
    table.add_section()
    table.add_row("total", f"{sum(timings.values()):.2f}", "")
    return table


def _escape(value: Any) -> str:
    return escape(str(value))
