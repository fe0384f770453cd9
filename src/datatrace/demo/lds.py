"""The demo's LDS: a ground truth of models trained on random halves, and each method's score."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rich.table import Table
from torch import nn

from datatrace.attributions import Attributions
from datatrace.demo.data import Split
from datatrace.demo.subsets import DigitsSubsets
from datatrace.evaluation.lds import LDSResult, lds
from datatrace.methods.baselines import GradientCosine, GradientDot, RepresentationSimilarity
from datatrace.store import Store
from datatrace.subsets import SubsetExperiment, SubsetResults
from datatrace.tasks import Classification


@dataclass(frozen=True)
class MethodScore:
    """One method's LDS on the demo's ground truth, and the seconds its attribution took."""

    method: str
    lds: LDSResult
    seconds: float


def ground_truth(
    store: Store,
    name: str,
    digits: DigitsSubsets,
    n_targets: int,
    n_models: int,
    alpha: float,
    seed: int,
    progress: bool,
) -> SubsetResults:
    """Margins of the test images under ``n_models`` models trained on random subsets.

    Kept in ``store`` as the subset experiment ``name``: a rerun trains only what is missing.

    Returns:
        The first ``n_models`` rows: masks ``(n_models, n_train)``, outputs
        ``(n_models, n_targets)``.
    """
    experiment = SubsetExperiment(
        store,
        name,
        n_train=digits.n_train,
        n_outputs=n_targets,
        n_masks=n_models,
        alpha=alpha,
        seed=seed,
        description=digits.description(),
    )
    rows = list(range(n_models))
    experiment.run(digits.train, digits.evaluate, rows=rows, progress=progress)
    results = experiment.results()
    keep = results.rows < n_models
    return SubsetResults(
        results.masks[keep], results.outputs[keep], results.rows[keep], results.seeds[keep]
    )


def baseline_attributions(
    model: nn.Module,
    checkpoints: list,
    train: Split,
    test: Split,
    store: Store,
    proj_dim: int,
    seed: int,
    batch_size: int,
    progress: bool,
) -> list[tuple[Attributions, float]]:
    """The baselines on the same checkpoints, each with its wall time in seconds.

    The gradient baselines read TRAK's features from ``store`` (same projection and seed), so
    their time is the scoring alone.
    """
    task = Classification()
    shared = {
        "proj_dim": proj_dim,
        "store": store,
        "seed": seed,
        "batch_size": batch_size,
        "progress": progress,
    }
    estimators: list[Any] = [
        GradientDot(model, task, **shared),
        GradientCosine(model, task, **shared),
        RepresentationSimilarity(model, task, progress=progress),
    ]
    results = []
    for estimator in estimators:
        start = time.perf_counter()
        attributions = estimator.fit(train.as_tuple(), checkpoints).score(test.as_tuple())
        results.append((attributions, time.perf_counter() - start))
    return results


def score_methods(
    methods: list[tuple[Attributions, float]], truth: SubsetResults
) -> list[MethodScore]:
    """LDS of each ``(attributions, seconds)`` against ``truth``."""
    return [
        MethodScore(attributions.method, lds(attributions, truth.masks, truth.outputs), seconds)
        for attributions, seconds in methods
    ]


def lds_table(scores: list[MethodScore], n_models: int) -> Table:
    """A rich table of the methods' LDS with 95% intervals and wall times."""
    table = Table(
        title=f"LDS against {n_models} models trained on random halves", title_justify="left"
    )
    for column, justify in (
        ("method", "left"),
        ("LDS", "right"),
        ("95% CI", "right"),
        ("seconds", "right"),
    ):
        table.add_column(column, justify=justify)
    for score in scores:
        low, high = score.lds.ci
        table.add_row(
            score.method, f"{score.lds.mean:.3f}", f"{low:.3f} – {high:.3f}", f"{score.seconds:.2f}"
        )
    return table


def lds_rows(scores: list[MethodScore]) -> list[list[Any]]:
    """Rows ``[method, LDS, CI low, CI high, seconds]`` for the report."""
    return [
        [
            s.method,
            round(s.lds.mean, 3),
            round(s.lds.ci[0], 3),
            round(s.lds.ci[1], 3),
            round(s.seconds, 2),
        ]
        for s in scores
    ]
