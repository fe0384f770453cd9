"""Counterfactual removal and brittleness, on models whose answers are known in closed form."""

import numpy as np
import pytest

from datatrace import Attributions
from datatrace.evaluation.counterfactual import (
    brittleness,
    counterfactual_removal,
    geometric_sizes,
)
from datatrace.grads.projectors import derive_seed
from datatrace.store import StoreMismatchError
from datatrace.subsets import train_seed

# -- an additive model: output_j = Σ_{i ∈ subset} W[i, j] + noise(seed) -------------------------

N_TRAIN, N_TARGETS = 60, 4
WEIGHTS = np.random.default_rng(1).normal(size=(N_TRAIN, N_TARGETS))


class Additive:
    def __init__(self, noise: float = 0.0):
        self.noise = noise
        self.calls = 0

    def train(self, train_indices, seed):
        self.calls += 1
        return train_indices, seed

    def evaluate(self, model):
        train_indices, seed = model
        noise = self.noise * np.random.default_rng(seed).normal(size=N_TARGETS)
        return WEIGHTS[train_indices].sum(0) + noise


def test_removal_drops_are_the_removed_weights(tmp_path):
    model = Additive()
    attributions = Attributions(WEIGHTS.T, "exact")
    targets, ks = [2, 0], (3, 10)
    result = counterfactual_removal(
        attributions, targets, model.train, model.evaluate, k=ks, n_seeds=2,
        store=tmp_path / "s", seed=7, progress=False,
    )  # fmt: skip
    for position, target in enumerate(targets):
        column = WEIGHTS[:, target]
        assert result.full_output[position] == pytest.approx(column.sum(), rel=1e-5)
        for index, k in enumerate(ks):
            top = np.sort(column)[::-1][:k].sum()  # the k largest weights, independently
            assert result.drop_top[position, index] == pytest.approx(top, abs=1e-4)
            generator = np.random.default_rng(derive_seed(7, "counterfactual-random", target, k))
            removed = generator.choice(N_TRAIN, size=k, replace=False)
            assert result.drop_random[position, index] == pytest.approx(
                column[removed].sum(), abs=1e-4
            )
    # Removing the largest weights drops the output more than removing any k examples.
    assert (result.drop_top > result.drop_random).all()
    # 1 full subset + 2 targets × 2 ks × (top, random), 2 seeds each.
    assert result.models_trained == model.calls == (1 + 2 * 2 * 2) * 2
    assert np.isfinite(result.stderr_top).all() and (result.stderr_top < 1e-4).all()
    summary = result.summary()
    assert [row["k"] for row in summary] == [3, 10]
    assert summary[1]["drop_top"] == pytest.approx(result.drop_top[:, 1].mean())

    # Rerunning reads every model from the store; other targets reuse the full-data models.
    again = counterfactual_removal(
        attributions, targets, model.train, model.evaluate, k=ks, n_seeds=2,
        store=tmp_path / "s", seed=7, progress=False,
    )  # fmt: skip
    assert again.models_trained == 0 and np.array_equal(again.drop_top, result.drop_top)
    with pytest.raises(StoreMismatchError, match="n_seeds"):
        counterfactual_removal(
            attributions, targets, model.train, model.evaluate, k=ks, n_seeds=3,
            store=tmp_path / "s", seed=7, progress=False,
        )  # fmt: skip


def test_removal_averages_seeds_and_reports_their_spread():
    model = Additive(noise=0.5)
    result = counterfactual_removal(
        WEIGHTS.T, [1], model.train, model.evaluate, k=(5,), n_seeds=4, random_baseline=False,
        progress=False,
    )  # fmt: skip
    # Row 0 of the table is the full training set; its models got train_seed(0, 0, s).
    noises = [
        0.5 * np.random.default_rng(train_seed(0, 0, repeat)).normal(size=N_TARGETS)[1]
        for repeat in range(4)
    ]
    assert result.full_output[0] == pytest.approx(WEIGHTS[:, 1].sum() + np.mean(noises), abs=1e-4)
    assert result.drop_random is None and result.stderr_random is None
    # Two independent sets of 4 noisy models: the standard error is about 0.5·√(2/4).
    assert 0.1 < result.stderr_top[0, 0] < 1.0


def test_removal_rejects_bad_arguments():
    model = Additive()
    with pytest.raises(ValueError, match="k must be"):
        counterfactual_removal(WEIGHTS.T, [0], model.train, model.evaluate, k=(N_TRAIN,))
    with pytest.raises(ValueError, match="targets must be"):
        counterfactual_removal(WEIGHTS.T, [N_TARGETS], model.train, model.evaluate)
    with pytest.raises(ValueError, match=r"k must be a positive integer, got 2\.5"):
        counterfactual_removal(WEIGHTS.T, [0], model.train, model.evaluate, k=(2.5,))
    with pytest.raises(ValueError, match="targets must be integer positions"):
        counterfactual_removal(WEIGHTS.T, [0.5], model.train, model.evaluate)
    with pytest.raises(ValueError, match="sizes must be a positive integer"):
        brittleness(WEIGHTS.T, [0], model.train, model.evaluate, sizes=[1, 2.5])


