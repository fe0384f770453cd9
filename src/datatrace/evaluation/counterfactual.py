"""Counterfactual checks of attributions by retraining: removal tests and brittleness.

Both ask what happens to a target's output when the training examples that its attributions
call most helpful are removed and the model is retrained:

- :func:`counterfactual_removal`: remove the top-``k`` proponents of each target, retrain several
  seeds, and report the mean drop of the target's output, next to the drop when removing ``k``
  random examples. Good attributions make the first drop much larger than the second.
- :func:`brittleness`: for each target, the smallest set of top proponents whose removal flips
  the prediction (the output, a margin, goes below 0), searched over growing sizes and verified
  by retraining.

Every retrained model is a row of a :class:`~datatrace.subsets.SubsetExperiment` with explicit
masks, keyed by the mask's content, so both functions resume after a crash (with a store on
disk) and never train the same subset twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datatrace._arguments import non_negative_integer, positions, positive_integer
from datatrace.attributions import Attributions
from datatrace.grads.projectors import derive_seed
from datatrace.store import Store
from datatrace.subsets import Backend, SubsetExperiment
from datatrace.subsets.backends import EvaluateFn, TrainFn

# Largest share of the training set that brittleness() removes by default: beyond it a "flip"
# says more about the model losing its training data than about the target's proponents.
DEFAULT_MAX_REMOVED_FRACTION = 0.25
DEFAULT_KS = (10, 50, 100)


def _scores(attributions: Attributions | np.ndarray) -> np.ndarray:
    scores = attributions.scores if isinstance(attributions, Attributions) else attributions
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(
            f"attributions must be (n_targets, n_train) scores, got shape {scores.shape}"
        )
    return scores


def _targets(targets: Sequence[int], n_targets: int) -> np.ndarray:
    targets = positions(targets, n_targets, "targets")
    if targets.size == 0:
        raise ValueError("targets is empty: give the indices of the targets to test")
    if targets.min() < 0 or targets.max() >= n_targets:
        raise ValueError(f"targets must be indices in [0, {n_targets}), got {targets.tolist()}")
    return targets


def top_proponents(scores: np.ndarray, target: int, k: int) -> np.ndarray:
    """The ``k`` highest-scoring training examples of ``target``, best first (ties by index)."""
    return np.argsort(-scores[target], kind="stable")[:k]


def removal_mask(n_train: int, removed: np.ndarray) -> np.ndarray:
    """``(n_train,)`` bool mask of the training set without ``removed``."""
    mask = np.ones(n_train, dtype=bool)
    mask[removed] = False
    return mask


class RetrainCache:
    """Outputs of models trained on given masks, kept in an explicit-mask subset table.

    Rows are found by their mask's content: asking again for a mask trains nothing, and a run
    that stopped resumes where it was. Row 0 is the full training set.
    """

    def __init__(
        self,
        store: Store | str | Path | None,
        name: str,
        n_train: int,
        n_outputs: int,
        n_seeds: int,
        seed: int,
        description: dict[str, Any],
    ):
        self.experiment = SubsetExperiment(
            store,
            name,
            n_train=n_train,
            n_outputs=n_outputs,
            masks=np.ones((1, n_train), dtype=bool),
            seed=seed,
            n_seeds=n_seeds,
            description=description,
        )
        self.rows = {
            np.packbits(mask).tobytes(): row for row, mask in enumerate(self.experiment.masks)
        }

    def outputs(
        self,
        masks: np.ndarray,
        train: TrainFn,
        evaluate: EvaluateFn,
        backend: str | Backend,
        progress: bool,
    ) -> np.ndarray:
        """``(len(masks), n_seeds, n_outputs)`` outputs of models trained on ``masks``."""
        keys = [np.packbits(mask).tobytes() for mask in masks]
        new = {}
        for key, mask in zip(keys, masks):
            if key not in self.rows and key not in new:
                new[key] = mask
        if new:
            start = self.experiment.n_rows
            self.experiment.extend(masks=np.stack(list(new.values())))
            self.rows.update({key: start + offset for offset, key in enumerate(new)})
        rows = np.array([self.rows[key] for key in keys], dtype=np.int64)
        self.experiment.run(train, evaluate, backend=backend, rows=rows, progress=progress)
        return self.experiment.results(reduce=None, complete_only=False).outputs[rows]


# -- removal test -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CounterfactualResult:
    """Output drops of targets when their top-k proponents (or k random examples) are removed.

    Attributes:
        targets: ``(n_tested,)`` indices of the tested targets.
        ks: ``(n_k,)`` numbers of removed training examples.
        full_output: ``(n_tested,)`` mean output (over seeds) of models trained on everything.
        removed_top: ``(n_tested, n_k)`` mean output after removing the top-k proponents.
        removed_random: ``(n_tested, n_k)`` mean output after removing k random examples
            (``None`` without the random baseline).
        drop_top: ``full_output − removed_top``, ``(n_tested, n_k)``.
        drop_random: ``full_output − removed_random``, ``(n_tested, n_k)`` or ``None``.
        stderr_top: standard error of ``drop_top`` over seeds, ``(n_tested, n_k)``.
        stderr_random: standard error of ``drop_random``, or ``None``.
        flipped_top: ``(n_tested, n_k)`` whether the mean output after removing the top-k
            proponents is below 0 (the prediction flips, for a margin).
        n_seeds: models trained per subset.
        models_trained: models this call trained (the others were in the store).
    """

    targets: np.ndarray
    ks: np.ndarray
    full_output: np.ndarray
    removed_top: np.ndarray
    removed_random: np.ndarray | None
    drop_top: np.ndarray
    drop_random: np.ndarray | None
    stderr_top: np.ndarray
    stderr_random: np.ndarray | None
    flipped_top: np.ndarray
    n_seeds: int
    models_trained: int

    def summary(self) -> list[dict[str, float]]:
        """Per k, the mean over targets of each drop and the share of flipped targets."""
        rows = []
        for column, k in enumerate(self.ks):
            row = {
                "k": int(k),
                "drop_top": float(self.drop_top[:, column].mean()),
                "flipped_top": float(self.flipped_top[:, column].mean()),
            }
            if self.drop_random is not None:
                row["drop_random"] = float(self.drop_random[:, column].mean())
            rows.append(row)
        return rows


def _stderr(full: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Standard error of ``mean(full) − mean(removed)`` over independent seeds (last axis)."""
    n_seeds = full.shape[-1]
    if n_seeds < 2:
        return np.full(removed.shape[:-1], np.nan)
    variance = full.var(axis=-1, ddof=1)[:, None] + removed.var(axis=-1, ddof=1)
    return np.sqrt(variance / n_seeds)


