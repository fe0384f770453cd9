"""Metagradients against references that cannot share their bugs: ``torch.optim`` for the forward
run, a plain autograd unroll of the whole run (``create_graph``, no checkpoints, an optimiser
written out here) and finite differences of retraining with perturbed data weights."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from datatrace import Attributions
from datatrace._estimator import NotFittedError
from datatrace.methods.metagradients import Metagradients
from datatrace.methods.training import DeterministicRun, TrainingRecipe, train_subset
from datatrace.tasks import Classification
from datatrace.tasks.classification import classification_margin

pytestmark = pytest.mark.usefixtures("one_thread")

N_TRAIN, N_FEATURES, N_CLASSES, HIDDEN = 20, 5, 3, 6
# 20 examples in batches of 4 for 2 epochs: 10 steps.
EPOCHS, BATCH = 2, 4
RECIPES = {
    "sgd": {"optimizer": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 1e-2},
    "adam": {"optimizer": "adam", "lr": 0.05, "weight_decay": 1e-2, "schedule": "cosine"},
}


def make_model(seed: int = 3) -> nn.Module:  # the seed of the runs below
    torch.manual_seed(seed)
    layers = nn.Sequential(nn.Linear(N_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, N_CLASSES))
    return layers.double()


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(N_TRAIN + 4, N_FEATURES, generator=generator, dtype=torch.float64)
    y = torch.randint(0, N_CLASSES, (N_TRAIN + 4,), generator=generator)
    return (X[:N_TRAIN], y[:N_TRAIN]), (X[N_TRAIN:], y[N_TRAIN:])


def recipe(name: str) -> TrainingRecipe:
    return TrainingRecipe(epochs=EPOCHS, batch_size=BATCH, seed=3, **RECIPES[name])


def unrolled_outputs(name, train, targets, weights):
    """Target margins after training, by plain autograd ops on ``weights`` (differentiable)."""
    settings = recipe(name)
    model = make_model()
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    first = [torch.zeros_like(p) for p in params]
    second = [torch.zeros_like(p) for p in params]
    order = settings.data_order(N_TRAIN)
    rates = settings.learning_rates(len(order))
    X, y = train
    for t, index in enumerate(order):
        index = torch.as_tensor(index)
        logits = torch.func.functional_call(model, dict(zip(names, params)), (X[index],))
        losses = nn.functional.cross_entropy(logits, y[index], reduction="none")
        loss = (weights[index] * losses).sum() / len(index)
        gradients = torch.autograd.grad(loss, params, create_graph=True)
        gradients = [g + settings.weight_decay * p for g, p in zip(gradients, params)]
        if settings.optimizer == "sgd":
            first = [settings.momentum * m + g for m, g in zip(first, gradients)]
            params = [p - rates[t] * m for p, m in zip(params, first)]
        else:
            beta1, beta2 = settings.betas
            first = [beta1 * m + (1 - beta1) * g for m, g in zip(first, gradients)]
            second = [beta2 * v + (1 - beta2) * g**2 for v, g in zip(second, gradients)]
            step_size = rates[t] / (1 - beta1 ** (t + 1))
            params = [
                p - step_size * m / ((v / (1 - beta2 ** (t + 1))).sqrt() + settings.eps)
                for p, m, v in zip(params, first, second)
            ]
    inputs, labels = targets
    logits = torch.func.functional_call(model, dict(zip(names, params)), (inputs,))
    return classification_margin(logits, labels)


def unrolled_metagradients(name, train, targets):
    weights = torch.ones(N_TRAIN, dtype=torch.float64, requires_grad=True)
    outputs = unrolled_outputs(name, train, targets, weights)
    rows = [torch.autograd.grad(value, weights, retain_graph=True)[0] for value in outputs]
    return torch.stack(rows).numpy()


def fitted(name, train, **settings):
    return Metagradients(
        make_model, Classification(), epochs=EPOCHS, batch_size=BATCH, seed=3,
        **{**RECIPES[name], **settings},
    ).fit(train)  # fmt: skip


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_forward_run_matches_torch_optim(name, data):
    train, _ = data
    settings = recipe(name)
    run = DeterministicRun(make_model(), train, settings)
    final, _ = run.run()
    model = make_model()
    if name == "sgd":
        optimizer = torch.optim.SGD(
            model.parameters(), lr=settings.lr, momentum=settings.momentum,
            weight_decay=settings.weight_decay,
        )  # fmt: skip
    else:
        optimizer = torch.optim.Adam(
            model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
    X, y = train
    for index, rate in zip(run.order, run.learning_rates):
        for group in optimizer.param_groups:
            group["lr"] = float(rate)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X[index]), y[index]).backward()
        optimizer.step()
    for ours, theirs in zip(final.params, model.parameters()):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_metagradients_match_autograd_unroll(name, data):
    train, targets = data
    attributions = fitted(name, train).score(targets)
    assert isinstance(attributions, Attributions)
    assert attributions.scores.shape == (len(targets[0]), N_TRAIN)
    expected = unrolled_metagradients(name, train, targets)
    np.testing.assert_allclose(attributions.scores, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_metagradients_match_finite_differences_of_retraining(name, data):
    train, targets = data
    scores = fitted(name, train).score(targets).scores
    step = 1e-5
    differences = np.empty_like(scores)
    for i in range(N_TRAIN):
        outputs = []
        for sign in (1, -1):
            weights = torch.ones(N_TRAIN, dtype=torch.float64)
            weights[i] += sign * step
            outputs.append(unrolled_outputs(name, train, targets, weights).detach())
        differences[:, i] = ((outputs[0] - outputs[1]) / (2 * step)).numpy()
    np.testing.assert_allclose(scores, differences, rtol=1e-6, atol=1e-9)
    assert np.abs(scores).max() > 1e-3  # a run that attributes something


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_checkpointed_replay_does_not_change_the_result(name, data):
    train, targets = data
    n_steps = EPOCHS * math.ceil(N_TRAIN / BATCH)
    results = {}
    for segment in (1, 3, math.ceil(math.sqrt(n_steps)), n_steps, None):
        estimator = fitted(name, train, segment=segment)
        expected_segment = segment or math.ceil(math.sqrt(n_steps))
        assert estimator.segment_ == expected_segment
        assert sorted(estimator.checkpoints_) == list(range(0, n_steps, expected_segment))
        results[segment] = estimator.score(targets).scores
    for segment, scores in results.items():
        np.testing.assert_allclose(scores, results[1], rtol=1e-12, atol=1e-14, err_msg=f"{segment}")


def test_target_chunks_and_model_objects_agree(data):
    train, targets = data
    whole = fitted("sgd", train).score(targets).scores
    chunked = Metagradients(
        make_model(), Classification(), epochs=EPOCHS, batch_size=BATCH, seed=3, target_batch=1,
        **RECIPES["sgd"],
    ).fit(train)  # fmt: skip
    np.testing.assert_allclose(chunked.score(targets).scores, whole, rtol=1e-12, atol=1e-14)


def test_plain_sgd_with_a_linear_schedule_matches_finite_differences(data):
    train, targets = data
    estimator = Metagradients(
        make_model, Classification(), optimizer="sgd", momentum=0.0, lr=0.3, schedule="linear",
        epochs=EPOCHS, batch_size=BATCH, seed=3,
    ).fit(train)  # fmt: skip
    scores = estimator.score(targets).scores
    run = estimator.run_
    i, step = 5, 1e-5
    outputs = []
    for sign in (1, -1):
        weights = torch.ones(N_TRAIN, dtype=torch.float64)
        weights[i] += sign * step
        params = run.run(weights)[0].params
        outputs.append(run.call(Classification().output, params, targets))
    np.testing.assert_allclose(scores[:, i], (outputs[0] - outputs[1]) / (2 * step), rtol=1e-6)


def test_trained_model_and_subset_retraining(data):
    train, targets = data
    estimator = fitted("adam", train)
    outputs = estimator.target_outputs(targets)
    again = train_subset(make_model(), train, estimator.recipe(), np.ones(N_TRAIN, bool))
    with torch.no_grad():
        direct = Classification().output(again, targets).numpy()
    np.testing.assert_allclose(outputs, direct, rtol=1e-12)
    # dropping by indices or by mask is the same run: zero weights in the full run's batches
    kept = np.delete(np.arange(N_TRAIN), [2, 11])
    by_index = train_subset(make_model(), train, estimator.recipe(), kept)
    weights = torch.ones(N_TRAIN, dtype=torch.float64)
    weights[[2, 11]] = 0
    params = estimator.run_.run(weights)[0].params
    for ours, theirs in zip(by_index.parameters(), params):
        torch.testing.assert_close(ours.detach(), theirs, rtol=0, atol=0)


def test_clear_errors(data):
    train, targets = data
    with pytest.raises(NotFittedError, match="call fit"):
        Metagradients(make_model(), Classification()).score(targets)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        Metagradients(make_model(), Classification(), optimizer="lion").fit(train)
    with pytest.raises(ValueError, match="segment must be at least 1"):
        Metagradients(make_model(), Classification(), segment=0).fit(train)
    with pytest.raises(TypeError, match=r"nn\.Module or a factory"):
        Metagradients(3, Classification()).fit(train)
    with pytest.raises(ValueError, match="one value per training example"):
        DeterministicRun(make_model(), train, recipe("sgd")).run(torch.ones(3))


def test_adam_through_parameters_whose_gradient_is_always_zero(data):
    """An input feature that is 0 in every training example leaves the weights reading it with
    a zero gradient and a zero second moment, where ``√v`` has no derivative; the backward pass
    must stay finite (and right) there."""
    (X, y), targets = data
    X = X.clone()
    X[:, 0] = 0
    estimator = Metagradients(
        make_model, Classification(), optimizer="adam", lr=0.05, weight_decay=0.0,
        epochs=EPOCHS, batch_size=BATCH, seed=3,
    ).fit((X, y))  # fmt: skip
    scores = estimator.score(targets).scores
    assert np.isfinite(scores).all()
    run, i, step = estimator.run_, 4, 1e-5
    outputs = []
    for sign in (1, -1):
        weights = torch.ones(N_TRAIN, dtype=torch.float64)
        weights[i] += sign * step
        outputs.append(run.call(Classification().output, run.run(weights)[0].params, targets))
    np.testing.assert_allclose(scores[:, i], (outputs[0] - outputs[1]) / (2 * step), rtol=1e-6)