def test_removal_takes_one_k_as_a_number():
    model = Additive()
    one = counterfactual_removal(
        WEIGHTS.T, [1], model.train, model.evaluate, k=5, random_baseline=False, progress=False
    )
    listed = counterfactual_removal(
        WEIGHTS.T, [1], model.train, model.evaluate, k=(5,), random_baseline=False, progress=False
    )
    assert one.ks.tolist() == [5]
    np.testing.assert_array_equal(one.drop_top, listed.drop_top)


# -- a k-nearest-neighbour vote: removing same-class neighbours flips it ------------------------

VOTERS = 5
rng = np.random.default_rng(3)
POINTS = np.concatenate([rng.normal(-1, 1.0, size=(40, 2)), rng.normal(1, 1.0, size=(40, 2))])
LABELS = np.repeat([0, 1], 40)
TARGET_POINTS = np.array([[-0.2, 0.0], [0.3, 0.1], [-2.5, -2.0], [0.6, 0.6], [-0.1, -0.3]])
TARGET_LABELS = np.array([0, 1, 0, 0, 1])


def knn_margins(train_indices: np.ndarray) -> np.ndarray:
    """Per target: (same-class − other-class) votes among its VOTERS nearest training points."""
    margins = []
    for point, label in zip(TARGET_POINTS, TARGET_LABELS):
        distances = np.linalg.norm(POINTS[train_indices] - point, axis=1)
        nearest = train_indices[np.argsort(distances, kind="stable")[:VOTERS]]
        same = int((LABELS[nearest] == label).sum())
        margins.append(2 * same - len(nearest))
    return np.asarray(margins, dtype=np.float64)


def knn_scores() -> np.ndarray:
    """Same-class points score 1/(1 + distance), other-class points minus that."""
    distance = np.linalg.norm(TARGET_POINTS[:, None] - POINTS[None], axis=-1)
    sign = np.where(LABELS[None] == TARGET_LABELS[:, None], 1.0, -1.0)
    return sign / (1 + distance)


def brute_force_flip(scores: np.ndarray, target: int, max_size: int) -> int:
    """The smallest s ≤ max_size whose removal of the top-s proponents flips target (-1: none)."""
    if knn_margins(np.arange(len(POINTS)))[target] < 0:
        return 0
    for size in range(1, max_size + 1):
        ranked = np.argsort(-scores[target])  # scores are distinct: no ties to break
        kept = np.setdiff1d(np.arange(len(POINTS)), ranked[:size])
        if knn_margins(kept)[target] < 0:
            return size
    return -1


class KNN:
    def __init__(self):
        self.calls = 0

    def train(self, train_indices, seed):
        self.calls += 1
        return train_indices

    def evaluate(self, model):
        return knn_margins(model)


def test_brittleness_matches_brute_force_on_nearest_neighbours(tmp_path):
    scores = knn_scores()
    targets, max_size = list(range(len(TARGET_POINTS))), 12
    expected = [brute_force_flip(scores, target, max_size) for target in targets]
    # The toy covers every outcome: flips at several sizes, never, and already misclassified.
    assert -1 in expected and any(size > 2 for size in expected)
    knn = KNN()
    result = brittleness(
        scores, targets, knn.train, knn.evaluate, max_size=max_size, store=tmp_path / "s",
        progress=False,
    )  # fmt: skip
    assert result.size.tolist() == expected
    # Every retrained removal is the target's margin without its top proponents, recomputed here.
    for position, target in enumerate(targets):
        ranked = np.argsort(-scores[target])
        for size, output in result.trials[position]:
            kept = np.setdiff1d(np.arange(len(POINTS)), ranked[:size])
            assert output == knn_margins(kept)[target], (target, size)
    for position, size in enumerate(expected):
        if size > 0:
            assert result.status[position] == "flipped" and result.output_at_size[position] < 0
            assert (size, result.output_at_size[position]) in result.trials[position]
        elif size == -1:
            assert result.status[position] == "not found"
            assert max(s for s, _ in result.trials[position]) == max_size
    # The search retrains far fewer subsets than the brute force's sizes.
    assert knn.calls < sum(max_size if s == -1 else s for s in expected)
    # Without refining, the answer is the first grid size at or above the smallest flip.
    coarse = brittleness(
        scores, targets, knn.train, knn.evaluate, max_size=max_size, refine=False,
        store=tmp_path / "s", progress=False,
    )  # fmt: skip
    grid = geometric_sizes(max_size)
    for size, found in zip(expected, coarse.size.tolist()):
        assert found == (min(g for g in grid if g >= size) if size > 0 else size)


def test_brittleness_reports_targets_already_below_zero():
    margins = knn_margins(np.arange(len(POINTS)))
    wrong = np.flatnonzero(margins < 0).tolist()
    assert wrong == [3, 4]  # targets labelled against their neighbourhood
    knn = KNN()
    result = brittleness(knn_scores(), wrong, knn.train, knn.evaluate, sizes=[1, 2], progress=0)
    assert result.size.tolist() == [0, 0] and result.status == ["already below 0"] * 2
    assert result.output_at_size.tolist() == margins[wrong].tolist()
    assert knn.calls == 1  # only the full training set
