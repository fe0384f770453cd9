"""Per-example gradients against a loop of torch.autograd.grad."""

import pytest
import torch
from torch import nn

from conftest import SmallCNN, make_mlp, train
from datatrace.grads import PerExampleGradients, select_parameters
from datatrace.tasks import Classification


def loop_gradients(model, task, names, X, y):
    """Reference: one autograd.grad call per example, on the model itself."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(X)):
        out = task.output(model, (X[i : i + 1], y[i : i + 1])).sum()
        grads = torch.autograd.grad(out, [params[n] for n in names])
        rows.append(dict(zip(names, grads)))
    return {n: torch.stack([row[n] for row in rows]) for n in names}


@pytest.mark.parametrize("make_model", [make_mlp, SmallCNN], ids=["mlp", "cnn"])
@pytest.mark.parametrize("selection", [None, "*head*", "0.*"], ids=["all", "head", "first"])
def test_matches_autograd_loop(digits, make_model, selection):
    X, y = digits
    model = train(make_model(), X[:200], y[:200], steps=20)
    if selection == "0.*" and not isinstance(model, nn.Sequential):
        selection = "conv.*"
    if selection == "*head*" and isinstance(model, nn.Sequential):
        selection = "2.*"
    task = Classification()
    names = select_parameters(model, selection)
    state = model.state_dict()
    batch = (X[:12], y[:12])
    got = PerExampleGradients(model, task, names).gradients(state, batch)
    model.eval()
    want = loop_gradients(model, task, names, *batch)
    assert set(got) == set(names)
    for name in names:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def test_outputs_and_out_to_loss(digits):
    X, y = digits
    model = train(make_mlp(), X[:200], y[:200], steps=50)
    task = Classification()
    grads = PerExampleGradients(model, task, select_parameters(model))
    out = grads.outputs(model.state_dict(), (X[:50], y[:50]))
    logits = model(X[:50]).double()
    p = torch.softmax(logits, 1)
    p_true = p[torch.arange(50), y[:50]]
    torch.testing.assert_close(out.double(), torch.log(p_true / (1 - p_true)), rtol=1e-4, atol=1e-4)
    q = grads.out_to_loss(model.state_dict(), (X[:50], y[:50]))
    torch.testing.assert_close(q.double(), 1 - p_true, rtol=1e-3, atol=1e-7)


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("backward went through a layer that is not selected")

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    generate_vmap_rule = True


class _Guarded(nn.Module):
    """First layer whose output must never be differentiated when only the head is selected."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(64, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(_RaiseInBackward.apply(torch.tanh(self.body(x))))


def test_unselected_parameters_are_not_differentiated(digits):
    """Selecting the head must stop autograd at the head: the guard raises if it is crossed."""
    X, y = digits
    model = _Guarded()
    task = Classification()
    state = model.state_dict()
    head_only = PerExampleGradients(model, task, select_parameters(model, "head.*"))
    grads = head_only.gradients(state, (X[:4], y[:4]))
    assert set(grads) == {"head.weight", "head.bias"}
    everything = PerExampleGradients(model, task, select_parameters(model))
    with pytest.raises(AssertionError, match="not selected"):
        everything.gradients(state, (X[:4], y[:4]))


def test_model_mode_is_restored(digits):
    X, y = digits
    model = SmallCNN().train()
    grads = PerExampleGradients(model, Classification(), select_parameters(model))
    grads.gradients(model.state_dict(), (X[:3], y[:3]))
    assert model.training and model.norm.training


def test_selection_errors():
    model = make_mlp()
    with pytest.raises(ValueError, match="matches no parameter"):
        select_parameters(model, "nope.*")
    with pytest.raises(ValueError, match="no parameter of the model"):
        select_parameters(model, nn.Linear(2, 2))
    assert select_parameters(model, [model[2], "0.bias"]) == ["0.bias", "2.weight", "2.bias"]
