"""Influence functions: factors against Python loops, EK-FAC against explicit Fishers and exact
Hessians, the identity Hessian against GradientDot, resuming, and bad inputs."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import datatrace as dt
from conftest import make_mlp
from datatrace._estimator import NotFittedError
from datatrace.methods.influence import InfluenceFunctions, curvature, stages
from datatrace.methods.influence.factors import kronecker_factors
from datatrace.methods.influence.gradients import LayoutGradients
from datatrace.methods.influence.layers import kronecker_layout
from datatrace.store import Store, StoreMismatchError

pytestmark = pytest.mark.usefixtures("one_thread")


class Regression(dt.Task):
    """Squared error: ``output = −½‖model(x) − t‖²``, ``Q = 1`` (loss = −output)."""

    def output(self, model, batch):
        inputs, targets = batch
        return -0.5 * (model(inputs) - targets).square().sum(-1)

    def out_to_loss(self, model, batch):
        return torch.ones(batch[0].shape[0], dtype=batch[0].dtype)


def cross_entropy_gradient(model, x, label):
    """The flat gradient of one example's cross-entropy (a loop, no datatrace code)."""
    loss = F.cross_entropy(model(x[None]), label[None])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def linear_gradient_matrix(model, loss):
    """``[∇W, ∇b]`` of a single ``nn.Linear``: ``(out, in + 1)``."""
    weight, bias = torch.autograd.grad(loss, [model.weight, model.bias])
    return torch.cat([weight, bias[:, None]], dim=1)


def fit_factors(model, task, data):
    names = [name for name, _ in model.named_parameters()]
    layout = kronecker_layout(model, names)
    gradients = LayoutGradients(model, task, layout, names, torch.device("cpu"))
    state = model.state_dict()
    return layout, kronecker_factors(model, gradients, state, dt.data.Examples(data), 7, False)


# -- Kronecker factors against loops ------------------------------------------------------------


