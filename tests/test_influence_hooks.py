"""Influence functions' per-example gradients from layer hooks: the same scores as vmap's for
every Hessian and kind of layer, gradients against a Python loop of autograd, and the layers
the hooks cannot serve falling back to vmap."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import datatrace as dt
from datatrace.methods.influence import InfluenceFunctions
from datatrace.methods.influence.factors import kronecker_factors
from datatrace.methods.influence.gradients import HookWarning, LayoutGradients, hooked_layers
from datatrace.methods.influence.layers import kronecker_layout

pytestmark = pytest.mark.usefixtures("one_thread")

HESSIANS = ["ekfac", "kfac", "diagonal", "identity"]


class Convolutional(nn.Module):
    """A strided, padded Conv2d (9 positions), a dilated Conv1d over its flattened pixels
    (9 positions), a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.conv1d = nn.Conv1d(3, 4, 2, dilation=2, padding=1)
        self.head = nn.Linear(4 * 9, 3)

    def forward(self, x):
        hidden = torch.tanh(self.conv(x))  # (n, 3, 3, 3)
        return self.head(torch.tanh(self.conv1d(hidden.flatten(2))).flatten(1))


class Sequence(nn.Module):
    """A linear layer applied at 5 positions of ``(n, 5, 3)`` inputs, then a linear head."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.inner(x)).mean(1))


class Tied(nn.Module):
    """One module called twice, and a weight shared by two modules with their own biases."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.first = nn.Linear(4, 3)
        self.second = nn.Linear(4, 3)
        self.second.weight = self.first.weight
        self.head = nn.Linear(3, 3, bias=False)

    def forward(self, x):
        hidden = torch.tanh(self.shared(torch.tanh(self.shared(x))))
        return self.head(torch.tanh(self.first(hidden)) + torch.sin(self.second(hidden)))


class Normalised(nn.Module):
    """A LayerNorm between two linear layers (its affine parameters are fallback, by vmap),
    the second followed by an in-place ReLU, and a head without a bias."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5)
        self.middle = nn.Linear(5, 5)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.head(self.relu(self.middle(self.norm(self.inner(x)))))


def make_data(model_name, n, seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = {"convolutional": (2, 5, 5), "sequence": (5, 3)}
    shape = shapes.get(model_name, (4,))
    x = torch.randn(n, *shape, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=generator)


MODELS = {
    "mlp": lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)),
    "convolutional": Convolutional,
    "sequence": Sequence,
    "tied": Tied,
    "normalised": Normalised,
}
HOOKED = {
    "mlp": ["0", "2"],
    "convolutional": ["conv", "conv1d", "head"],
    "sequence": ["inner", "head"],
    "tied": ["shared", "first", "head"],
    "normalised": ["inner", "middle", "head"],
}


def make_model(name):
    torch.manual_seed(0)
    return MODELS[name]().double()


def fit_and_score(model, train, targets, **settings):
    estimator = InfluenceFunctions(
        model, dt.Classification(), batch_size=7, progress=False, **settings
    ).fit(train)
    return estimator, estimator.score(targets).scores


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("hessian", HESSIANS)
def test_hooked_scores_equal_vmap_scores(model_name, hessian):
    model = make_model(model_name)
    train, targets = make_data(model_name, 20, 1), make_data(model_name, 3, 2)
    hooks, got = fit_and_score(model, train, targets, hessian=hessian)
    vmap, expected = fit_and_score(model, train, targets, hessian=hessian, gradients="vmap")
    assert hooks.hooked_layers_ == HOOKED[model_name]
    names = {name for name, _ in model.named_parameters()}
    assert vmap.hooked_layers_ == [] and set(vmap.vmap_params_) == names
    hooked = {f"{layer}.{p}" for layer in HOOKED[model_name] for p in ("weight", "bias")}
    assert set(hooks.vmap_params_) == names - hooked
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-13 * np.abs(expected).max())
    assert np.abs(expected).max() > 0


@pytest.mark.parametrize(
    "settings",
    [
        {"refine_steps": 2},
        {"fisher": "sampled", "measurement": "output"},
        {"hessian": "kfac", "damping_absolute": 0.0},
    ],
    ids=["refined", "sampled-output", "undamped-kfac"],
)
def test_hooked_scores_equal_vmap_scores_with_other_settings(settings):
    model = make_model("tied")
    train, targets = make_data("tied", 20, 1), make_data("tied", 3, 2)
    _, got = fit_and_score(model, train, targets, **settings)
    _, expected = fit_and_score(model, train, targets, gradients="vmap", **settings)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())


def test_hooked_scores_of_another_target_task_equal_vmap_scores():
    model = make_model("convolutional")
    train, (x, _) = make_data("convolutional", 16, 1), make_data("convolutional", 2, 2)
    targets = dt.tasks.per_class_targets(x, 3)
    scores = []
    for gradients in ("hooks", "vmap"):
        estimator = InfluenceFunctions(
            model, dt.Classification(), gradients=gradients, progress=False
        ).fit(train)
        scores.append(estimator.score(targets, task=dt.tasks.ClassLogit()).scores)
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-10, atol=1e-14)


def loop_gradient(model, x, label):
    """``{name: gradient}`` of one example's cross-entropy: autograd on the model itself."""
    loss = F.cross_entropy(model(x[None]), label[None])
    names = [name for name, _ in model.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, list(model.parameters()))))


