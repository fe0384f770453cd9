import numpy as np
import pytest
import torch
from scipy.stats import entropy, norm
from torch import nn

from datatrace import Attributions
from datatrace.applications.unlearning import (
    KLOM_FLOOR,
    GradientAscentSettings,
    MatchingSettings,
    RetainFinetuneSettings,
    centre_logits,
    datamodel_matching,
    datamodel_predictions,
    gradient_ascent,
    klom,
    klom_summary,
    match_logits,
    model_logits,
    oracle_matching,
    per_class_scores,
    retain_finetune,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# -- KLoM -------------------------------------------------------------------------------------


def reference_klom(unlearned, oracle, bins=20, clip=100.0, floor=1e-5):
    """KLoM point by point with np.histogram (whose last bin is closed) and scipy's entropy."""
    values = []
    for u, o in zip(np.clip(unlearned, -clip, clip).T, np.clip(oracle, -clip, clip).T):
        low, high = min(u.min(), o.min()), max(u.max(), o.max())
        if low == high:
            values.append(0.0)
            continue
        edges = np.linspace(low, high, bins + 1)
        p = np.histogram(u, edges)[0] / len(u)
        q = np.histogram(o, edges)[0] / len(o)
        support = p > 0
        # entropy(p, q) normalises q; keep the floored q unnormalised, as KLoM does
        values.append(
            float(np.sum(p[support] * np.log(p[support] / np.maximum(q[support], floor))))
        )
    return np.array(values)


def test_klom_of_identical_samples_is_zero_and_of_same_distribution_small():
    rng = np.random.default_rng(0)
    margins = rng.normal(3.0, 2.0, size=(100, 50))
    np.testing.assert_array_equal(klom(margins, margins), 0.0)
    big_a = rng.normal(3.0, 2.0, size=(20000, 5))
    big_b = rng.normal(3.0, 2.0, size=(20000, 5))
    # sampling noise only: about (occupied bins - 1) / (2 n) per sample set
    assert klom(big_a, big_b).max() < 2e-3


@pytest.mark.parametrize("bins", [0, 2.5, True])
def test_klom_bins_that_are_not_a_positive_integer_are_named(bins):
    margins = np.random.default_rng(0).standard_normal((4, 3))
    with pytest.raises(ValueError, match=f"bins must be a positive integer, got {bins!r}"):
        klom(margins, margins, bins=bins)


def test_klom_margins_that_are_not_numbers_are_named():
    margins = np.random.default_rng(0).standard_normal((4, 2))
    with pytest.raises(ValueError, match="unlearned_margins must be numbers"):
        klom(np.array([["a", "b"]] * 4), margins)


def test_klom_of_shifted_gaussians_matches_histogram_and_analytic_values():
    rng = np.random.default_rng(1)
    shifts = np.array([0.25, 0.5, 1.0, 2.0])
    n = 200_000
    oracle = rng.normal(0.0, 1.0, size=(n, len(shifts)))
    unlearned = rng.normal(0.0, 1.0, size=(n, len(shifts))) + shifts
    values = klom(unlearned, oracle)
    np.testing.assert_allclose(values, reference_klom(unlearned, oracle), rtol=1e-10, atol=1e-12)
    # the binned KL of N(δ, 1) against N(0, 1) from their CDFs over the same bins (no sampling)
    for column, shift in enumerate(shifts):
        low = min(unlearned[:, column].min(), oracle[:, column].min())
        high = max(unlearned[:, column].max(), oracle[:, column].max())
        edges = np.linspace(low, high, 21)
        p = np.diff(norm.cdf(edges, loc=shift))
        q = np.diff(norm.cdf(edges))
        assert values[column] == pytest.approx(entropy(p, q), rel=0.05, abs=2e-3)
        # and the continuous KL δ²/2, which 20 bins approach from below
        assert shift**2 / 2 * 0.85 < values[column] < shift**2 / 2 * 1.02


def test_klom_direction_is_unlearned_against_oracle():
    rng = np.random.default_rng(2)
    narrow = rng.normal(0.0, 0.3, size=(5000, 3))
    wide = rng.normal(0.0, 3.0, size=(5000, 3))
    forward = klom(narrow, wide)  # KL(narrow ‖ wide): moderate
    backward = klom(wide, narrow)  # KL(wide ‖ narrow): wide puts mass where narrow has none
    np.testing.assert_allclose(forward, reference_klom(narrow, wide), rtol=1e-10)
    np.testing.assert_allclose(backward, reference_klom(wide, narrow), rtol=1e-10)
    assert (backward > 2 * forward).all()


def test_klom_counts_values_on_the_top_edge_and_floors_empty_bins():
    unlearned = np.ones((10, 1))  # every value on the top edge of the range [0, 1]
    oracle = np.zeros((10, 1))
    # p is all in the last bin (the reference's np.digitize would drop it and report 0), q has
    # nothing there: p log(p / floor)
    assert klom(unlearned, oracle)[0] == pytest.approx(np.log(1 / KLOM_FLOOR))
    assert klom(unlearned, oracle, floor=1e-3)[0] == pytest.approx(np.log(1e3))
    mixed = np.array([[0.0], [1.0], [1.0], [0.5]])
    np.testing.assert_allclose(klom(mixed, oracle[:4]), reference_klom(mixed, oracle[:4]))


def test_klom_clips_margins_and_checks_shapes():
    huge = np.full((4, 2), 1e6)
    assert klom(huge, np.full((6, 2), 200.0)).tolist() == [0.0, 0.0]  # both clip to 100
    assert klom(huge, np.full((6, 2), 200.0), clip=300.0)[0] > 10
    with pytest.raises(ValueError, match="same points"):
        klom(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        klom(np.full((3, 4), np.nan), np.zeros((3, 4)))
    summary = klom_summary(np.arange(101.0))
    assert summary == {"median": 50.0, "p95": 95.0, "mean": 50.0}


# -- per-class attributions and predictions ---------------------------------------------------


def test_per_class_scores_reads_point_major_rows():
    rng = np.random.default_rng(3)
    beta = rng.normal(size=(6, 4, 9))
    flat = np.stack([beta[p, c] for p in range(6) for c in range(4)])
    np.testing.assert_array_equal(per_class_scores(Attributions(flat), 4), beta)
    np.testing.assert_array_equal(per_class_scores(beta, 4), beta)
    with pytest.raises(ValueError, match="n_points"):
        per_class_scores(flat, 5)
    with pytest.raises(ValueError, match="classes"):
        per_class_scores(beta, 3)


def make_data(n=60, n_classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 5, generator=generator)
    labels = torch.randint(0, n_classes, (n,), generator=generator)
    return inputs, labels


def make_net(seed=0, n_classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, n_classes))


def fit(net, inputs, labels, steps=200):
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(inputs), labels).backward()
        optimizer.step()
    return net.eval()


