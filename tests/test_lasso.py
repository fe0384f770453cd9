"""The batched lasso against scikit-learn's coordinate descent on the same problems."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso, lasso_path

from datatrace.methods.lasso import (
    LIPSCHITZ_SAFETY,
    CentredDesign,
    LassoConvergenceWarning,
    fit_lasso_path,
    lambda_max,
    lambda_path,
    solve_lasso,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# scikit-learn's reference solutions are solved to this duality gap (relative to ‖y − ȳ‖²).
REFERENCE_TOL = 1e-13
REFERENCE_MAX_ITER = 1_000_000


def mask_problem(seed=0, n_rows=300, n_train=60, n_targets=5, n_true=6, noise=0.7):
    """Standardised random masks and outputs that are a sparse linear function of them plus
    noise: (X (n_rows, n_train), Y (n_rows, n_targets))."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n_rows, n_train)) < 0.5
    weights = np.zeros((n_train, n_targets))
    weights[rng.choice(n_train, n_true, replace=False)] = rng.standard_normal((n_true, n_targets))
    outputs = masks @ weights + noise * rng.standard_normal((n_rows, n_targets)) + 2.0
    X = (masks - masks.mean(0)) / masks.std(0)
    return X, outputs


def sklearn_lasso(X, Y, lam):
    """Per-target ``Lasso(alpha=λ, fit_intercept=True)``: (coef (m, p), intercept (m,))."""
    fits = [
        Lasso(alpha=lam, tol=REFERENCE_TOL, max_iter=REFERENCE_MAX_ITER).fit(X, Y[:, t])
        for t in range(Y.shape[1])
    ]
    return np.stack([f.coef_ for f in fits]), np.array([f.intercept_ for f in fits])


@pytest.mark.parametrize(
    ("dtype", "tol", "bound"),
    # measured: max |Δcoef| / max |coef| = 1.2e-11 (float64) and 2.1e-6 (float32)
    [(torch.float64, 1e-12, 1e-8), (torch.float32, 1e-7, 1e-4)],
)
def test_matches_sklearn_lasso_at_several_lambdas(dtype, tol, bound):
    X, Y = mask_problem()
    for lam in (0.3, 0.05, 0.005):
        path = fit_lasso_path(X, Y, [lam], tol=tol, dtype=dtype, max_iter=20_000)
        coef, intercept = sklearn_lasso(X, Y, lam)
        scale = np.abs(coef).max()
        assert scale > 0
        assert np.abs(path.coef[0] - coef).max() <= bound * scale, lam
        assert np.abs(path.intercept[0] - intercept).max() <= bound * np.abs(intercept).max()
        assert (path.gap[0] <= tol).all()


def test_full_path_matches_sklearn_lasso_path():
    X, Y = mask_problem(seed=1, n_targets=3)
    centred_X, centred_Y = X - X.mean(0), Y - Y.mean(0)
    largest = np.abs(centred_X.T @ centred_Y).max(0) / len(X)
    grid = lambda_path(torch.as_tensor(largest), 30, 1e-3).numpy()  # (30, n_targets)
    ours = fit_lasso_path(X, Y, grid, tol=1e-12, dtype=torch.float64, max_iter=20_000)
    for t in range(Y.shape[1]):
        np.testing.assert_allclose(
            grid[:, t], np.geomspace(largest[t], 1e-3 * largest[t], 30), rtol=1e-12
        )
        alphas, coefs, _ = lasso_path(
            centred_X, centred_Y[:, t], alphas=grid[:, t], tol=REFERENCE_TOL,
            max_iter=REFERENCE_MAX_ITER,
        )  # fmt: skip
        np.testing.assert_allclose(alphas, grid[:, t])
        # A duality gap of 1e-12 bounds the objective, not the weights: weights that have just
        # entered the model (near λ_max) converge last. Measured: 1.1e-6 × max |coef|.
        scale = np.abs(coefs).max()
        assert np.abs(ours.coef[:, t, :] - coefs.T).max() <= 1e-5 * scale