def counterfactual_removal(
    attributions: Attributions | np.ndarray,
    targets: Sequence[int],
    train: TrainFn,
    evaluate: EvaluateFn,
    *,
    k: Sequence[int] = DEFAULT_KS,
    n_seeds: int = 3,
    random_baseline: bool = True,
    store: Store | str | Path | None = None,
    name: str = "counterfactual",
    seed: int = 0,
    backend: str | Backend = "local",
    progress: bool = True,
    description: dict[str, Any] | None = None,
) -> CounterfactualResult:
    """Remove each target's top-k proponents, retrain, and measure the drop of its output.

    For every tested target ``j`` and every ``k``, ``n_seeds`` models are trained without the
    ``k`` highest-scoring training examples of row ``j`` of the attributions, and (with
    ``random_baseline``) ``n_seeds`` without ``k`` examples drawn at random (seeded by
    ``(seed, j, k)``); ``n_seeds`` models on the full training set give the reference output.

    Args:
        attributions: ``(n_targets, n_train)`` scores (:class:`~datatrace.Attributions` or array).
        targets: indices of the targets to test: rows of the attributions and positions in the
            vector ``evaluate`` returns.
        train: ``train(train_indices, seed) -> model`` (see :class:`SubsetExperiment`).
        evaluate: ``evaluate(model) -> (n_targets,)`` outputs of every target.
        k: numbers of training examples to remove (one number, or several).
        n_seeds: models trained per subset.
        random_baseline: also remove ``k`` random examples.
        store: where the retrained models' outputs are kept (a directory makes the test
            resumable); ``None`` keeps them in memory.
        name: name of the subset table in the store.
        seed: seed of the random removals and of the training seeds.
        backend: where to train (see :meth:`SubsetExperiment.run`).
        progress: show progress bars.
        description: what ``train``/``evaluate`` are, recorded in the store's provenance.

    Returns:
        :class:`CounterfactualResult`.
    """
    scores = _scores(attributions)
    n_targets, n_train = scores.shape
    targets = _targets(targets, n_targets)
    k = [k] if np.ndim(k) == 0 else k  # one k as a number
    ks = np.asarray(sorted({positive_integer("k", value) for value in k}), dtype=np.int64)
    non_negative_integer("seed", seed)
    if ks.size == 0 or ks[-1] >= n_train:
        raise ValueError(f"k must be between 1 and n_train - 1 = {n_train - 1}, got {list(k)}")
    cache = RetrainCache(
        store,
        name,
        n_train,
        n_targets,
        n_seeds,
        seed,
        {"kind": "counterfactual", **(description or {})},
    )
    done_before = int(cache.experiment.completed.sum())
    masks = [np.ones(n_train, dtype=bool)]
    for target in targets:
        ranked = top_proponents(scores, target, int(ks[-1]))
        masks += [removal_mask(n_train, ranked[:size]) for size in ks]
    if random_baseline:
        for target in targets:
            for size in ks:
                generator = np.random.default_rng(
                    derive_seed(seed, "counterfactual-random", int(target), int(size))
                )
                removed = generator.choice(n_train, size=int(size), replace=False)
                masks.append(removal_mask(n_train, removed))
    outputs = cache.outputs(np.stack(masks), train, evaluate, backend, progress)
    # (n_masks, n_seeds, n_targets) → each tested target's own output: (n_masks, n_seeds).
    n_tested, n_k = len(targets), len(ks)
    full = outputs[0][:, targets].T  # (n_tested, n_seeds)
    top = outputs[1 : 1 + n_tested * n_k].reshape(n_tested, n_k, n_seeds, n_targets)
    top = top[np.arange(n_tested), :, :, targets]  # (n_tested, n_k, n_seeds)
    removed_top = top.mean(-1)
    full_output = full.mean(-1)
    removed_random = drop_random = stderr_random = None
    if random_baseline:
        random = outputs[1 + n_tested * n_k :].reshape(n_tested, n_k, n_seeds, n_targets)
        random = random[np.arange(n_tested), :, :, targets]
        removed_random = random.mean(-1)
        drop_random = full_output[:, None] - removed_random
        stderr_random = _stderr(full, random)
    return CounterfactualResult(
        targets=targets,
        ks=ks,
        full_output=full_output,
        removed_top=removed_top,
        removed_random=removed_random,
        drop_top=full_output[:, None] - removed_top,
        drop_random=drop_random,
        stderr_top=_stderr(full, top),
        stderr_random=stderr_random,
        flipped_top=removed_top < 0,
        n_seeds=n_seeds,
        models_trained=(int(cache.experiment.completed.sum()) - done_before) * n_seeds,
    )


