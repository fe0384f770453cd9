"""The Regression task: TRAK on a linear model against exact leave-one-out refits, and its
checks of bad batches."""

import re

import numpy as np
import pytest
import torch
from torch import nn

import datatrace as dt


def linear_problem(n=40, d=4, m=6, seed=0):
    gen = np.random.default_rng(seed)
    X = gen.normal(size=(n + m, d))
    y = X @ gen.normal(size=d) + 0.5 + gen.normal(scale=0.7, size=n + m)
    return X[:n], y[:n], X[n:], y[n:]


def least_squares(X, y):
    design = np.c_[X, np.ones(len(X))]
    return np.linalg.lstsq(design, y, rcond=None)[0]


def fitted_linear(X, y) -> nn.Module:
    coef = least_squares(X, y)
    model = nn.Linear(X.shape[1], 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(coef[:-1])[None])
        model.bias.fill_(coef[-1])
    return model


def test_linear_regression_scores_are_leave_one_out_differences_times_one_minus_leverage():
    """TRAK with Q = y − ŷ and no damping on a least-squares fit: score[t, i] / (1 − h_i) is
    ŷ(x_t) − ŷ_{−i}(x_t), the prediction's change when example i is left out of the fit."""
    X, y, X_test, _ = linear_problem()
    model = fitted_linear(X, y)
    trak = dt.TRAK(
        model, dt.Regression(), projector="identity", damping_absolute=0.0, progress=False
    )
    trak.fit((torch.from_numpy(X), torch.from_numpy(y)))
    scores = trak.score((torch.from_numpy(X_test), torch.zeros(len(X_test), dtype=torch.float64)))
    design, test_design = np.c_[X, np.ones(len(X))], np.c_[X_test, np.ones(len(X_test))]
    leverage = np.einsum("ij,jk,ik->i", design, np.linalg.inv(design.T @ design), design)
    full = test_design @ least_squares(X, y)
    want = np.empty((len(X_test), len(X)))
    for i in range(len(X)):
        keep = np.arange(len(X)) != i
        want[:, i] = full - test_design @ least_squares(X[keep], y[keep])
    got = scores.scores / (1 - leverage)[None, :]
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
    residuals = y - design @ least_squares(X, y)
    np.testing.assert_allclose(trak.out_to_loss_[0], residuals, rtol=1e-5, atol=1e-6)
    # The default projection takes Q from the featurizing forward pass (output_and_out_to_loss).
    hooked = dt.TRAK(model, dt.Regression(), damping_absolute=0.0, progress=False)
    hooked.fit((torch.from_numpy(X), torch.from_numpy(y)))
    np.testing.assert_allclose(hooked.out_to_loss_[0], residuals, rtol=1e-5, atol=1e-6)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 8)
        self.heads = nn.Linear(8, 2)

    def forward(self, x):
        return self.heads(torch.tanh(self.body(x)))


class OneHead(nn.Module):
    """TwoHeads' output 1 alone, with the same parameters."""

    def __init__(self, two: TwoHeads):
        super().__init__()
        self.two = two

    def forward(self, x):
        return self.two(x)[:, 1]


def test_output_selects_one_of_several_predictions():
    torch.manual_seed(0)
    two = TwoHeads()
    X, Y = torch.randn(30, 5), torch.randn(30, 2)
    settings = {"projector": "identity", "damping_absolute": 1e-3, "progress": False}
    both = dt.TRAK(two, dt.Regression(output=1), **settings).fit((X, Y))
    one = dt.TRAK(OneHead(two), dt.Regression(), **settings).fit((X, Y[:, 1]))
    np.testing.assert_allclose(both.out_to_loss_, one.out_to_loss_, rtol=1e-6)
    targets = (X[:5], Y[:5, 1])
    np.testing.assert_allclose(
        both.score(targets).scores, one.score(targets).scores, rtol=1e-5, atol=1e-7
    )


X4 = torch.randn(4, 5)
BAD_BATCHES = {
    "several-outputs": (None, (X4, torch.randn(4, 2)), ValueError, "output=j"),
    "output-range": (2, (X4, torch.randn(4)), ValueError, "0 <= output < 2"),
    "length": (0, (X4, torch.randn(3)), ValueError, "for 4 examples"),
    "columns": (0, (X4, torch.randn(4, 3)), ValueError, "3 columns"),
    "nan": (0, (X4, torch.tensor([0.0, 1, float("nan"), 2])), ValueError, "infinite at row 2"),
    "dict": (0, {"x": X4}, TypeError, "(inputs, targets)"),
    "bool": (0, (X4, torch.ones(4, dtype=torch.bool)), TypeError, "real numbers"),
    "shape": (0, (torch.randn(4, 3), torch.randn(4)), ValueError, "model failed"),
}


@pytest.mark.parametrize("case", BAD_BATCHES)
def test_bad_batches_are_refused_with_the_fix(case):
    output, batch, error, message = BAD_BATCHES[case]
    torch.manual_seed(0)
    with pytest.raises(error, match=re.escape(message)):
        dt.Regression(output=output).check_batch(TwoHeads(), batch)


def test_integer_targets_become_the_models_dtype_and_bad_settings_are_refused():
    model = nn.Linear(3, 1)
    _, targets = dt.Regression().check_batch(model, (torch.randn(4, 3), torch.arange(4)))
    assert targets.dtype == torch.float32 and targets.tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(TypeError, match="integer index"):
        dt.Regression(output=1.0)
    with pytest.raises(ValueError, match="non-negative"):
        dt.Regression(output=-1)
    assert dt.Regression(output=1).config() == {"name": "Regression", "output": 1}


class InADict(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return {"logits": self.model(x)}


def test_predictions_in_a_logits_field_score_as_the_plain_model():
    X, y, X_test, y_test = (torch.from_numpy(a) for a in linear_problem())
    model = fitted_linear(X.numpy(), y.numpy())
    settings = {"projector": "identity", "damping_absolute": 1e-3, "progress": False}
    plain = dt.TRAK(model, dt.Regression(), **settings).fit((X, y)).score((X_test, y_test))
    wrapped = dt.TRAK(InADict(model), dt.Regression(), **settings).fit((X, y))
    np.testing.assert_array_equal(wrapped.score((X_test, y_test)).scores, plain.scores)