class SequenceModel(nn.Module):
    """A linear layer applied at 5 positions, mean-pooled, then a linear head."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)).mean(1))


def test_kronecker_factors_of_a_sequence_model_match_a_loop():
    torch.manual_seed(0)
    model = SequenceModel().double()
    x, labels = torch.randn(20, 5, 3, dtype=torch.float64), torch.randint(0, 3, (20,))
    layout, factors = fit_factors(model, dt.Classification(), (x, labels))
    assert [layer.name for layer in layout.layers] == ["inner", "head"]
    sums = [torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(5, 5), torch.zeros(3, 3)]
    sums = [s.double() for s in sums]
    for i in range(20):
        inner = x[i] @ model.inner.weight.T + model.inner.bias  # (5, 4)
        hidden = torch.tanh(inner).mean(0)
        logits = hidden @ model.head.weight.T + model.head.bias
        loss = F.cross_entropy(logits[None], labels[i][None])
        g_inner, g_head = torch.autograd.grad(loss, [inner, logits])
        a_inner = torch.cat([x[i], torch.ones(5, 1, dtype=torch.float64)], 1)
        a_head = torch.cat([hidden.detach(), torch.ones(1, dtype=torch.float64)])
        sums[0] += a_inner.T @ a_inner / (20 * 5)  # A: averaged over examples and positions
        sums[1] += g_inner.T @ g_inner / 20  # S: summed over positions, averaged over examples
        sums[2] += torch.outer(a_head, a_head) / 20
        sums[3] += torch.outer(g_head, g_head) / 20
    (a_inner, s_inner), (a_head, s_head) = factors
    for got, expected in zip((a_inner, s_inner, a_head, s_head), sums):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


class ConvModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.head = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_kronecker_factors_of_a_convolution_match_a_loop_over_patches():
    torch.manual_seed(1)
    model = ConvModel().double()
    x, labels = torch.randn(12, 2, 5, 5, dtype=torch.float64), torch.randint(0, 4, (12,))
    layout, factors = fit_factors(model, dt.Classification(), (x, labels))
    assert layout.layers[0].in_dim == 2 * 9 + 1 and layout.layers[0].out_dim == 3
    activation, gradient = torch.zeros(19, 19).double(), torch.zeros(3, 3).double()
    for i in range(12):
        out = F.conv2d(x[i][None], model.conv.weight, model.conv.bias, stride=2, padding=1)
        logits = model.head(torch.relu(out).flatten(1))
        (g,) = torch.autograd.grad(F.cross_entropy(logits, labels[i][None]), [out])
        padded = F.pad(x[i], (1, 1, 1, 1))
        for row in range(3):
            for col in range(3):
                patch = padded[:, 2 * row : 2 * row + 3, 2 * col : 2 * col + 3].reshape(-1)
                a = torch.cat([patch, torch.ones(1, dtype=torch.float64)])
                activation += torch.outer(a, a) / (12 * 9)
                gradient += torch.outer(g[0, :, row, col], g[0, :, row, col]) / 12
    torch.testing.assert_close(factors[0][0], activation, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(factors[0][1], gradient, rtol=1e-10, atol=1e-12)


class Conv1dModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, dilation=2, padding=1)
        self.head = nn.Linear(3 * 5, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def test_kronecker_factors_of_a_dilated_1d_convolution_match_a_loop():
    torch.manual_seed(2)
    model = Conv1dModel().double()
    x, labels = torch.randn(10, 2, 7, dtype=torch.float64), torch.randint(0, 4, (10,))
    _, factors = fit_factors(model, dt.Classification(), (x, labels))
    activation, gradient = torch.zeros(7, 7).double(), torch.zeros(3, 3).double()
    for i in range(10):
        out = F.conv1d(x[i][None], model.conv.weight, model.conv.bias, dilation=2, padding=1)
        logits = model.head(torch.tanh(out).flatten(1))
        (g,) = torch.autograd.grad(F.cross_entropy(logits, labels[i][None]), [out])
        padded = F.pad(x[i], (1, 1))
        for position in range(5):
            patch = padded[:, position : position + 5 : 2].reshape(-1)  # taps 0, 2, 4
            a = torch.cat([patch, torch.ones(1, dtype=torch.float64)])
            activation += torch.outer(a, a) / (10 * 5)
            gradient += torch.outer(g[0, :, position], g[0, :, position]) / 10
    torch.testing.assert_close(factors[0][0], activation, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(factors[0][1], gradient, rtol=1e-10, atol=1e-12)


# -- EK-FAC against explicit Fishers and exact Hessians -----------------------------------------


def linear_classifier(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3).double()
    x = torch.randn(40, 4, dtype=torch.float64)
    labels = torch.randint(0, 3, (40,))
    return model, x, labels


def test_corrected_eigenvalues_are_the_fisher_diagonal_in_the_kronecker_eigenbasis():
    model, x, labels = linear_classifier()
    estimator = InfluenceFunctions(model, dt.Classification(), progress=False)
    estimator.fit((x, labels))
    matrices = [
        linear_gradient_matrix(model, F.cross_entropy(model(x[i][None]), labels[i][None]))
        for i in range(40)
    ]
    fisher = sum(torch.outer(m.reshape(-1), m.reshape(-1)) for m in matrices) / 40
    fitted = estimator.curvatures_[0]
    q_a, q_s = fitted.bases[0]
    basis = torch.kron(q_s, q_a)  # vec(Q_Sᵀ G Q_A) = (Q_S ⊗ Q_A)ᵀ vec(G), row-major
    torch.testing.assert_close(
        fitted.eigenvalues[0].reshape(-1),
        torch.diagonal(basis.T @ fisher @ basis),
        rtol=1e-10,
        atol=1e-14,
    )
    # K-FAC's eigenvalues are the products of the factors' eigenvalues
    kfac = InfluenceFunctions(model, dt.Classification(), hessian="kfac", progress=False)
    kfac.fit((x, labels))
    augmented = torch.cat([x, torch.ones(40, 1, dtype=torch.float64)], 1)
    values_a = torch.linalg.eigvalsh(augmented.T @ augmented / 40)
    values_s = torch.linalg.eigvalsh(_gradient_covariance(model, x, labels))
    torch.testing.assert_close(
        kfac.curvatures_[0].eigenvalues[0], torch.outer(values_s, values_a).clamp_min(0)
    )


def _gradient_covariance(model, x, labels):
    """``S = E[g gᵀ]`` of a linear classifier: ``g = softmax − onehot``."""
    g = torch.softmax(model(x), -1).detach() - F.one_hot(labels, 3).double()
    return g.T @ g / len(x)


def product_regression(seed=0, n_inputs=6, in_dim=3, out_dim=2):
    """A linear regression whose empirical Fisher is exactly ``A ⊗ S`` with ``S = I``: every
    input is paired with every residual ``±√out · e_k``, so (inputs, output gradients) form a
    product set, and ``E[g gᵀ] = I`` makes the Fisher equal the exact Hessian of the loss."""
    torch.manual_seed(seed)
    model = nn.Linear(in_dim, out_dim).double()
    inputs = torch.randn(n_inputs, in_dim, dtype=torch.float64)
    eye = torch.eye(out_dim, dtype=torch.float64) * out_dim**0.5
    residuals = torch.cat([eye, -eye])
    with torch.no_grad():
        predictions = model(inputs)
    x = inputs.repeat_interleave(len(residuals), 0)
    t = (predictions[:, None, :] - residuals[None]).reshape(-1, out_dim)
    return model, x, t


def flat_linear_loss(model, x, t):
    """The mean squared-error loss as a function of ``vec([W, b])`` (row-major)."""
    out_dim, in_dim = model.weight.shape

    def loss(flat):
        matrix = flat.reshape(out_dim, in_dim + 1)
        prediction = x @ matrix[:, :-1].T + matrix[:, -1]
        return 0.5 * (prediction - t).square().sum(-1).mean()

    return loss


@pytest.mark.parametrize("hessian", ["ekfac", "kfac"])
def test_scores_equal_the_closed_form_with_the_exact_hessian(hessian):
    model, x, t = product_regression()
    flat = torch.cat([model.weight, model.bias[:, None]], 1).reshape(-1).detach()
    exact = torch.autograd.functional.hessian(flat_linear_loss(model, x, t), flat)
    damping = 0.05
    estimator = InfluenceFunctions(
        model, Regression(), hessian=hessian, damping_absolute=damping, progress=False
    )
    estimator.fit((x, t))
    torch.manual_seed(5)
    targets = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    got = estimator.score(targets).scores

    def gradient(xi, ti):
        return linear_gradient_matrix(model, 0.5 * (model(xi) - ti).square().sum()).reshape(-1)

    train = torch.stack([gradient(x[i], t[i]) for i in range(len(x))])
    target = torch.stack([gradient(targets[0][j], targets[1][j]) for j in range(4)])
    inverse = torch.linalg.inv(exact + damping * torch.eye(len(flat), dtype=torch.float64))
    expected = (target @ inverse @ train.T).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_diagonal_hessian_of_a_cnn_with_batch_norm_matches_the_closed_form(digits):
    from conftest import SmallCNN

    model = SmallCNN().double().eval()
    X, y = digits
    x, labels = X[:24].double(), y[:24]
    estimator = InfluenceFunctions(
        model, dt.Classification(), hessian="diagonal", damping_absolute=1e-3, progress=False
    )
    estimator.fit((x, labels))
    assert estimator.layers_ == ["conv", "head"]
    assert estimator.fallback_params_ == ["norm.weight", "norm.bias"]
    got = estimator.score((X[100:103].double(), y[100:103])).scores
    train = torch.stack([cross_entropy_gradient(model, x[i], labels[i]) for i in range(24)])
    target = torch.stack(
        [cross_entropy_gradient(model, X[100 + j].double(), y[100 + j]) for j in range(3)]
    )
    expected = (target / (train.square().mean(0) + 1e-3)) @ train.T
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-8, atol=1e-12)
    # EK-FAC on the same model: the norm parameters get the same diagonal, scores are finite
    ekfac = InfluenceFunctions(model, dt.Classification(), progress=False).fit((x, labels))
    assert np.isfinite(ekfac.score((X[100:103].double(), y[100:103])).scores).all()
    assert ekfac.damping_.shape == (1, 4)


@pytest.mark.parametrize("hessian", ["ekfac", "diagonal"])
def test_refinement_converges_to_the_exact_damped_fisher_inverse(digits, hessian):
    """A two-layer MLP, where EK-FAC is not exact (cross-layer blocks, factorisation): the
    refined scores approach ``m (F + λI)⁻¹ g`` with the explicit empirical Fisher ``F``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    X, y = digits
    keep = y < 4
    x, labels = X[keep][:50].double(), y[keep][:50]
    targets = (X[keep][50:53].double(), y[keep][50:53])
    train = torch.stack([cross_entropy_gradient(model, x[i], labels[i]) for i in range(50)])
    target = torch.stack(
        [cross_entropy_gradient(model, targets[0][j], targets[1][j]) for j in range(3)]
    )
    damping = 1e-2
    fisher = train.T @ train / 50 + damping * torch.eye(train.shape[1], dtype=torch.float64)
    expected = (torch.linalg.solve(fisher, target.T).T @ train.T).numpy()
    errors = []
    for steps in (0, 3, 40):
        estimator = InfluenceFunctions(
            model, dt.Classification(), hessian=hessian, damping_absolute=damping,
            refine_steps=steps, progress=False,
        )  # fmt: skip
        got = estimator.fit((x, labels)).score(targets).scores
        errors.append(np.abs(got - expected).max() / np.abs(expected).max())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3  # measured: EK-FAC 1.2 → 0.14 → 3e-5; diagonal 11 → 0.31 → 9e-6


