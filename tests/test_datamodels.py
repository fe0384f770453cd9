"""Datamodels against scikit-learn's Lasso, and on outputs that are linear in the masks by
construction."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso, lasso_path

from datatrace import Attributions
from datatrace._estimator import NotFittedError
from datatrace.datamodels import MIN_PATH_STEPS, Datamodels
from datatrace.evaluate import lds, predict_outputs

TIGHT = {"dtype": torch.float64, "tol": 1e-12, "max_iter": 20_000, "progress": False}


pytestmark = pytest.mark.usefixtures("one_thread")


def sparse_linear(seed, n_train, n_subsets, n_targets, n_true=5, noise=1.0, n_fresh=0):
    """Random masks at α = 0.5 and outputs ``masks @ Wᵀ + b + noise``, ``W`` with ``n_true``
    nonzero weights of magnitude 0.5–1.5 per target.

    Returns:
        (masks, outputs, fresh masks, fresh outputs, fresh noiseless outputs, W, b)
    """
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_targets, n_train))
    for row in weights:
        chosen = rng.choice(n_train, n_true, replace=False)
        row[chosen] = rng.choice([-1, 1], n_true) * rng.uniform(0.5, 1.5, n_true)
    bias = rng.standard_normal(n_targets)

    def draw(rows):
        masks = rng.random((rows, n_train)) < 0.5
        clean = masks @ weights.T + bias
        return masks, clean + noise * rng.standard_normal(clean.shape), clean

    masks, outputs, _ = draw(n_subsets)
    fresh_masks, fresh_outputs, fresh_clean = draw(n_fresh) if n_fresh else (None, None, None)
    return masks, outputs, fresh_masks, fresh_outputs, fresh_clean, weights, bias


@pytest.fixture(scope="module")
def small_fit():
    masks, outputs, *_ = sparse_linear(0, n_train=30, n_subsets=400, n_targets=4, n_true=4)
    return masks, outputs, Datamodels(**TIGHT).fit(masks, outputs)


def test_refit_equals_sklearn_lasso_at_the_chosen_lambda(small_fit):
    masks, outputs, model = small_fit
    mean, std = masks.mean(0), masks.std(0)
    standardised = (masks - mean) / std
    for j in range(outputs.shape[1]):
        reference = Lasso(alpha=model.lambda_[j], tol=1e-13, max_iter=1_000_000)
        reference.fit(standardised, outputs[:, j])
        raw_weights = reference.coef_ / std
        raw_bias = reference.intercept_ - mean @ raw_weights
        scale = np.abs(raw_weights).max()
        # measured: 4e-8 × max |w|
        assert np.abs(model.weights_[j] - raw_weights).max() <= 1e-6 * scale
        assert model.bias_[j] == pytest.approx(raw_bias, abs=1e-6 * scale)
    np.testing.assert_allclose(model.mask_mean_, mean)
    np.testing.assert_allclose(model.mask_std_, std)


def test_path_validation_error_and_early_stop_match_sklearn(small_fit):
    masks, outputs, model = small_fit
    standardised = (masks - masks.mean(0)) / masks.std(0)
    val = model.val_rows_
    train = np.setdiff1d(np.arange(len(masks)), val)
    assert len(val) == math.ceil(0.1 * len(masks))
    X, X_val = standardised[train], standardised[val]
    for j in range(outputs.shape[1]):
        y = outputs[train, j]
        steps = model.path_steps_[j]
        alphas = model.lambda_path_[:steps, j]
        largest = np.abs((X - X.mean(0)).T @ (y - y.mean())).max() / len(y)
        assert alphas[0] == pytest.approx(largest)
        _, coefs, _ = lasso_path(
            X - X.mean(0), y - y.mean(), alphas=alphas, tol=1e-13, max_iter=1_000_000
        )
        bias = y.mean() - X.mean(0) @ coefs
        val_mse = ((outputs[val, j][:, None] - X_val @ coefs - bias) ** 2).mean(0)
        np.testing.assert_allclose(model.val_mse_path_[:steps, j], val_mse, rtol=1e-6)
        assert np.isnan(model.val_mse_path_[steps:, j]).all()
        best = int(np.argmin(val_mse))
        assert model.lambda_[j] == alphas[best]
        # the path stops once `patience` steps bring no new best, after MIN_PATH_STEPS steps
        expected = max(MIN_PATH_STEPS, best + 1 + model.early_stop_patience)
        assert steps == min(expected, model.l1_path_steps)


def test_recovers_sparse_weights_and_reaches_the_lds_ceiling():
    masks, outputs, fresh, fresh_outputs, fresh_clean, weights, bias = sparse_linear(
        1, n_train=100, n_subsets=1500, n_targets=20, noise=1.0, n_fresh=500
    )
    model = Datamodels(progress=False).fit(masks, outputs)
    found, true = model.weights_ != 0, weights != 0
    assert (found & true).sum() / true.sum() == 1.0  # recall of the nonzero set
    # The lasso keeps small spurious weights (precision of the nonzero set 0.21); those above
    # 0.25 in magnitude are exactly the true ones.
    large = np.abs(model.weights_) > 0.25
    assert (large & true).sum() / large.sum() >= 0.95
    relative_error = np.linalg.norm(model.weights_ - weights) / np.linalg.norm(weights)
    assert relative_error <= 0.2  # measured 0.12 (ℓ1 shrinkage)
    np.testing.assert_allclose(model.bias_, bias, atol=0.6)  # measured ≤ 0.22
    fitted = lds(model, fresh, fresh_outputs)
    ceiling = lds(weights, fresh, fresh_outputs)  # the true weights, same fresh subsets
    assert fitted.mean >= ceiling.mean - 0.02  # measured 0.734 against 0.737
    assert lds(model, fresh, fresh_clean).mean >= 0.95  # noiseless outputs; measured 0.992


def test_examples_in_every_subset_or_none_get_zero_weight():
    masks, outputs, *_ = sparse_linear(2, n_train=20, n_subsets=200, n_targets=3)
    masks[:, 0] = True
    masks[:, 1] = False
    outputs = outputs + 5.0 * masks[:, :1]  # an always-present example's effect is the bias's
    model = Datamodels(progress=False).fit(masks, outputs)
    assert (model.weights_[:, :2] == 0).all()
    assert np.isfinite(model.weights_).all() and np.isfinite(model.bias_).all()
    assert (model.mask_std_[:2] == 0).all()
    np.testing.assert_allclose(
        model.predict(masks), masks @ model.weights_.T.astype(np.float64) + model.bias_
    )


def test_target_batches_give_the_same_weights(small_fit):
    masks, outputs, model = small_fit
    batched = Datamodels(**TIGHT, batch_targets=3).fit(masks, outputs)
    np.testing.assert_allclose(batched.weights_, model.weights_, atol=1e-7)
    np.testing.assert_allclose(batched.lambda_, model.lambda_, rtol=1e-12)


def test_results_object_and_seed_axis():
    masks, outputs, *_ = sparse_linear(3, n_train=20, n_subsets=150, n_targets=3)
    rng = np.random.default_rng(0)
    per_seed = outputs[:, None, :] + rng.standard_normal((150, 2, 3))
    results = SimpleNamespace(masks=masks.astype(np.uint8), outputs=per_seed)
    from_results = Datamodels(progress=False).fit(results)
    from_mean = Datamodels(progress=False).fit(masks, per_seed.mean(1))
    np.testing.assert_allclose(from_results.weights_, from_mean.weights_)


def test_attributions_carry_bias_and_lambda(small_fit, tmp_path):
    masks, _, model = small_fit
    attributions = model.attributions()
    assert isinstance(attributions, Attributions)
    assert attributions.method == "datamodels"
    assert attributions.scores.shape == (4, 30)
    np.testing.assert_allclose(attributions.info["bias"], model.bias_)
    np.testing.assert_allclose(attributions.info["lambda"], model.lambda_)
    attributions.save(tmp_path / "store", "dm")
    loaded = Attributions.load(tmp_path / "store", "dm")
    np.testing.assert_allclose(predict_outputs(loaded, masks), model.predict(masks))
    np.testing.assert_allclose(
        model.predict(masks), masks @ model.weights_.T.astype(np.float64) + model.bias_
    )


def test_float32_default_agrees_with_float64(small_fit):
    masks, outputs, model = small_fit
    single = Datamodels(progress=False).fit(masks, outputs)
    assert single.weights_.dtype == np.float32
    # default tol 1e-4: measured max difference 0.026 % of the largest weight
    assert np.abs(single.weights_ - model.weights_).max() <= 0.02 * np.abs(model.weights_).max()


def test_errors():
    masks, outputs, *_ = sparse_linear(4, n_train=10, n_subsets=30, n_targets=2)
    with pytest.raises(NotFittedError, match="fit"):
        Datamodels().attributions()
    with pytest.raises(ValueError, match="too few"):
        Datamodels(progress=False).fit(masks[:3], outputs[:3])
    with pytest.raises(ValueError, match="0/1"):
        Datamodels(progress=False).fit(masks * 2, outputs)
    with pytest.raises(ValueError, match="n_subsets=30"):
        Datamodels(progress=False).fit(masks, outputs[:-1])
    bad = outputs.copy()
    bad[5, 1] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        Datamodels(progress=False).fit(masks, bad)
    with pytest.raises(ValueError, match="outputs are missing"):
        Datamodels(progress=False).fit(masks)
    with pytest.raises(ValueError, match="val_fraction"):
        Datamodels(val_fraction=1.5, progress=False).fit(masks, outputs)
