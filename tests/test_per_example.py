"""Per-example gradients against a loop of torch.autograd.grad."""

import warnings

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


class Recurrent(nn.Module):
    """A recurrent classifier on ``(n, 5, 3)`` sequences: its last hidden state, then a head."""

    def __init__(self, core):
        super().__init__()
        self.core = core
        self.head = nn.Linear(core.hidden_size * (2 if core.bidirectional else 1), 4)

    def forward(self, x):
        out, _ = self.core(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize(
    "core, dtype",
    [
        (lambda: nn.GRU(3, 6, num_layers=2, batch_first=True), torch.float32),
        (lambda: nn.RNN(3, 6, batch_first=True, bidirectional=True), torch.float32),
        (lambda: nn.LSTM(3, 6, batch_first=True), torch.float64),
    ],
    ids=["gru-2-layers", "rnn-bidirectional", "lstm-float64"],
)
def test_modules_vmap_cannot_batch_fall_back_to_one_example_at_a_time(core, dtype):
    """vmap has no batching rule for these (an in-place write into the unbatched initial state):
    one warning, then the same gradients as an autograd loop, and no second attempt at vmap."""
    from datatrace.grads.per_example import VmapFallbackWarning

    torch.manual_seed(0)
    model = Recurrent(core()).to(dtype).eval()
    X = torch.randn(7, 5, 3, dtype=dtype)
    y = torch.randint(0, 4, (7,))
    task = Classification()
    names = select_parameters(model)
    with pytest.warns(VmapFallbackWarning, match="one example at a time"):
        got = PerExampleGradients(model, task, names).gradients(model.state_dict(), (X, y))
    want = loop_gradients(model, task, names, X, y)
    for name in names:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
    again = PerExampleGradients(model, task, names)
    assert again.one_at_a_time
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = again.gradients(model.state_dict(), (X[:3], y[:3]))
    torch.testing.assert_close(second[names[0]], want[names[0]][:3], rtol=1e-5, atol=1e-7)


def test_an_error_of_the_model_itself_is_raised_not_hidden_by_the_fallback():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 4)

        def forward(self, x):
            return self.linear(x) @ torch.ones(5, 2)  # (n, 4) @ (5, 2): a shape error

    model = Broken()
    grads = PerExampleGradients(model, Classification(), select_parameters(model))
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        grads.gradients(model.state_dict(), (torch.randn(4, 3), torch.zeros(4, dtype=torch.long)))
    assert not grads.one_at_a_time


def test_trak_attributes_a_gru_classifier():
    import datatrace as dt
    from datatrace.grads.per_example import VmapFallbackWarning

    torch.manual_seed(0)
    model = Recurrent(nn.GRU(3, 6, num_layers=2, batch_first=True)).eval()
    X, y = torch.randn(30, 5, 3), torch.randint(0, 4, (30,))
    with pytest.warns(VmapFallbackWarning):
        trak = dt.TRAK(model, Classification(), proj_dim=32, progress=False).fit((X[:24], y[:24]))
        scores = trak.score((X[24:], y[24:])).scores
    assert scores.shape == (6, 24) and torch.isfinite(torch.as_tensor(scores)).all()


class _Square(torch.autograd.Function):
    """An old-style autograd.Function (forward takes ctx, no setup_context): torch.func's
    transforms refuse it, plain autograd runs it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class OldStyleFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 5)
        self.head = nn.Linear(5, 4)
        self.unused = nn.Linear(2, 2)  # the output never reaches it: zero gradients

    def forward(self, x):
        return self.head(_Square.apply(self.inner(x)))


class RenormedEmbedding(nn.Module):
    """``nn.Embedding(max_norm=...)`` renormalises its rows in place in the forward pass, which
    torch.func refuses (a mutation of a captured tensor); rows kept below the norm are unchanged."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(9, 4, max_norm=10.0)
        self.head = nn.Linear(4, 4)

    def forward(self, ids):
        return self.head(self.embedding(ids).mean(1))


@pytest.mark.parametrize("case", ["old-style-function", "embedding-max-norm"])
def test_models_torch_func_cannot_transform_fall_back_to_plain_autograd(case):
    from datatrace.grads.per_example import VmapFallbackWarning

    torch.manual_seed(0)
    if case == "old-style-function":
        model, X = OldStyleFunction().eval(), torch.randn(6, 3)
    else:
        model, X = RenormedEmbedding().eval(), torch.randint(0, 9, (6, 5))
    y = torch.randint(0, 4, (6,))
    task = Classification()
    names = select_parameters(model)
    with pytest.warns(VmapFallbackWarning, match="plain autograd"):
        got = PerExampleGradients(model, task, names).gradients(model.state_dict(), (X, y))
    used = [name for name in names if not name.startswith("unused.")]
    want = loop_gradients(model, task, used, X, y)
    for name in used:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
    for name in set(names) - set(used):
        assert got[name].shape == (6, *dict(model.named_parameters())[name].shape)
        assert not got[name].any()