def test_relative_damping_is_a_tenth_of_each_blocks_mean_eigenvalue():
    model, x, labels = linear_classifier()
    estimator = InfluenceFunctions(model, dt.Classification(), progress=False).fit((x, labels))
    mean = float(estimator.curvatures_[0].eigenvalues[0].mean())
    np.testing.assert_allclose(estimator.damping_, [[0.1 * mean]])


def test_the_sampled_label_fisher_estimates_the_gauss_newton_matrix():
    """With labels drawn from the softmax, ``S`` of a linear classifier estimates
    ``E[diag(p) − ppᵀ]`` (the Gauss–Newton factor), reproducibly for one seed."""
    torch.manual_seed(3)
    model = nn.Linear(4, 3).double()
    x = torch.randn(4000, 4, dtype=torch.float64)
    labels = torch.zeros(4000, dtype=torch.long)  # far from the model: empirical S differs

    def gradient_factor(fisher, seed=0):
        estimator = InfluenceFunctions(
            model, dt.Classification(), hessian="kfac", fisher=fisher, seed=seed,
            batch_size=500, progress=False,
        )  # fmt: skip
        stored = estimator.fit((x, labels)).store_
        return stored.root["influence/0/covariances/gradient_0"][...]

    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    expected = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0).numpy()
    sampled = gradient_factor("sampled")
    np.testing.assert_allclose(sampled, expected, atol=0.03 * np.abs(expected).max())
    np.testing.assert_array_equal(gradient_factor("sampled"), sampled)
    assert not np.array_equal(gradient_factor("sampled", seed=1), sampled)
    empirical = gradient_factor("empirical")
    assert np.abs(empirical - expected).max() > 10 * np.abs(sampled - expected).max()