def test_lambda_max_zeroes_every_weight_and_no_more():
    X, Y = mask_problem(seed=2)
    design = CentredDesign(torch.as_tensor(X))
    xty, _, _ = design.cross(torch.as_tensor(Y))
    largest = lambda_max(xty).numpy()
    at_max = fit_lasso_path(X, Y, largest[None, :], tol=1e-12, dtype=torch.float64)
    below = fit_lasso_path(X, Y, 0.99 * largest[None, :], tol=1e-12, dtype=torch.float64)
    assert (at_max.coef == 0).all()
    np.testing.assert_allclose(at_max.intercept[0], Y.mean(0))
    assert ((below.coef[0] != 0).sum(1) >= 1).all()


def test_per_target_lambdas_equal_separate_fits():
    X, Y = mask_problem(seed=3, n_targets=4)
    lambdas = np.array([[0.2, 0.1, 0.05, 0.01], [0.1, 0.05, 0.02, 0.005]])
    together = fit_lasso_path(X, Y, lambdas, tol=1e-12, dtype=torch.float64, max_iter=20_000)
    for t in range(4):
        alone = fit_lasso_path(
            X, Y[:, t], lambdas[:, t], tol=1e-12, dtype=torch.float64, max_iter=20_000
        )
        np.testing.assert_allclose(together.coef[:, t], alone.coef[:, 0], atol=1e-10)
        np.testing.assert_allclose(together.lambdas[:, t], lambdas[:, t])


def test_wide_design_without_gram_matches_sklearn():
    # n_features > 2 n_rows: the solver multiplies by X_c and X_cᵀ instead of forming G.
    X, Y = mask_problem(seed=4, n_rows=40, n_train=120, n_targets=3)
    assert CentredDesign(torch.as_tensor(X)).gram is None
    for lam in (0.2, 0.05):
        path = fit_lasso_path(X, Y, [lam], tol=1e-12, dtype=torch.float64, max_iter=100_000)
        coef, _ = sklearn_lasso(X, Y, lam)
        assert np.abs(path.coef[0] - coef).max() <= 1e-7 * np.abs(coef).max()  # measured 2e-11


def test_underestimated_lipschitz_constant_is_corrected():
    X, Y = mask_problem(seed=5)
    design = CentredDesign(torch.as_tensor(X))
    true_largest = float(torch.linalg.eigvalsh(design.gram).max())
    assert true_largest <= design.lipschitz <= 1.2 * true_largest
    design.lipschitz = 0.3 * true_largest  # steps 3× too long: FISTA would diverge
    xty, _, yy = design.cross(torch.as_tensor(Y))
    lambdas = torch.full((Y.shape[1],), 0.02, dtype=torch.float64)
    weights, _, gap = solve_lasso(
        design, xty, yy, lambdas, torch.zeros_like(xty), tol=1e-12, max_iter=20_000
    )
    # L grows to the largest curvature met along the steps taken, which is what descent needs
    assert design.lipschitz > 0.3 * true_largest * LIPSCHITZ_SAFETY
    coef, _ = sklearn_lasso(X, Y, 0.02)
    assert np.abs(weights.T.numpy() - coef).max() <= 1e-8 * np.abs(coef).max()
    assert (gap <= 1e-12).all()


def test_constant_target_gets_zero_weights():
    X, Y = mask_problem(seed=6, n_targets=2)
    Y[:, 1] = 3.5
    path = fit_lasso_path(X, Y, [0.05, 0.01], dtype=torch.float64)
    assert (path.coef[:, 1] == 0).all()
    np.testing.assert_allclose(path.intercept[:, 1], 3.5)


def test_too_few_iterations_warn():
    X, Y = mask_problem(seed=7)
    with pytest.warns(LassoConvergenceWarning, match="did not reach"):
        path = fit_lasso_path(X, Y, [0.001], tol=1e-12, max_iter=3, dtype=torch.float64)
    assert (path.n_iter == 3).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_lasso_path(X, Y, [0.1], dtype=torch.float64)


def test_input_errors():
    X, Y = mask_problem(seed=8)
    with pytest.raises(ValueError, match="same rows"):
        fit_lasso_path(X, Y[:-1], [0.1])
    with pytest.raises(ValueError, match="non-negative"):
        fit_lasso_path(X, Y, [-0.1])
    with pytest.raises(ValueError, match="n_lambdas"):
        fit_lasso_path(X, Y, np.ones((2, 3)))
    with pytest.raises(ValueError, match="at least 2 rows"):
        fit_lasso_path(X[:1], Y[:1], [0.1])
    with pytest.raises(ValueError, match="eps"):
        lambda_path(torch.ones(2), 10, 0.0)