@pytest.mark.parametrize("model_name", ["convolutional", "tied", "normalised"])
def test_hooked_gradients_and_rotations_match_an_autograd_loop(model_name):
    """The layout's gradients (hooks for the layers, vmap for the rest) against a loop of
    autograd; and ``Q_Sᵀ G Q_A`` from the rotated factors against rotating the loop's ``G``."""
    model = make_model(model_name).eval()
    x, labels = make_data(model_name, 6, 3)
    names = [name for name, _ in model.named_parameters()]
    layout = kronecker_layout(model, names)
    state = model.state_dict()
    passed, failed, _ = hooked_layers(model, dt.Classification(), layout, names, state, (x, labels))
    assert failed == {} and len(passed) == len(layout.layers)
    gradients = LayoutGradients(
        model, dt.Classification(), layout, names, torch.device("cpu"), hooked=passed
    )
    got = gradients.gradients(state, (x, labels))
    loops = [loop_gradient(model, x[i], labels[i]) for i in range(len(x))]
    expected = layout.flatten({name: torch.stack([g[name] for g in loops]) for name in names})
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-13)
    layers, _, _ = gradients.blocks(state, (x, labels))
    for index, layer in enumerate(layout.layers):
        generator = torch.Generator().manual_seed(index)
        q_a = torch.linalg.qr(torch.randn(layer.in_dim, layer.in_dim, generator=generator))[0]
        q_s = torch.linalg.qr(torch.randn(layer.out_dim, layer.out_dim, generator=generator))[0]
        matrices = layout.split(expected)[index]
        rotated = layers[index].rotated(q_a.double(), q_s.double())
        torch.testing.assert_close(rotated, q_s.T.double() @ matrices @ q_a.double())


def test_kronecker_factors_of_tied_weights_count_every_call_of_every_holder():
    """``A`` and ``S`` of the module called twice and of the weight shared by two modules
    (the second with its own bias: 0 in the first layer's bias coordinate) against a loop."""
    model = make_model("tied").eval()
    x, labels = make_data("tied", 10, 4)
    names = [name for name, _ in model.named_parameters()]
    layout = kronecker_layout(model, names)
    gradients = LayoutGradients(model, dt.Classification(), layout, names, torch.device("cpu"))
    state = model.state_dict()
    factors = kronecker_factors(model, gradients, state, dt.data.Examples((x, labels)), 4, False)
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    expected = [torch.zeros(5, 5), torch.zeros(4, 4), torch.zeros(5, 5), torch.zeros(3, 3)]
    expected = [matrix.double() for matrix in expected]
    for i in range(len(x)):
        inner = model.shared(x[i])
        outer = model.shared(torch.tanh(inner))
        hidden = torch.tanh(outer)
        first, second = model.first(hidden), model.second(hidden)
        logits = model.head(torch.tanh(first) + torch.sin(second))
        loss = F.cross_entropy(logits[None], labels[i][None])
        grads = torch.autograd.grad(loss, [inner, outer, first, second])
        shared_inputs = [torch.cat([x[i], one]), torch.cat([torch.tanh(inner).detach(), one])]
        first_inputs = [torch.cat([hidden.detach(), one]), torch.cat([hidden.detach(), zero])]
        for a in shared_inputs:
            expected[0] += torch.outer(a, a) / (2 * len(x))
        for a in first_inputs:
            expected[2] += torch.outer(a, a) / (2 * len(x))
        for g in grads[:2]:
            expected[1] += torch.outer(g, g) / len(x)
        for g in grads[2:]:
            expected[3] += torch.outer(g, g) / len(x)
    assert [layer.name for layer in layout.layers[:2]] == ["shared", "first"]
    got = [factors[0][0], factors[0][1], factors[1][0], factors[1][1]]
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-13)


