"""Baselines against direct computations."""

import numpy as np
import pytest
import torch
from torch import nn

import datatrace as dt
from datatrace.grads.featurize import GradientFeatures
from test_trak import autograd_features


@pytest.fixture(scope="module")
def setting(trained_mlps):
    models, X, y = trained_mlps
    return models[:2], (X[:120], y[:120]), (X[1000:1008], y[1000:1008])


def test_gradient_dot_is_q_weighted_tracin(setting):
    models, train, targets = setting
    got = dt.GradientDot(models[0], dt.Classification(), projector="identity", progress=False)
    got = got.fit(train, [m.state_dict() for m in models]).score(targets).scores
    want = []
    for model in models:
        phi, q = autograd_features(model, *train)
        phi_target, _ = autograd_features(model, *targets)
        want.append(phi_target @ phi.T * q[None, :])
    want = np.mean(want, axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6 * np.abs(want).max())


def test_gradient_cosine(setting):
    models, train, targets = setting
    got = dt.GradientCosine(models[0], dt.Classification(), projector="identity", progress=False)
    got = got.fit(train, [models[0].state_dict()]).score(targets).scores
    phi, _ = autograd_features(models[0], *train)
    phi_target, _ = autograd_features(models[0], *targets)
    want = (phi_target / np.linalg.norm(phi_target, axis=1, keepdims=True)) @ (
        phi / np.linalg.norm(phi, axis=1, keepdims=True)
    ).T
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got).max() <= 1 + 1e-5


def test_representation_similarity_uses_penultimate_layer(setting):
    models, train, targets = setting
    got = dt.RepresentationSimilarity(models[0], dt.Classification(), progress=False)
    got = got.fit(train, [m.state_dict() for m in models]).score(targets).scores
    want = []
    for model in models:
        with torch.no_grad():  # the input of the last Linear: model[1](model[0](X))
            a, b = model[1](model[0](targets[0])), model[1](model[0](train[0]))
            a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
            want.append((a @ b.T).numpy())
    np.testing.assert_allclose(got, np.mean(want, axis=0), atol=1e-5)


def test_gradient_baselines_reuse_a_trak_store(setting, monkeypatch):
    models, train, targets = setting
    store = dt.Store()
    checkpoints = [m.state_dict() for m in models]
    dt.TRAK(models[0], dt.Classification(), proj_dim=64, store=store, progress=False).fit(
        train, checkpoints
    )
    calls = []
    original = GradientFeatures.featurize
    monkeypatch.setattr(
        GradientFeatures, "featurize", lambda self, *a: calls.append(1) or original(self, *a)
    )
    dot = dt.GradientDot(
        models[0], dt.Classification(), proj_dim=64, store=store, progress=False
    ).fit(train, checkpoints)
    assert calls == []  # training features came from the store
    assert dot.score(targets).scores.shape == (8, 120)


def test_score_before_fit_is_a_clear_error(setting):
    models, _, targets = setting
    with pytest.raises(RuntimeError, match="not fitted yet"):
        dt.GradientDot(models[0], dt.Classification()).score(targets)


def test_representation_similarity_refuses_a_foreign_layer_and_a_zero_batch():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    data = (torch.randn(10, 4), torch.randint(0, 3, (10,)))
    with pytest.raises(ValueError, match="is not a module of the model"):
        dt.RepresentationSimilarity(
            model, dt.Classification(), layer=nn.Linear(8, 3), progress=False
        ).fit(data)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        dt.RepresentationSimilarity(model, dt.Classification(), batch_size=0, progress=False).fit(
            data
        )
