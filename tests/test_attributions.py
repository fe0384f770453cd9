"""Attributions helpers against direct numpy computations."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from datatrace import Attributions

matrices = arrays(
    np.float64,
    st.tuples(st.integers(1, 6), st.integers(1, 30)),
    elements=st.floats(-1e3, 1e3),
    unique=True,
)


@given(matrices, st.integers(1, 40))
@settings(max_examples=60, deadline=None)
def test_top_and_rankings(scores, k):
    attributions = Attributions(scores)
    top = attributions.top(k)
    expected = np.argsort(-scores, axis=1)[:, : min(k, scores.shape[1])]
    np.testing.assert_array_equal(top.indices, expected)
    np.testing.assert_array_equal(top.scores, np.take_along_axis(scores, expected, 1))
    for j in range(scores.shape[0]):
        np.testing.assert_array_equal(attributions.proponents(j, k).indices, expected[j])
        opponents = attributions.opponents(j, k)
        np.testing.assert_array_equal(
            opponents.indices, np.argsort(scores[j])[: min(k, scores.shape[1])]
        )
        assert np.all(np.diff(opponents.scores) >= 0)


def test_sparsify_soft_thresholds_each_row():
    scores = np.array([[4.0, -3.0, 2.0, -1.0], [0.5, 0.25, -0.125, 1.0]])
    sparse = Attributions(scores).sparsify(keep=0.5)
    # row thresholds: the median of |row|: 2.5 and 0.375
    np.testing.assert_allclose(sparse.scores, [[1.5, -0.5, 0, 0], [0.125, 0, 0, 0.625]])


def test_validation():
    with pytest.raises(ValueError, match="n_targets, n_train"):
        Attributions(np.zeros(3))
    with pytest.raises(ValueError, match="one value per training example"):
        Attributions(np.zeros((2, 3)), out_to_loss=np.ones(4))
    with pytest.raises(IndexError):
        Attributions(np.zeros((2, 3))).proponents(2)
    with pytest.raises(ValueError, match="k must be"):
        Attributions(np.zeros((2, 3))).top(0)
