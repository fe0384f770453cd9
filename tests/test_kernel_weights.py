"""TRAK's Gauss–Newton kernel (``kernel_weights="auto"``): ``Φ'(ΦᵀRΦ + λI)⁻¹Φᵀ`` with ``R =
Q(1 − Q)`` scaled to the plain kernel's trace, against direct float64 solves, in the primal and
the dual, with one damping and with each target's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import datatrace as dt
from datatrace.methods.kernel import (
    Kernel,
    KernelStatistics,
    neighbour_sample,
    normalised_weights,
    weighted_dual_gram,
    weighted_gram_and_statistics,
    weighted_statistics_of_gram,
)
from datatrace.tasks.classification import margin_curvature
from test_trak import autograd_features


def gauss_newton_closed_form(models, train, targets, relative_damping):
    """mean_c(Φ'_c(Φ_cᵀR_cΦ_c + λ_c I)⁻¹Φ_cᵀ) ⊙ mean_c(Q_c): ``R_c = Q_c(1 − Q_c)`` times
    ``tr(Φ_cᵀΦ_c) / tr(Φ_cᵀR_cΦ_c)``, ``λ_c`` = the relative damping × its mean diagonal."""
    scores, qs = [], []
    for model in models:
        phi, q = autograd_features(model, *train)
        phi_target, _ = autograd_features(model, *targets)
        squared = (phi**2).sum(axis=1)
        weights = q * (1 - q)
        weights = weights * squared.sum() / (squared @ weights)
        gram = phi.T @ (phi * weights[:, None])
        lam = relative_damping * np.mean(np.diag(gram))
        scores.append(phi_target @ np.linalg.solve(gram + lam * np.eye(len(gram)), phi.T))
        qs.append(q)
    return np.mean(scores, axis=0) * np.mean(qs, axis=0)[None, :]


def plain_closed_form(models, train, targets, relative_damping):
    from test_trak import closed_form

    return closed_form(models, train, targets, relative_damping)


# p = 1210: the dual, then the primal; the Gauss–Newton kernel is the default, and "auto" names it
@pytest.mark.parametrize(
    ("n_train", "setting"), [(300, {}), (1300, {}), (300, {"kernel_weights": "auto"})]
)
def test_gauss_newton_scores_equal_closed_form_in_the_dual_and_the_primal(
    trained_mlps, n_train, setting
):
    models, X, y = trained_mlps
    models = models[:2]
    train, targets = (X[:n_train], y[:n_train]), (X[1500:1520], y[1500:1520])
    trak = dt.TRAK(
        models[0],
        dt.Classification(),
        projector="identity",
        damping=0.05,
        batch_size=128,
        chunk_size=512,
        progress=False,
        **setting,
    )
    trak.fit(train, checkpoints=[m.state_dict() for m in models])
    assert trak.dual_ == (n_train < 1210)
    got = trak.score(targets).scores
    want = gauss_newton_closed_form(models, train, targets, relative_damping=0.05)
    scale = np.abs(want).max(axis=1, keepdims=True)
    np.testing.assert_allclose(got / scale, want / scale, atol=2e-4)
    # the weights matter here: the plain kernel's scores are not these
    plain = plain_closed_form(models, train, targets, relative_damping=0.05)
    assert np.abs(plain / scale - want / scale).max() > 0.05
    assert trak._info()["kernel_weights"] == "gauss-newton"
    # streamed scores and self-influence go through the same kernels
    streamed = trak.score(targets, out="gn_scores")
    np.testing.assert_allclose(streamed.rows(0, 20), got, rtol=1e-5, atol=1e-7 * np.abs(got).max())
    itself = trak.score(train).scores
    np.testing.assert_allclose(
        trak.self_influence(), np.diag(itself), rtol=1e-4, atol=1e-6 * np.abs(itself).max()
    )


def test_weighted_kernels_primal_and_dual_agree_with_each_targets_own_damping():
    rng = np.random.default_rng(0)
    n, k = 40, 60
    phi = rng.normal(size=(n, k)) * rng.uniform(0.2, 3.0, size=(n, 1))
    phi[7] = phi[3]  # a duplicate
    weights = rng.uniform(0, 1, size=n) ** 3
    weights[[2, 9]] = 0.0  # examples whose loss is flat: allowed
    targets = rng.normal(size=(9, k))
    plain = KernelStatistics.of(phi)
    rows = neighbour_sample(n)
    gram, statistics = weighted_gram_and_statistics([(0, n, phi)], weights, plain, phi[rows], rows)
    dual_gram = phi @ phi.T
    from_gram = weighted_statistics_of_gram(dual_gram, weights, plain)
    assert from_gram.trace == pytest.approx(statistics.trace, rel=1e-12)
    assert from_gram.coupling == pytest.approx(statistics.coupling, rel=1e-10)
    assert statistics.neighbour_cosine == plain.neighbour_cosine
    # the coupling by hand: Σ_{j≠i} r_j (φ_i·φ_j)² / ‖φ_i‖²
    dots = phi[rows] @ phi.T
    dots[np.arange(len(rows)), rows] = 0.0
    by_hand = np.median((dots**2 @ weights) / (phi[rows] ** 2).sum(axis=1))
    assert statistics.coupling == pytest.approx(by_hand, rel=1e-10)
    np.testing.assert_allclose(gram, phi.T @ np.diag(weights) @ phi, rtol=1e-12)
    damping = 0.3 * statistics.trace / k
    primal = Kernel(gram, damping, dual=False, coupling=statistics.coupling)
    dual = Kernel(
        weighted_dual_gram(dual_gram, weights),
        damping,
        dual=True,
        coupling=statistics.coupling,
        weights=weights,
        plain_gram=dual_gram,
    )
    factors = primal.target_factors(torch.as_tensor(targets))
    assert len(np.unique(factors)) > 1  # the targets get several dampings
    np.testing.assert_array_equal(
        dual.target_factors(torch.as_tensor(targets), torch.as_tensor(phi @ targets.T)), factors
    )
    want = np.stack(
        [
            target @ np.linalg.solve(gram + primal.damping_for(f) * np.eye(k), phi.T)
            for target, f in zip(targets, factors)
        ]
    )
    for kernel in (primal, dual):
        got = kernel.scores(torch.as_tensor(targets), [(0, n, phi)], n)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_normalised_weights_keep_the_plain_trace():
    rng = np.random.default_rng(1)
    phi = rng.normal(size=(30, 5))
    squared = (phi**2).sum(axis=1)
    weights = normalised_weights(rng.uniform(size=30), squared, float(squared.sum()))
    assert squared @ weights == pytest.approx(squared.sum(), rel=1e-12)
    np.testing.assert_array_equal(normalised_weights(np.zeros(30), squared, 1.0), np.zeros(30))


def test_margin_curvature_is_the_cross_entropys_second_derivative():
    margins = torch.linspace(-30, 30, 61, dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.softplus(-margins).sum()
    (first,) = torch.autograd.grad(loss, margins, create_graph=True)
    second = torch.autograd.grad(first.sum(), margins)[0]
    q = torch.sigmoid(-margins).detach().numpy()
    got = margin_curvature(q)
    middle = np.abs(margins.detach().numpy()) <= 15  # autograd's softplus underflows beyond
    np.testing.assert_allclose(got[middle], second.numpy()[middle], rtol=1e-9)
    # and σ(m)σ(−m) everywhere, to the cancellation of 1 − Q where Q is near 1
    exact = (torch.sigmoid(margins) * torch.sigmoid(-margins)).detach().numpy()
    np.testing.assert_allclose(got, exact, rtol=5e-3)  # 1 − Q to ~1e-16 of Q ≈ 1


def test_tasks_without_a_curvature_keep_the_plain_kernel():
    torch.manual_seed(0)
    x = torch.randn(50, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(50)
    model = torch.nn.Linear(3, 1)
    scores = [
        dt.TRAK(model, dt.Regression(), projector="identity", kernel_weights=weights,
                progress=False).fit((x, y)).score((x[:5], y[:5])).scores
        for weights in (None, "auto")
    ]  # fmt: skip
    np.testing.assert_array_equal(scores[0], scores[1])


def test_bad_kernel_weights_and_an_undamped_weighted_dual_are_refused(trained_mlps):
    models, X, y = trained_mlps
    train = (X[:100], y[:100])
    with pytest.raises(ValueError, match="kernel_weights must be 'auto'"):
        dt.TRAK(models[0], dt.Classification(), kernel_weights="yes", proj_dim=64,
                progress=False).fit(train)  # fmt: skip
    with pytest.raises(ValueError, match="positive damping"):
        dt.TRAK(models[0], dt.Classification(), projector="identity", damping_absolute=0.0,
                kernel_weights="auto", progress=False).fit(train)  # fmt: skip


def test_the_fit_config_passes_kernel_weights_on(tmp_path):
    from datatrace.fit_config import FitRunConfig

    config = FitRunConfig(store=str(tmp_path / "store"), kernel_weights=None)
    assert config.make_trak().kernel_weights is None
    assert FitRunConfig(store=str(tmp_path / "other")).make_trak().kernel_weights == "auto"