class Functional(nn.Module):
    """The first layer's weight is also used through ``F.linear``, which no hook sees."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        hidden = torch.tanh(self.inner(x))
        return self.head(hidden + F.linear(hidden, self.inner.weight))


def test_a_weight_used_outside_its_module_falls_back_to_vmap():
    torch.manual_seed(0)
    model = Functional().double()
    train, targets = make_data("mlp", 16, 1), make_data("mlp", 3, 2)
    with pytest.warns(HookWarning, match=r"inner \(relative difference"):
        hooks, got = fit_and_score(model, train, targets)
    assert hooks.hooked_layers_ == ["head"]
    assert hooks.vmap_params_ == ["inner.weight", "inner.bias"]
    _, expected = fit_and_score(model, train, targets, gradients="vmap")
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-13 * np.abs(expected).max())


def test_a_model_that_mixes_the_examples_of_a_batch_falls_back_to_vmap():
    class Mixing(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 3)

        def forward(self, x):
            out = self.inner(x)
            return out - out.mean(0)  # each example's output depends on the others'

    torch.manual_seed(0)
    model = Mixing().double()
    with pytest.warns(HookWarning, match="inner"):
        estimator = fit_and_score(model, make_data("mlp", 8, 1), make_data("mlp", 2, 2))[0]
    assert estimator.hooked_layers_ == []


def test_a_store_whose_factors_counted_only_the_first_holder_is_refused(tmp_path):
    import zarr

    model, train = make_model("tied"), make_data("tied", 20, seed=3)
    store = tmp_path / "store"
    settings = dict(batch_size=7, progress=False, store=store)
    InfluenceFunctions(model, dt.Classification(), **settings).fit(train)
    group = zarr.open_group(str(store / "influence"), mode="r+")
    older = dict(group.attrs["provenance"])
    del older["factors"]  # as stores before FACTORS_VERSION 2 were written
    group.attrs["provenance"] = older
    with pytest.raises(dt.StoreMismatchError, match="factors"):
        InfluenceFunctions(model, dt.Classification(), **settings).fit(train)


class TiedEmbedding(nn.Module):
    """A linear head whose weight is also an embedding table (a tied language-model head),
    registered before the embedding: ids (n, 5) in [0, 3) → embedding → mean → head."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 3, bias=False)
        self.embed = nn.Embedding(3, 6)
        self.embed.weight = self.head.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids).mean(1)))


@pytest.mark.parametrize("hessian", ["kfac", "ekfac"])
def test_a_linear_weight_tied_to_an_embedding_factors_the_linear_calls_only(hessian):
    torch.manual_seed(0)
    model = TiedEmbedding().double()
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 3, (20, 5), generator=generator)
    labels = torch.randint(0, 3, (20,), generator=generator)
    train, targets = (ids[:14], labels[:14]), (ids[14:], labels[14:])
    scores = {
        mode: fit_and_score(model, train, targets, hessian=hessian, gradients=mode)[1]
        for mode in ("hooks", "vmap")
    }
    np.testing.assert_allclose(scores["hooks"], scores["vmap"], rtol=1e-10, atol=1e-12)
    # the head's input covariance, from its own calls: the embedding's ids are not its inputs
    layout = kronecker_layout(model, ["head.weight"])
    assert [layer.name for layer in layout.layers] == ["head"]