def test_datamodel_predictions_subtract_the_forget_sets_attributions():
    inputs, labels = make_data()
    net = make_net()
    rng = np.random.default_rng(4)
    points = np.array([3, 7, 10, 20])
    beta = rng.normal(size=(4, 3, 60))
    forget = np.array([7, 20, 33])
    predicted = datamodel_predictions(net, forget, (inputs, labels), beta, points=points)
    with torch.no_grad():
        expected = net(inputs[points]).numpy() - beta[:, :, forget].sum(axis=2)
    np.testing.assert_allclose(predicted.numpy(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        datamodel_predictions(net, forget, (inputs, labels), beta[:3], points=points)


def test_datamodel_predictions_read_a_fitted_datamodels_joint_contribution():
    """Given fitted Datamodels (of the points' flattened per-class outputs), the subtracted
    effect is their contribution() of the forget set, point-major."""
    from datatrace import Datamodels

    inputs, labels = make_data()
    net = make_net()
    rng = np.random.default_rng(5)
    points = np.array([3, 7, 10, 20])
    masks = rng.random((80, 60)) < 0.5
    outputs = masks[:, :12] @ rng.normal(size=(12, 12)) + rng.normal(size=(80, 12))
    datamodels = Datamodels(progress=False).fit(masks, outputs)
    forget = np.array([1, 2, 33])
    predicted = datamodel_predictions(net, forget, (inputs, labels), datamodels, points=points)
    with torch.no_grad():
        logits = net(inputs[points]).numpy()
    expected = logits - datamodels.contribution(forget).reshape(4, 3)
    np.testing.assert_allclose(predicted.numpy(), expected, rtol=1e-5, atol=1e-5)
    wrong = Datamodels(progress=False).fit(masks, outputs[:, :10])
    with pytest.raises(ValueError, match="10 outputs"):
        datamodel_predictions(net, forget, (inputs, labels), wrong, points=points)


def state(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def test_matching_moves_logits_towards_targets_deterministically():
    inputs, labels = make_data()
    original = fit(make_net(0), inputs, labels)
    before = state(original).clone()
    other = fit(make_net(1), inputs[:40], labels[:40])  # trained without examples 40..59
    forget = np.arange(40, 50)
    targets = model_logits(other, inputs)
    settings = MatchingSettings(epochs=15, lr=2e-2, batch_size=16)
    tuned = match_logits(original, forget, (inputs, labels), targets, settings=settings, seed=5)
    again = match_logits(original, forget, (inputs, labels), targets, settings=settings, seed=5)
    different = match_logits(original, forget, (inputs, labels), targets, settings=settings, seed=6)
    torch.testing.assert_close(state(tuned), state(again), rtol=0, atol=0)
    assert not torch.equal(state(tuned), state(different))
    torch.testing.assert_close(state(original), before, rtol=0, atol=0)  # left untouched
    rows = torch.as_tensor(forget)

    def error(net):
        return (
            (centre_logits(model_logits(net, inputs[rows])) - centre_logits(targets[rows]))
            .pow(2)
            .mean()
        )

    assert error(tuned) < 0.5 * error(original)
    same = oracle_matching(original, forget, (inputs, labels), targets, settings=settings, seed=5)
    torch.testing.assert_close(state(same), state(tuned), rtol=0, atol=0)


def test_datamodel_matching_with_exact_attributions_is_oracle_matching():
    # Attributions whose forget-set sum is exactly f(θ) − oracle logits make f̂ the oracle
    # logits, so DMM and oracle matching must produce the same model.
    inputs, labels = make_data()
    original = fit(make_net(0), inputs, labels)
    oracle = model_logits(fit(make_net(2), inputs[:50], labels[:50]), inputs)
    forget = np.arange(50, 60)
    beta = np.zeros((60, 3, 60), dtype=np.float64)
    beta[:, :, 50] = (model_logits(original, inputs) - oracle).double().numpy()
    flat = Attributions(beta.reshape(180, 60))
    settings = MatchingSettings(epochs=3)
    dmm = datamodel_matching(original, forget, (inputs, labels), flat, settings=settings, seed=1)
    om = oracle_matching(original, forget, (inputs, labels), oracle, settings=settings, seed=1)
    torch.testing.assert_close(state(dmm), state(om), rtol=1e-5, atol=1e-6)


def test_matching_needs_targets_for_the_forget_set():
    inputs, labels = make_data()
    with pytest.raises(ValueError, match="include every forget example"):
        match_logits(make_net(), [1, 2], (inputs, labels), torch.zeros(3, 3), points=[2, 3, 4])
    with pytest.raises(ValueError, match="n_points"):
        match_logits(make_net(), [1, 2], (inputs, labels), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="pair"):
        match_logits(make_net(), [1, 2], inputs, torch.zeros(60, 3))
    with pytest.raises(ValueError, match="repeated"):
        gradient_ascent(make_net(), [1, 1], (inputs, labels))
    with pytest.raises(ValueError, match="non-negative"):
        match_logits(
            make_net(), [1], (inputs, labels), torch.zeros(60, 3), settings=MatchingSettings(lr=-1)
        )


def test_baselines_raise_the_forget_loss_or_train_on_the_rest():
    inputs, labels = make_data()
    original = fit(make_net(0), inputs, labels)
    forget = np.arange(10)
    rows = torch.as_tensor(forget)

    def loss(net, index):
        with torch.no_grad():
            return nn.functional.cross_entropy(net(inputs[index]), labels[index]).item()

    # a confidently fit forget set has tiny gradients: ascent is slow, then runs away
    ascended = gradient_ascent(
        original, forget, (inputs, labels), settings=GradientAscentSettings(epochs=30, lr=1.0)
    )
    assert loss(ascended, rows) > 1.0 > 100 * loss(original, rows)
    retain = torch.arange(10, 60)
    scratch = make_net(3)
    tuned = retain_finetune(
        scratch,
        forget,
        (inputs, labels),
        settings=RetainFinetuneSettings(epochs=50, lr=0.05, batch_size=16),
    )
    assert loss(tuned, retain) < 0.7 * loss(scratch, retain)
    repeat = retain_finetune(
        scratch,
        forget,
        (inputs, labels),
        settings=RetainFinetuneSettings(epochs=50, lr=0.05, batch_size=16),
    )
    torch.testing.assert_close(state(tuned), state(repeat), rtol=0, atol=0)


@pytest.mark.parametrize(
    "settings", [MatchingSettings, GradientAscentSettings, RetainFinetuneSettings]
)
def test_every_setting_has_help(settings):
    from dataclasses import fields

    for item in fields(settings):
        assert settings.help(item.name)
