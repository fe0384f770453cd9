"""TRAK against a closed-form computation of DESIGN.md's formulas, and against leave-one-out."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import datatrace as dt
from datatrace.methods.kernel import (
    REDUNDANCY_ANCHORS,
    Kernel,
    KernelStatistics,
    damping_from_features,
    neighbour_cosine,
    neighbour_sample,
)
from datatrace.tasks import ClassLogit, per_class_targets


def autograd_features(model, X, y):
    """Reference per-example margin gradients (n, p) and Q = 1 − p_y, float64, in a Python loop."""
    params = list(model.parameters())
    rows = []
    for i in range(len(X)):
        logits = model(X[i : i + 1])[0]
        others = torch.cat([logits[: y[i]], logits[y[i] + 1 :]])
        margin = logits[y[i]] - torch.logsumexp(others, 0)
        grads = torch.autograd.grad(margin, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    with torch.no_grad():
        probs = torch.softmax(model(X).double(), 1)
    q = 1 - probs[torch.arange(len(y)), y]
    return torch.stack(rows).numpy(), q.numpy()


def closed_form(models, train, targets, relative_damping):
    """τ = mean_c(Φ'_c (Φ_cᵀΦ_c + λ_c I)⁻¹ Φ_cᵀ) ⊙ mean_c(Q_c), λ_c = d · mean diag(Φ_cᵀΦ_c)."""
    scores, qs = [], []
    for model in models:
        phi, q = autograd_features(model, *train)
        phi_target, _ = autograd_features(model, *targets)
        gram = phi.T @ phi
        lam = relative_damping * np.mean(np.diag(gram))
        kernel = gram + lam * np.eye(gram.shape[0])
        scores.append(phi_target @ np.linalg.solve(kernel, phi.T))
        qs.append(q)
    return np.mean(scores, axis=0) * np.mean(qs, axis=0)[None, :]


@pytest.mark.parametrize("n_checkpoints", [1, 3])
def test_identity_projection_equals_closed_form(trained_mlps, n_checkpoints):
    models, X, y = trained_mlps
    models = models[:n_checkpoints]
    train, targets = (X[:300], y[:300]), (X[1000:1020], y[1000:1020])
    trak = dt.TRAK(
        models[0],
        dt.Classification(),
        projector="identity",
        damping=0.05,
        kernel_weights=None,  # the plain kernel's closed form; the default's: test_kernel_weights
        batch_size=64,
        chunk_size=128,
        progress=False,
    )
    # p = 64·16 + 16 + 16·10 + 10 = 1210 > n = 300: ΦᵀΦ is singular, TRAK solves the dual
    trak.fit(train, checkpoints=[m.state_dict() for m in models])
    assert trak.dual_
    got = trak.score(targets).scores
    want = closed_form(models, train, targets, relative_damping=0.05)
    assert got.shape == (20, 300)
    scale = np.abs(want).max(axis=1, keepdims=True)
    np.testing.assert_allclose(got / scale, want / scale, atol=2e-4)
    # the ensemble weights every checkpoint equally: compare with a plain average of single fits
    np.testing.assert_allclose(trak.out_to_loss_.mean(0), trak.score(targets).out_to_loss)


def test_absolute_relative_and_default_damping(trained_mlps):
    models, X, y = trained_mlps
    train = (X[:300], y[:300])
    trak = dt.TRAK(models[0], dt.Classification(), proj_dim=256, progress=False).fit(train)
    gram = trak.store_.root["features/0/gram"][:]
    features = trak.store_.root["features/0/features"][:].astype(np.float64)
    # the default, from a brute-force nearest-neighbour search over the same sampled rows
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    rows = neighbour_sample(300)
    cosine = unit[rows] @ unit.T
    cosine[np.arange(len(rows)), rows] = -np.inf
    rho = np.median(cosine.max(1))
    assert trak.store_.root["features/0"].attrs["statistics"]["neighbour_cosine"] == (
        pytest.approx(rho, abs=1e-12)
    )
    (low, f_low), (high, f_high) = REDUNDANCY_ANCHORS
    factor = f_low * (f_high / f_low) ** np.clip((rho - low) / (high - low), 0, 1)
    expected = factor * np.trace(gram) / max(256, 300)
    assert trak.damping_[0] == pytest.approx(expected, rel=1e-9)
    relative = dt.TRAK(
        models[0], dt.Classification(), proj_dim=256, damping=0.3, progress=False
    ).fit(train)
    assert relative.damping_[0] == pytest.approx(0.3 * np.mean(np.diag(gram)), rel=1e-9)
    with pytest.raises(ValueError, match=r"a non-negative number .* or 'auto'"):
        dt.TRAK(models[0], dt.Classification(), proj_dim=256, damping="gcv", progress=False).fit(
            train
        )
    fixed = dt.TRAK(
        models[0], dt.Classification(), proj_dim=256, damping_absolute=0.5, progress=False
    ).fit(train)
    assert fixed.damping_.tolist() == [0.5]


def test_features_scale_does_not_change_relative_damping_scores(trained_mlps):
    """Scaling the output by 10 scales Φ by 10: with relative damping, T is unchanged (Q aside)."""
    models, X, y = trained_mlps
    train, targets = (X[:300], y[:300]), (X[1000:1010], y[1000:1010])

    class Scaled(dt.Classification):
        def output(self, model, batch):
            return 10 * super().output(model, batch)

        def out_to_loss(self, model, batch):
            return dt.Classification().out_to_loss(model, batch)

    base = dt.TRAK(models[0], dt.Classification(), proj_dim=128, progress=False).fit(train)
    scaled = dt.TRAK(models[0], Scaled(), proj_dim=128, progress=False).fit(train)
    np.testing.assert_allclose(
        scaled.score(targets).scores, base.score(targets).scores, rtol=2e-3, atol=1e-9
    )


# (relative damping, bars). Measured on this setting (n = 300, k = 256, 3 checkpoints): with
# damping 0.01 the kernel term ranks every example first, and τ (after the Q weighting) 55% first
# and 92% in its top 10; with the default 1.0: 98.7% first, all in the top 5; τ 24% and 65%.
DUPLICATE_CASES = [
    (0.01, {"kernel_first": 1.0, "kernel_top5": 1.0, "first": 0.5, "top10": 0.85}),
    (1.0, {"kernel_first": 0.95, "kernel_top5": 1.0, "first": 0.2, "top10": 0.6}),
]


@pytest.mark.parametrize(("damping", "bars"), DUPLICATE_CASES, ids=["light", "relative-1"])
def test_duplicate_of_training_example_is_its_own_top_proponent(trained_mlps, damping, bars):
    """A training example scored as a target should find itself. The kernel part of its scores,
    φ'K⁻¹Φᵀ, does so almost always; damping blends in gradient dot products (K⁻¹ → I/λ), where
    examples with larger gradients can outrank it. After the Q weighting, confidently fit
    examples (tiny Q) legitimately lose rank, so those bars are lower."""
    models, X, y = trained_mlps
    train = (X[:300], y[:300])
    trak = dt.TRAK(models[0], dt.Classification(), proj_dim=256, damping=damping, progress=False)
    trak.fit(train, checkpoints=[m.state_dict() for m in models])
    attributions = trak.score(train)

    def rank_of_self(scores):
        diagonal = np.arange(len(scores))
        return (scores > scores[diagonal, diagonal][:, None]).sum(1)

    kernel_rank = rank_of_self(attributions.scores / attributions.out_to_loss[None, :])
    rank = rank_of_self(attributions.scores)
    assert (kernel_rank == 0).mean() >= bars["kernel_first"]
    assert (kernel_rank < 5).mean() >= bars["kernel_top5"]
    assert (rank == 0).mean() > bars["first"]
    assert (rank < 10).mean() > bars["top10"]


# ---- leave-one-out on a convex model ------------------------------------------------------------


def _fit_logistic(X, signs, weight_decay, init=None):
    """Exact minimiser (Newton's method, float64) of
    mean log(1 + exp(−s·(wᵀx + b))) + weight_decay/4·‖w‖², returned as [w, b]."""
    design = np.hstack([X, np.ones((len(X), 1))])
    penalty = np.full(design.shape[1], weight_decay / 2)
    penalty[-1] = 0.0  # the bias is not penalised
    theta = np.zeros(design.shape[1]) if init is None else init.copy()
    for _ in range(100):
        p = 1 / (1 + np.exp(-signs * (design @ theta)))  # probability of the true class
        gradient = -(design.T @ (signs * (1 - p))) / len(X) + penalty * theta
        hessian = (design.T * (p * (1 - p))) @ design / len(X) + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-13:
            break
    return theta


def _as_two_logit_model(theta):
    """The 2-logit linear classifier whose margin is s·(wᵀx + b): logits ±(wᵀx + b)/2. This is
    also the minimiser of cross-entropy + weight_decay/2·‖W‖² over 2-logit linear models."""
    model = torch.nn.Linear(len(theta) - 1, 2)
    with torch.no_grad():
        half = torch.tensor(theta / 2, dtype=torch.float32)
        model.weight.copy_(torch.stack([-half[:-1], half[:-1]]))
        model.bias.copy_(torch.stack([-half[-1], half[-1]]))
    return model


def _noisy_blobs():
    from sklearn.datasets import make_classification

    return make_classification(
        n_samples=400, n_features=10, n_informative=5, flip_y=0.2, class_sep=0.5, random_state=0
    )


def _breast_cancer():
    from sklearn.datasets import load_breast_cancer

    return load_breast_cancer(return_X_y=True)


# (dataset, bar on the mean Spearman over targets). Measured: 0.987 and 0.63; the exact
# Hessian influence function reaches 0.999 and 0.987 on the same leave-one-out ground truth.
# TRAK's kernel ΦᵀΦ leaves out the Hessian weights R = p(1 − p): where they are nearly uniform
# (noisy labels, p(1−p) in [0.07, 0.25]) TRAK tracks leave-one-out closely; on the almost
# separable breast-cancer data (p(1−p) from 3e-10 to 0.25) the approximation is coarse.
LOO_CASES = [(_noisy_blobs, 0.95), (_breast_cancer, 0.55)]


@pytest.mark.slow
@pytest.mark.parametrize(("load", "bar"), LOO_CASES, ids=["noisy-blobs", "breast-cancer"])
def test_convex_model_scores_rank_like_exact_leave_one_out(load, bar):
    """Logistic regression: TRAK (identity projection, one checkpoint, default damping) against
    exact leave-one-out retraining of 150 models, on 40 targets."""
    data, labels = load()
    data = (data - data.mean(0)) / data.std(0)
    order = np.random.default_rng(0).permutation(len(labels))
    data, labels = data[order], labels[order]
    signs = 2.0 * labels - 1
    n_train, n_targets, weight_decay = 150, 40, 1e-2
    train, target = slice(0, n_train), slice(n_train, n_train + n_targets)
    full = _fit_logistic(data[train], signs[train], weight_decay)
    target_design = np.hstack([data[target], np.ones((n_targets, 1))])
    base = signs[target] * (target_design @ full)
    effect = np.empty((n_targets, n_train))
    for i in range(n_train):
        keep = np.arange(n_train) != i
        loo = _fit_logistic(data[train][keep], signs[train][keep], weight_decay, init=full)
        effect[:, i] = base - signs[target] * (target_design @ loo)  # > 0: i pushed it up

    def as_tensors(rows):
        return (
            torch.tensor(data[rows], dtype=torch.float32),
            torch.tensor(labels[rows]),
        )

    trak = dt.TRAK(
        _as_two_logit_model(full), dt.Classification(), projector="identity", progress=False
    )
    trak.fit(as_tensors(train))
    scores = trak.score(as_tensors(target)).scores
    correlations = [spearmanr(scores[j], effect[j])[0] for j in range(n_targets)]
    assert np.mean(correlations) > bar, np.mean(correlations)


def autograd_logit_features(model, X, n_classes):
    """Reference gradients (n · C, p) of ``logit_c − mean logits``, point-major, in a loop."""
    params = list(model.parameters())
    rows = []
    for i in range(len(X)):
        for c in range(n_classes):
            logits = model(X[i : i + 1])[0]
            grads = torch.autograd.grad(logits[c] - logits.mean(), params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("n_checkpoints", [1, 2])
def test_per_class_logit_targets_equal_closed_form(trained_mlps, n_checkpoints):
    """score(task=ClassLogit()): training side unchanged (margin, Q), targets one logit per row."""
    models, X, y = trained_mlps
    models = models[:n_checkpoints]
    train, points = (X[:300], y[:300]), X[1000:1004]
    trak = dt.TRAK(models[0], dt.Classification(), projector="identity", damping=0.05,
                   kernel_weights=None, batch_size=64, progress=False)  # fmt: skip
    trak.fit(train, checkpoints=[m.state_dict() for m in models])
    margin_targets = (points, y[1000:1004])
    before = trak.score(margin_targets).scores
    targets = per_class_targets(points, 10)
    got = trak.score(targets, task=ClassLogit()).scores
    want, qs = [], []
    for model in models:
        phi, q = autograd_features(model, *train)
        gram = phi.T @ phi
        kernel = gram + 0.05 * np.mean(np.diag(gram)) * np.eye(gram.shape[0])
        target_phi = autograd_logit_features(model, points, 10)
        want.append(target_phi @ np.linalg.solve(kernel, phi.T))
        qs.append(q)
    want = np.mean(want, axis=0) * np.mean(qs, axis=0)[None, :]
    assert got.shape == (40, 300)
    scale = np.abs(want).max(axis=1, keepdims=True)
    np.testing.assert_allclose(got / scale, want / scale, atol=2e-4)
    # row p·10 + c is logit c of point p: the centred logits of a point sum to zero, so do the
    # gradients and hence the scores over its 10 classes
    per_point = got.reshape(4, 10, 300).sum(axis=1)
    assert np.abs(per_point).max() < 1e-4 * np.abs(got).max()
    # the fitted task is untouched: scoring without task= gives what it gave before
    np.testing.assert_array_equal(trak.score(margin_targets).scores, before)


def test_per_class_targets_are_point_major():
    inputs = torch.arange(6.0).reshape(3, 2)
    rows, classes = per_class_targets(inputs, 4)
    assert rows.shape == (12, 2) and classes.tolist() == [0, 1, 2, 3] * 3
    np.testing.assert_array_equal(rows[5], inputs[1])
    with pytest.raises(ValueError, match="n_classes"):
        per_class_targets(inputs, 0)


def test_dual_solve_equals_primal_in_float64():
    """Φ'(ΦᵀΦ + λI)⁻¹Φᵀ = Φ'Φᵀ(ΦΦᵀ + λI)⁻¹ (push-through), both through Kernel, against
    numpy's solve, for k < n and k > n."""
    rng = np.random.default_rng(0)
    for n, k in ((80, 30), (30, 80)):
        phi = rng.standard_normal((n, k)) * rng.uniform(0.1, 3, size=(1, k))
        target = rng.standard_normal((7, k))
        damping = 0.37
        chunks = [(lo, min(lo + 25, n), phi[lo : lo + 25]) for lo in range(0, n, 25)]
        primal = Kernel(phi.T @ phi, damping, dual=False)
        dual = Kernel(phi @ phi.T, damping, dual=True)
        reference = target @ np.linalg.solve(phi.T @ phi + damping * np.eye(k), phi.T)
        got_primal = primal.scores(torch.as_tensor(target), chunks, n)
        got_dual = dual.scores(torch.as_tensor(target), chunks, n)
        scale = np.abs(reference).max()
        # float32 results of a float64 solve
        np.testing.assert_allclose(got_dual / scale, reference / scale, atol=1e-6)
        np.testing.assert_allclose(got_primal / scale, reference / scale, atol=1e-5)


def test_trak_with_k_above_n_equals_closed_form_and_zero_damping_works(trained_mlps):
    """k > n is solved in the dual: equal to the primal formula with the pseudo-inverse limit
    at λ = 0 (the minimum-norm solution), where the primal kernel is singular."""
    models, X, y = trained_mlps
    train, targets = (X[:60], y[:60]), (X[1000:1010], y[1000:1010])
    phi, q = autograd_features(models[0], *train)
    phi_target, _ = autograd_features(models[0], *targets)
    for damping in (0.0, 5.0):
        trak = dt.TRAK(
            models[0], dt.Classification(), projector="identity", damping_absolute=damping,
            kernel_weights=None, progress=False,
        ).fit(train)  # fmt: skip
        assert trak.dual_ and trak.feature_dim_ > 60
        got = trak.score(targets).scores
        if damping:
            want = phi_target @ np.linalg.solve(phi.T @ phi + damping * np.eye(phi.shape[1]), phi.T)
        else:
            want = phi_target @ np.linalg.pinv(phi)
        want = want * q[None, :]
        scale = np.abs(want).max(axis=1, keepdims=True)
        np.testing.assert_allclose(got / scale, want / scale, atol=5e-4)


def test_statistics_from_the_dual_gram_equal_those_from_the_features():
    """The dual case reads the trace and the neighbour cosines off ``ΦΦᵀ``: the same values as
    the features give, with a duplicated row (cosine 1), a zero row (cosine 0) and more sampled
    rows than NEIGHBOUR_SAMPLE."""
    rng = np.random.default_rng(3)
    for n, k in ((30, 50), (400, 20), (1, 5)):
        phi = rng.standard_normal((n, k))
        if n > 2:
            phi[1] = 2.5 * phi[0]
            phi[2] = 0.0
        got = KernelStatistics.of_dual_gram(phi @ phi.T, k)
        want = KernelStatistics.of(phi)
        assert (got.n_train, got.dim) == (want.n_train, want.dim) == (n, k)
        assert got.trace == pytest.approx(want.trace, rel=1e-12)
        assert got.neighbour_cosine == pytest.approx(want.neighbour_cosine, abs=1e-12)


def test_a_dual_fit_records_the_statistics_of_its_features(trained_mlps):
    models, X, y = trained_mlps
    trak = dt.TRAK(models[0], dt.Classification(), proj_dim=256, progress=False)
    trak.fit((X[:100], y[:100]))  # k > n: the dual
    assert trak.dual_
    features = trak.store_.root["features/0/features"][:].astype(np.float64)
    recorded = trak.store_.root["features/0"].attrs["statistics"]
    want = KernelStatistics.of(features)
    assert recorded["trace"] == pytest.approx(want.trace, rel=1e-12)
    assert recorded["neighbour_cosine"] == pytest.approx(want.neighbour_cosine, abs=1e-12)


def test_damping_rule_at_its_limits_and_its_scale():
    """Orthogonal gradients (ρ = 0) get the light end of the ramp, clusters of parallel ones
    (ρ = 1) the heavy end; λ scales with the gradients' squared norm, and an ensemble of C
    checkpoints damps each kernel √C times less."""
    rng = np.random.default_rng(0)
    (_, f_low), (_, f_high) = REDUNDANCY_ANCHORS
    orthogonal = np.eye(50)[:40] * rng.uniform(1, 3, size=(40, 1))  # n = 40 < k = 50
    stats = KernelStatistics.of(orthogonal)
    assert stats.neighbour_cosine == 0.0
    assert damping_from_features(stats) == pytest.approx(f_low * (orthogonal**2).sum() / 50)
    directions = rng.standard_normal((8, 30))
    clusters = np.repeat(directions, 10, axis=0) * rng.uniform(0.5, 2, size=(80, 1))  # k < n
    stats = KernelStatistics.of(clusters)
    assert stats.neighbour_cosine == pytest.approx(1.0)
    heavy = damping_from_features(stats)
    assert heavy == pytest.approx(f_high * (clusters**2).sum() / 80)
    assert damping_from_features(KernelStatistics.of(3 * clusters)) == pytest.approx(9 * heavy)
    assert damping_from_features(stats, n_checkpoints=4) == pytest.approx(heavy / 2)
    # the scale is tr(ΦᵀΦ)/max(k, n): with k < n padding Φ with zero columns changes nothing,
    # with k ≥ n λ falls as 1/k
    padded = np.hstack([clusters, np.zeros((80, 30))])
    assert damping_from_features(KernelStatistics.of(padded)) == pytest.approx(heavy)
    wide = np.hstack([orthogonal, np.zeros((40, 50))])
    assert damping_from_features(KernelStatistics.of(wide)) == pytest.approx(
        damping_from_features(KernelStatistics.of(orthogonal)) / 2
    )
    with pytest.raises(ValueError, match="every projected gradient is zero"):
        damping_from_features(KernelStatistics.of(np.zeros((3, 4))))
    with pytest.raises(ValueError, match="n_checkpoints"):
        damping_from_features(stats, n_checkpoints=0)


def test_neighbour_cosine_equals_brute_force_over_chunks():
    rng = np.random.default_rng(2)
    features = rng.standard_normal((700, 12))
    features[5] = 0.0  # a zero vector has cosine 0 with everything
    rows = neighbour_sample(700, seed=3)
    chunks = [(lo, min(lo + 128, 700), features[lo : lo + 128]) for lo in range(0, 700, 128)]
    got = neighbour_cosine(features[rows], rows, chunks)
    norms = np.linalg.norm(features, axis=1)
    unit = features / np.where(norms > 0, norms, 1)[:, None]
    best = [max(unit[i] @ unit[j] for j in range(700) if j != i) for i in rows]
    assert got == pytest.approx(np.median(best), abs=1e-12)
    assert len(rows) == 256 and (np.diff(rows) > 0).all()


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_kernel_factor_is_the_cholesky_factor_of_the_damped_gram(layout):
    """The factor written over the damped kernel's copy (LAPACK in place) is numpy's Cholesky
    factor of ``G + λI``, lower triangular, with the gram left as it was; a non-contiguous gram
    too; an indefinite one is refused."""
    rng = np.random.default_rng(0)
    features = rng.standard_normal((40, 25))
    gram = features @ features.T  # (40, 40), rank 25: singular without damping
    given = torch.from_numpy(gram.copy())
    if layout == "transposed":
        given = torch.from_numpy(np.asfortranarray(gram))  # strides (1, 40)
        assert not given.is_contiguous()
    kernel = Kernel(given, 0.3, dual=True)
    want = np.linalg.cholesky(gram + 0.3 * np.eye(40))
    np.testing.assert_allclose(kernel.factor.numpy(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(given.numpy(), gram)
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
        Kernel(torch.from_numpy(gram - 0.1 * np.eye(40)), 0.0, dual=True)