def test_the_sampled_fisher_of_a_regressor_is_its_gauss_newton_matrix():
    """Targets ŷ + N(0, 1): the output-gradient factor of a linear regressor is E[ε²] = 1, where
    the empirical one is the mean squared residual of its (far-off) training targets; with
    several outputs and one attributed, that output's."""
    torch.manual_seed(4)
    x = torch.randn(4000, 4, dtype=torch.float64)

    def gradient_factor(model, task, targets, fisher, seed=0):
        estimator = InfluenceFunctions(
            model, task, hessian="kfac", fisher=fisher, seed=seed, batch_size=500, progress=False
        )
        stored = estimator.fit((x, targets)).store_
        return stored.root["influence/0/covariances/gradient_0"][...]

    model = nn.Linear(4, 1).double()
    far = torch.full((4000,), 5.0, dtype=torch.float64)
    sampled = gradient_factor(model, dt.Regression(), far, "sampled")
    np.testing.assert_allclose(sampled, [[1.0]], atol=0.06)
    np.testing.assert_array_equal(gradient_factor(model, dt.Regression(), far, "sampled"), sampled)
    with torch.no_grad():
        residual = (model(x).squeeze(1) - far).square().mean()
    np.testing.assert_allclose(
        gradient_factor(model, dt.Regression(), far, "empirical"), [[residual]], rtol=1e-6
    )
    two = nn.Linear(4, 2).double()
    for targets in (far, torch.stack([far, -far], 1)):
        factor = gradient_factor(two, dt.Regression(output=1), targets, "sampled")
        np.testing.assert_allclose(factor, [[0.0, 0.0], [0.0, 1.0]], atol=0.06)


# -- the identity Hessian, signs ----------------------------------------------------------------


