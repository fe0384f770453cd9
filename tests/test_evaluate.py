"""LDS against a plain per-target loop of scipy's Spearman correlation."""

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.stats import rankdata, spearmanr

from datatrace import Attributions
from datatrace.evaluation.lds import LDSResult, average_ranks, lds, predict_outputs


def spearman_loop(predictions, outputs):
    """Reference: scipy's Spearman correlation, one target at a time (NaN where undefined)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant input and returns NaN
        return np.array(
            [spearmanr(predictions[:, j], outputs[:, j])[0] for j in range(outputs.shape[1])]
        )


def tied_problem(seed=0, n_subsets=40, n_train=12, n_targets=30):
    """Integer scores and rounded outputs, so that predictions and outputs have many ties; one
    target with constant outputs and one with all-zero scores (constant predictions)."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n_subsets, n_train)) < 0.5
    scores = rng.integers(-2, 3, (n_targets, n_train)).astype(float)
    outputs = np.round(masks @ scores.T + rng.standard_normal((n_subsets, n_targets)))
    outputs[:, 3] = 7.0
    scores[5] = 0.0
    return masks, scores, outputs


def test_lds_equals_a_spearmanr_loop_with_ties_and_constant_columns():
    masks, scores, outputs = tied_problem()
    result = lds(scores, masks, outputs)
    reference = spearman_loop(masks @ scores.T, outputs)
    # constant predictions of varying outputs predict nothing: 0, counted; constant outputs:
    # undefined, left out
    reference[5] = 0.0
    assert np.isnan(result.per_target[3]) and result.per_target[5] == 0.0
    assert result.n_undefined == 1
    np.testing.assert_allclose(result.per_target, reference, atol=1e-12, equal_nan=True)
    assert result.mean == pytest.approx(np.nanmean(reference), abs=1e-12)
    assert result.n_subsets == 40
    assert "29 targets, 40 subsets" in str(result)
    # giving up on a target cannot raise the mean: zeroing target 0's scores lowers it
    worse = scores.copy()
    worse[0] = 0.0
    assert lds(worse, masks, outputs).mean < result.mean


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.int8, st.tuples(st.integers(1, 12), st.integers(1, 5)), elements=st.integers(-3, 3))
)
def test_average_ranks_equal_scipy_rankdata(values):
    np.testing.assert_array_equal(
        average_ranks(values.astype(float)), rankdata(values, method="average", axis=0)
    )


def test_accepts_attributions_tensors_and_results_and_averages_seeds():
    masks, scores, outputs = tied_problem(seed=1)
    rng = np.random.default_rng(0)
    per_seed = outputs[:, None, :] + rng.standard_normal((40, 3, 30))
    want = lds(scores, masks, per_seed.mean(1))
    for got in (
        lds(Attributions(scores, "x"), masks, per_seed),
        lds(torch.as_tensor(scores), masks.astype(np.uint8), per_seed),
        lds(scores, SimpleNamespace(masks=masks, outputs=per_seed)),
    ):
        np.testing.assert_allclose(got.per_target, want.per_target, equal_nan=True)
        assert got.ci == want.ci


def test_exactly_linear_outputs_score_one():
    rng = np.random.default_rng(2)
    masks = rng.random((50, 20)) < 0.5
    scores = rng.standard_normal((6, 20))
    result = lds(scores, masks, masks @ scores.T + 3.0)
    np.testing.assert_allclose(result.per_target, 1.0)
    assert result.ci == (1.0, 1.0)
    assert lds(-scores, masks, masks @ scores.T).mean == pytest.approx(-1.0)


def noisy_targets(n_targets, seed=3):
    rng = np.random.default_rng(seed)
    masks = rng.random((60, 15)) < 0.5
    scores = rng.standard_normal((n_targets, 15))
    outputs = masks @ scores.T + 2.0 * rng.standard_normal((60, n_targets))
    return scores, masks, outputs


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_more_targets():
    few = lds(*noisy_targets(20))
    many = lds(*noisy_targets(800))
    for result in (few, many):
        low, high = result.ci
        assert low < result.mean < high
    width_few, width_many = np.diff(few.ci)[0], np.diff(many.ci)[0]
    # the standard error of a mean falls as 1/√n_targets: 40× the targets, ~6× narrower
    assert width_many < width_few / 3
    assert lds(*noisy_targets(20), seed=0).ci == few.ci
    assert lds(*noisy_targets(20), bootstrap=0).ci == (few.mean, few.mean)
    narrower = lds(*noisy_targets(20), confidence=0.5).ci
    assert few.ci[0] < narrower[0] < narrower[1] < few.ci[1]


def test_predict_outputs_adds_the_bias_of_datamodels():
    rng = np.random.default_rng(4)
    masks = rng.random((10, 8)) < 0.5
    scores = rng.standard_normal((3, 8))
    bias = [1.0, -2.0, 0.5]
    np.testing.assert_allclose(predict_outputs(scores, masks), masks @ scores.T)
    with_bias = Attributions(scores, "datamodels", info={"bias": bias})
    np.testing.assert_allclose(predict_outputs(with_bias, masks), masks @ scores.T + bias)


def test_input_errors():
    masks, scores, outputs = tied_problem()
    with pytest.raises(ValueError, match="12 training examples but the masks 11"):
        lds(scores, masks[:, :11], outputs)
    with pytest.raises(ValueError, match="30 targets but the outputs 29"):
        lds(scores, masks, outputs[:, :29])
    with pytest.raises(ValueError, match="n_subsets=40"):
        lds(scores, masks, outputs[:39])
    with pytest.raises(ValueError, match="0/1"):
        lds(scores, masks * 0.5, outputs)
    with pytest.raises(ValueError, match="at least 3 subsets"):
        lds(scores, masks[:2], outputs[:2])
    with pytest.raises(ValueError, match="not finite"):
        lds(scores, masks, np.where(outputs > 100, 0, np.nan))
    with pytest.raises(ValueError, match="n_targets, n_train"):
        lds(scores[0], masks, outputs)
    with pytest.raises(ValueError, match="confidence"):
        lds(scores, masks, outputs, confidence=95)
    for draws in (-1, 2.5, True):
        with pytest.raises(ValueError, match="bootstrap must be a non-negative integer"):
            lds(scores, masks, outputs, bootstrap=draws)
    # NaN scores used to rank as values and give a plausible LDS; they name their targets
    broken = np.array(scores, dtype=np.float64)
    broken[[3, 7], 0] = [np.nan, np.inf]
    with pytest.raises(
        ValueError, match=r"2 target\(s\) hold NaN or infinite values \(rows \[3, 7\]\)"
    ):
        lds(broken, masks, outputs)
    with pytest.raises(ValueError, match="NaN or infinite"):
        predict_outputs(broken, masks)
    with pytest.raises(TypeError, match="must be numbers"):
        lds(np.full(broken.shape, "x"), masks, outputs)
    assert isinstance(lds(scores, masks, outputs), LDSResult)


def test_outputs_constant_for_every_target_warn_and_give_nan():
    rng = np.random.default_rng(0)
    masks = rng.random((12, 8)) < 0.5
    outputs = np.tile(rng.normal(size=(1, 3)), (12, 1))  # one model's outputs, repeated
    with pytest.warns(RuntimeWarning, match="same on all 12 subsets"):
        result = lds(rng.normal(size=(3, 8)), masks, outputs, bootstrap=0)
    assert np.isnan(result.mean) and result.n_undefined == 3