# -- brittleness ------------------------------------------------------------------------------

FLIPPED, NOT_FOUND, ALREADY = "flipped", "not found", "already below 0"


@dataclass(frozen=True)
class BrittlenessResult:
    """For each target, the smallest top-proponent set found whose removal flips its output.

    Attributes:
        targets: ``(n_tested,)`` indices of the tested targets.
        size: ``(n_tested,)`` number of top proponents whose removal makes the mean output
            (over seeds) negative, verified by retraining; 0 where the output is negative with
            the full training set, -1 where no size up to ``max_size`` flipped it.
        status: per target, ``"flipped"``, ``"not found"`` or ``"already below 0"``.
        full_output: ``(n_tested,)`` mean output of models trained on the full training set.
        output_at_size: ``(n_tested,)`` mean output after removing ``size`` proponents (NaN
            where not found; the full output where already below 0).
        trials: per target, every ``(size, mean output)`` that was retrained, in order.
        max_size: the largest removal tried.
        n_seeds: models trained per subset.
    """

    targets: np.ndarray
    size: np.ndarray
    status: list[str]
    full_output: np.ndarray
    output_at_size: np.ndarray
    trials: list[list[tuple[int, float]]] = field(repr=False)
    max_size: int
    n_seeds: int

    @property
    def found(self) -> np.ndarray:
        """``(n_tested,)`` bool: targets flipped by removing ``size`` proponents."""
        return np.array([status == FLIPPED for status in self.status])


def geometric_sizes(max_size: int) -> list[int]:
    """``1, 2, 4, …`` up to ``max_size``, with ``max_size`` itself last."""
    sizes, size = [], 1
    while size < max_size:
        sizes.append(size)
        size *= 2
    return [*sizes, max_size]