def test_identity_hessian_is_the_gradient_dot_product(trained_mlps):
    models, X, y = trained_mlps
    train, targets = (X[:60], y[:60]), (X[300:305], y[300:305])
    dot = dt.GradientDot(models[0], dt.Classification(), projector="identity", progress=False)
    expected = dot.fit(train).score(targets).scores
    outputs = InfluenceFunctions(
        models[0], dt.Classification(), hessian="identity", measurement="output", progress=False
    )
    got = outputs.fit(train).score(targets).scores
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    # measured on the loss, each target row is weighted by the target's Q = 1 − p_y
    losses = InfluenceFunctions(models[0], dt.Classification(), hessian="identity", progress=False)
    by_loss_attributions = losses.fit(train).score(targets)
    by_loss = by_loss_attributions.scores
    with torch.no_grad():
        margins = dt.tasks.classification_margin(models[0](targets[0]), targets[1])
    q = torch.sigmoid(-margins).numpy()
    np.testing.assert_allclose(by_loss, q[:, None] * expected, rtol=1e-4, atol=1e-9)
    with torch.no_grad():
        train_margins = dt.tasks.classification_margin(models[0](train[0]), train[1])
    np.testing.assert_allclose(
        by_loss_attributions.out_to_loss, torch.sigmoid(-train_margins).numpy(), rtol=1e-5
    )


def test_a_training_example_is_its_own_proponent(trained_mlps):
    models, X, y = trained_mlps
    estimator = InfluenceFunctions(models[0], dt.Classification(), progress=False)
    scores = estimator.fit((X[:50], y[:50])).score((X[:50], y[:50])).scores
    assert (np.diagonal(scores) > 0).all()  # gᵀ(H + λI)⁻¹g > 0


def test_scores_predict_leave_one_out_retraining_of_a_convex_model():
    """L2-regularised softmax regression, retrained to convergence without each example: the
    target loss rises by about ``score / n`` (``damping_absolute`` = the regulariser's ``α``)."""
    torch.manual_seed(0)
    n, alpha = 60, 0.05
    x = torch.randn(n, 4, dtype=torch.float64)
    true = 2 * torch.randn(4, 3, dtype=torch.float64)
    labels = torch.distributions.Categorical(logits=x @ true).sample()
    targets = torch.randn(5, 4, dtype=torch.float64)
    target_labels = torch.distributions.Categorical(logits=targets @ true).sample()

    def fit(keep, start=None):
        model = nn.Linear(4, 3).double()
        if start is not None:
            model.load_state_dict(start)
        optimiser = torch.optim.LBFGS(
            model.parameters(), max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
            history_size=50, line_search_fn="strong_wolfe",
        )  # fmt: skip

        def closure():
            optimiser.zero_grad()
            loss = F.cross_entropy(model(x[keep]), labels[keep], reduction="sum") / n
            loss = loss + alpha / 2 * sum(p.square().sum() for p in model.parameters())
            loss.backward()
            return loss

        optimiser.step(closure)
        return model

    def target_losses(model):
        with torch.no_grad():
            return F.cross_entropy(model(targets), target_labels, reduction="none").numpy()

    full = fit(torch.ones(n, dtype=torch.bool))
    actual = np.empty((5, n))
    for i in range(n):
        keep = torch.ones(n, dtype=torch.bool)
        keep[i] = False
        actual[:, i] = target_losses(fit(keep, full.state_dict())) - target_losses(full)
    correlations = {}
    for hessian in ("ekfac", "identity"):
        estimator = InfluenceFunctions(
            full, dt.Classification(), hessian=hessian, damping_absolute=alpha, progress=False
        )
        scores = estimator.fit((x, labels)).score((targets, target_labels)).scores
        correlations[hessian] = np.corrcoef(scores.ravel() / n, actual.ravel())[0, 1]
    assert correlations["ekfac"] > 0.95  # measured 0.976
    assert correlations["ekfac"] > correlations["identity"]  # measured 0.940


# -- the store: resuming after a crash ----------------------------------------------------------


class Crash(RuntimeError):
    pass


