"""Each target's own damping under ``damping="auto"``: the coupling statistics, the factor's
rounding and bounds, and the per-target scores against direct solves (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import datatrace as dt
import datatrace.methods.kernel as kernel_module
from datatrace.methods.kernel import (
    TARGET_FACTOR_RANGE,
    Kernel,
    KernelStatistics,
    damping_from_features,
    neighbour_sample,
    target_damping_factor,
)
from test_trak import autograd_features


def _coupling_by_hand(features: np.ndarray, rows: np.ndarray) -> float:
    values = []
    for i in rows:
        norm2 = features[i] @ features[i]
        if norm2 == 0:
            continue
        others = [features[i] @ features[j] for j in range(len(features)) if j != i]
        values.append(sum(d * d for d in others) / norm2)
    return float(np.median(values))


def _factor_by_hand(ratio: float) -> float:
    if not (np.isfinite(ratio) and ratio > 0):
        return 1.0
    low, high = TARGET_FACTOR_RANGE
    return float(min(max(2.0 ** (round(2 * np.log2(ratio)) / 2), low), high))


def test_coupling_from_features_and_from_the_dual_gram_equal_a_direct_computation():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 7))
    features[5] = features[3]  # a duplicate
    features[11] = 0.0  # a zero row: left out of the median
    rows = neighbour_sample(len(features))
    want = _coupling_by_hand(features, rows)
    assert KernelStatistics.of(features).coupling == pytest.approx(want, rel=1e-10)
    gram = features @ features.T
    assert KernelStatistics.of_dual_gram(gram, 7).coupling == pytest.approx(want, rel=1e-10)


def test_target_factor_rounds_to_half_octaves_within_its_bounds():
    coupling = 3.0
    ratios = np.array([1.0, 1.1, 0.45, 0.7, 5.0, 1e-9, 1e9, 0.0, np.nan, np.inf])
    got = target_damping_factor(ratios * coupling, coupling)
    want = [_factor_by_hand(r) for r in ratios]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[0] == 1.0 and got[1] == 1.0  # 1.1 < 2^(1/4): rounds to 2^0
    assert got[2] == 0.5 and got[3] == pytest.approx(2**-0.5)
    assert got[5] == TARGET_FACTOR_RANGE[0] and got[6] == TARGET_FACTOR_RANGE[1]
    np.testing.assert_array_equal(target_damping_factor(ratios, 0.0), np.ones(len(ratios)))


def test_targets_like_the_training_examples_keep_the_damping_and_others_get_less():
    # Training gradients share one large direction u (what every example of a class shares);
    # a target along u sees the kernel as they do, a target orthogonal to u sees only its noise.
    rng = np.random.default_rng(1)
    n, k = 200, 30
    u = np.zeros(k)
    u[0] = 1.0
    features = 5.0 * u[None, :] * rng.uniform(0.8, 1.2, size=(n, 1)) + rng.normal(size=(n, k))
    statistics = KernelStatistics.of(features)
    kernel = Kernel(features.T @ features, 1.0, dual=False, coupling=statistics.coupling)
    like_training = features[:5] + 0.1 * rng.normal(size=(5, k))
    orthogonal = rng.normal(size=(5, k))
    orthogonal[:, 0] = 0.0
    targets = torch.as_tensor(np.concatenate([like_training, orthogonal]))
    factors = kernel.target_factors(targets)
    assert np.all((factors[:5] >= 0.5) & (factors[:5] <= 2.0))
    # Measured: 1/16–1/11 for the orthogonal targets, 0.7–1.4 for the training-like ones.
    assert np.all(factors[5:] <= 1 / 8)


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "rebuilt"])
@pytest.mark.parametrize("n, k", [(60, 12), (12, 40)], ids=["primal", "dual"])
def test_per_target_scores_equal_a_direct_solve_with_each_targets_damping(n, k, keep, monkeypatch):
    # "rebuilt": the undamped kernel is not kept, new factors come from LLᵀ − λI
    monkeypatch.setattr(kernel_module, "KEEP_UNDAMPED_BYTES", (128 << 20) if keep else 0)
    rng = np.random.default_rng(2)
    shared = rng.normal(size=(1, k)) * 4.0
    features = shared * rng.uniform(0.5, 1.5, size=(n, 1)) + rng.normal(size=(n, k))
    targets = np.concatenate([features[:3] + 0.2 * rng.normal(size=(3, k)),
                              rng.normal(size=(4, k)), np.zeros((1, k))])  # fmt: skip
    statistics = KernelStatistics.of(features)
    damping = 0.5 * statistics.mean_diagonal
    dual = k > n
    gram = features @ features.T if dual else features.T @ features
    kernel = Kernel(gram, damping, dual, coupling=statistics.coupling)
    got = kernel.scores(torch.as_tensor(targets), [(0, n, features)], n)

    kernel_k = features.T @ features
    factors = []
    for row, target in enumerate(targets):
        norm2 = target @ target
        ratio = (target @ kernel_k @ target) / norm2 / statistics.coupling if norm2 else np.nan
        factors.append(_factor_by_hand(ratio))
        lam = damping * factors[-1]
        want = features @ np.linalg.solve(kernel_k + lam * np.eye(k), target)
        np.testing.assert_allclose(
            got[row], want, rtol=1e-4, atol=1e-6 * np.abs(want).max() + 1e-12
        )
    assert len(set(factors)) > 1  # the targets are scored with different dampings
    if not dual:  # the folded targets (streamed scores, top-k, FAISS) are the same solves
        folded = kernel.fold(torch.as_tensor(targets)).numpy()
        np.testing.assert_allclose((features @ folded).T, got, rtol=1e-4, atol=1e-5)


def test_without_coupling_every_target_gets_the_checkpoints_damping():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(30, 6))
    targets = rng.normal(size=(4, 6)) * [[1.0], [10.0], [0.1], [3.0]]
    kernel = Kernel(features.T @ features, 2.0, dual=False)
    got = kernel.scores(torch.as_tensor(targets), [(0, 30, features)], 30)
    want = targets @ np.linalg.solve(features.T @ features + 2.0 * np.eye(6), features.T)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_trak_auto_damping_scores_each_target_with_its_own_factor(trained_mlps):
    models, X, y = trained_mlps
    train, targets = (X[:300], y[:300]), (X[1000:1012], y[1000:1012])
    fitted = {}
    for damping in ("auto", 0.5):
        fitted[damping] = dt.TRAK(
            models[0], dt.Classification(), projector="identity", damping=damping,
            kernel_weights=None, batch_size=64, progress=False,
        ).fit(train)  # fmt: skip
    phi, q = autograd_features(models[0], *train)
    phi_t, _ = autograd_features(models[0], *targets)
    gram = phi.T @ phi
    statistics = KernelStatistics.of(phi)
    base = damping_from_features(statistics)
    assert fitted["auto"].damping_[0] == pytest.approx(base, rel=1e-6)
    for damping, trak in fitted.items():
        got = trak.score(targets)
        assert got.info["per_target_damping"] is (damping == "auto")
        for row in range(len(phi_t)):
            if damping == "auto":
                ratio = (phi_t[row] @ gram @ phi_t[row]) / (phi_t[row] @ phi_t[row])
                lam = base * _factor_by_hand(ratio / statistics.coupling)
            else:
                lam = damping * np.trace(gram) / gram.shape[0]
            want = phi @ np.linalg.solve(gram + lam * np.eye(len(gram)), phi_t[row]) * q
            scale = np.abs(want).max()
            np.testing.assert_allclose(got.scores[row] / scale, want / scale, atol=2e-4)