def brittleness(
    attributions: Attributions | np.ndarray,
    targets: Sequence[int],
    train: TrainFn,
    evaluate: EvaluateFn,
    *,
    sizes: Sequence[int] | None = None,
    max_size: int | None = None,
    refine: bool = True,
    n_seeds: int = 1,
    store: Store | str | Path | None = None,
    name: str = "brittleness",
    seed: int = 0,
    backend: str | Backend = "local",
    progress: bool = True,
    description: dict[str, Any] | None = None,
) -> BrittlenessResult:
    """The smallest set of top proponents whose removal flips each target's prediction.

    For each target the removal of its ``s`` top proponents is retrained for growing sizes ``s``
    (``sizes``, by default ``1, 2, 4, …, max_size``) until the mean output over ``n_seeds``
    models goes below 0; then, with ``refine``, the interval between the last size that did
    not flip and the first that did is bisected. Each round retrains all targets still
    searching at once (in parallel on the backend).

    The reported size is always one that was retrained and flipped. Removal is not monotone in
    general (a larger removal can un-flip), so bisection finds *a* flipping size at most the
    first flipping grid size, not necessarily the smallest one; with a monotone output it is
    the smallest.

    Args:
        attributions: ``(n_targets, n_train)`` scores.
        targets: indices of the targets to test (rows of the attributions and positions in the
            vector ``evaluate`` returns, whose entries are margins: negative = misclassified).
        train: ``train(train_indices, seed) -> model``.
        evaluate: ``evaluate(model) -> (n_targets,)`` margins.
        sizes: removal sizes of the search grid, ascending.
        max_size: largest removal when ``sizes`` is not given (default: a quarter of the
            training set, :data:`DEFAULT_MAX_REMOVED_FRACTION`).
        refine: bisect between the grid sizes around the first flip.
        n_seeds: models trained per subset (their mean output decides).
        store, name, seed, backend, progress, description: as in
            :func:`counterfactual_removal`.

    Returns:
        :class:`BrittlenessResult`.
    """
    scores = _scores(attributions)
    n_targets, n_train = scores.shape
    targets = _targets(targets, n_targets)
    if sizes is None:
        if max_size is None:
            max_size = max(1, int(DEFAULT_MAX_REMOVED_FRACTION * n_train))
        sizes = geometric_sizes(max_size)
    sizes = sorted({positive_integer("sizes", size) for size in sizes})
    non_negative_integer("seed", seed)
    if not sizes or sizes[-1] >= n_train:
        raise ValueError(f"sizes must be between 1 and n_train - 1 = {n_train - 1}, got {sizes}")
    cache = RetrainCache(
        store,
        name,
        n_train,
        n_targets,
        n_seeds,
        seed,
        {"kind": "brittleness", **(description or {})},
    )
    rankings = {int(target): top_proponents(scores, target, sizes[-1]) for target in targets}

    def mean_outputs(requests: list[tuple[int, int]]) -> list[float]:
        """Mean output of each ``(target, size)``: the target's output without its top ``size``."""
        masks = np.stack(
            [removal_mask(n_train, rankings[target][:size]) for target, size in requests]
        )
        outputs = cache.outputs(masks, train, evaluate, backend, progress)
        return [
            float(outputs[position, :, target].mean())
            for position, (target, _) in enumerate(requests)
        ]

    full = cache.outputs(np.ones((1, n_train), bool), train, evaluate, backend, progress)
    full_output = full[0].mean(0)[targets]
    trials: dict[int, list[tuple[int, float]]] = {int(target): [] for target in targets}
    # Per target: (largest size known not to flip, smallest size known to flip, its output).
    bracket: dict[int, tuple[int, int | None, float]] = {}
    searching = [int(t) for t, output in zip(targets, full_output) if output >= 0]
    for target in searching:
        bracket[target] = (0, None, np.nan)
    for size in sizes:
        if not searching:
            break
        outputs = mean_outputs([(target, size) for target in searching])
        still = []
        for target, output in zip(searching, outputs):
            trials[target].append((size, output))
            if output < 0:
                bracket[target] = (bracket[target][0], size, output)
            else:
                bracket[target] = (size, None, np.nan)
                still.append(target)
        searching = still
    if refine:
        narrowing = [t for t, (lo, hi, _) in bracket.items() if hi is not None and hi - lo > 1]
        while narrowing:
            middles = [(t, (bracket[t][0] + bracket[t][1]) // 2) for t in narrowing]
            for (target, middle), output in zip(middles, mean_outputs(middles)):
                trials[target].append((middle, output))
                lo, hi, at_hi = bracket[target]
                bracket[target] = (lo, middle, output) if output < 0 else (middle, hi, at_hi)
            narrowing = [t for t in narrowing if bracket[t][1] - bracket[t][0] > 1]

    size, status, output_at_size = [], [], []
    for target, output in zip(targets, full_output):
        target = int(target)
        if output < 0:
            size.append(0)
            status.append(ALREADY)
            output_at_size.append(float(output))
        elif bracket[target][1] is None:
            size.append(-1)
            status.append(NOT_FOUND)
            output_at_size.append(np.nan)
        else:
            size.append(bracket[target][1])
            status.append(FLIPPED)
            output_at_size.append(bracket[target][2])
    return BrittlenessResult(
        targets=targets,
        size=np.asarray(size, dtype=np.int64),
        status=status,
        full_output=np.asarray(full_output, dtype=np.float64),
        output_at_size=np.asarray(output_at_size),
        trials=[trials[int(target)] for target in targets],
        max_size=sizes[-1],
        n_seeds=n_seeds,
    )