def test_resuming_after_a_crash_between_stages_gives_identical_scores(
    trained_mlps, tmp_path, monkeypatch
):
    models, X, y = trained_mlps
    train, targets = (X[:80], y[:80]), (X[300:304], y[300:304])
    settings = {"progress": False, "batch_size": 16}
    reference = InfluenceFunctions(models[0], dt.Classification(), **settings)
    expected = reference.fit(train, [models[0], models[1]]).score(targets).scores

    location = tmp_path / "store"
    real_pass = curvature.corrected_eigenvalues_and_diagonal

    def crash(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(curvature, "corrected_eigenvalues_and_diagonal", crash)
    estimator = InfluenceFunctions(models[0], dt.Classification(), store=location, **settings)
    with pytest.raises(Crash):
        estimator.fit(train, [models[0], models[1]])
    group = Store(location).root["influence/0"]
    assert group["covariances"].attrs["complete"] and group["eigen"].attrs["complete"]
    assert "corrected" not in group

    # a crash while writing a stage leaves it incomplete; it is then recomputed
    monkeypatch.setattr(curvature, "corrected_eigenvalues_and_diagonal", real_pass)
    real_create = stages.create_array
    calls = []

    def crash_on_second_array(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Crash
        return real_create(*args, **kwargs)

    monkeypatch.setattr(stages, "create_array", crash_on_second_array)
    with pytest.raises(Crash):
        estimator.fit(train, [models[0], models[1]])
    assert not Store(location).root["influence/0/corrected"].attrs["complete"]
    monkeypatch.setattr(stages, "create_array", real_create)

    # the finished stages are read back, not refitted: only checkpoint 1 still needs factors
    real_factors, factor_calls = curvature.kronecker_factors, []

    def counted(*args, **kwargs):
        factor_calls.append(1)
        return real_factors(*args, **kwargs)

    monkeypatch.setattr(curvature, "kronecker_factors", counted)
    resumed = InfluenceFunctions(models[0], dt.Classification(), store=location, **settings)
    got = resumed.fit(train, [models[0], models[1]]).score(targets).scores
    np.testing.assert_array_equal(got, expected)
    assert len(factor_calls) == 1
    # a complete store refits nothing at all
    monkeypatch.setattr(curvature, "corrected_eigenvalues_and_diagonal", crash)
    again = InfluenceFunctions(models[0], dt.Classification(), store=location, **settings)
    refitted = again.fit(train, [models[0], models[1]])
    np.testing.assert_array_equal(refitted.score(targets).scores, expected)
    # K-FAC reuses the stored factors and eigenbases
    kfac = InfluenceFunctions(
        models[0], dt.Classification(), hessian="kfac", store=location, **settings
    )
    assert np.isfinite(kfac.fit(train, [models[0], models[1]]).score(targets).scores).all()


def test_a_store_of_another_run_is_refused(trained_mlps, tmp_path):
    models, X, y = trained_mlps
    location = tmp_path / "store"
    InfluenceFunctions(models[0], dt.Classification(), store=location, progress=False).fit(
        (X[:40], y[:40])
    )
    with pytest.raises(StoreMismatchError, match="train_data"):
        InfluenceFunctions(models[0], dt.Classification(), store=location, progress=False).fit(
            (X[40:80], y[40:80])
        )
    with pytest.raises(StoreMismatchError, match="another checkpoint"):
        InfluenceFunctions(models[0], dt.Classification(), store=location, progress=False).fit(
            (X[:40], y[:40]), models[1]
        )


# -- bad inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"hessian": "gauss-newton"}, "hessian must be one of"),
        ({"measurement": "margin"}, "measurement must be one of"),
        ({"damping": -1.0}, "damping must be a non-negative number"),
        ({"damping": "auto"}, "damping must be a non-negative number"),
        ({"damping": float("inf")}, "damping must be a non-negative number"),
        ({"damping_absolute": -0.1}, "damping_absolute must be a non-negative number"),
        ({"damping_absolute": "x"}, "damping_absolute must be a non-negative number"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"refine_steps": -1}, "refine_steps must be a non-negative integer"),
        ({"fisher": "true"}, "fisher must be one of"),
        ({"gradients": "ghost"}, "gradients must be one of"),
        ({"hessian": "identity", "refine_steps": 2}, "refine_steps needs a preconditioner"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_error(settings, message):
    model = make_mlp()
    estimator = InfluenceFunctions(model, dt.Classification(), progress=False, **settings)
    with pytest.raises(ValueError, match=message):
        estimator.fit((torch.randn(4, 64), torch.zeros(4, dtype=torch.long)))


def test_the_sampled_fisher_needs_a_classifier():
    model, x, t = product_regression()
    estimator = InfluenceFunctions(model, Regression(), fisher="sampled", progress=False)
    with pytest.raises(ValueError, match="needs the task Classification"):
        estimator.fit((x, t))


def test_bad_data_and_unfitted_use_are_refused():
    model = make_mlp()
    estimator = InfluenceFunctions(model, dt.Classification(), progress=False)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        estimator.score((torch.randn(2, 64), torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="training set is empty"):
        estimator.fit((torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"n_classes|out of range|labels"):
        estimator.fit((torch.randn(4, 64), torch.full((4,), 12)))
    estimator.fit((torch.randn(4, 64), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match="no targets"):
        estimator.score((torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)))
