"""Models in the forms users hand them over: compiled with torch.compile (and checkpoints saved
from one), binary classifiers with a single logit; and the scores as a numpy array."""

import numpy as np
import pytest
import torch
from torch import nn

import datatrace as dt
from conftest import make_mlp, train
from datatrace.grads.checkpoints import load_checkpoint
from datatrace.tasks import Classification, ClassLogit, classification_margin


def test_a_compiled_model_attributes_as_the_module_it_wraps(digits):
    X, y = digits
    model = train(make_mlp(), X[:120], y[:120], steps=20)
    compiled = torch.compile(model)
    assert set(compiled.state_dict()) != set(model.state_dict())  # "_orig_mod." names
    settings = dict(proj_dim=64, progress=False)
    want = dt.TRAK(model, Classification(), **settings).fit((X[:100], y[:100]))
    got = dt.TRAK(compiled, Classification(), **settings).fit(
        (X[:100], y[:100]),
        [compiled.state_dict()],  # a checkpoint saved from the compiled model
    )
    np.testing.assert_allclose(
        got.score((X[100:110], y[100:110])).scores,
        want.score((X[100:110], y[100:110])).scores,
        rtol=1e-6,
        atol=1e-9,
    )


def test_a_checkpoint_of_a_compiled_model_loads_into_the_plain_model():
    model = make_mlp()
    state = torch.compile(model).state_dict()
    loaded = load_checkpoint(state, model, "cpu")
    assert set(loaded) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor)
    with pytest.raises(ValueError, match="unknown entries"):  # a partly prefixed one is refused
        load_checkpoint({**state, "extra": torch.zeros(1)}, model, "cpu")


class TwoLogits(nn.Module):
    """The binary model as a softmax over ``(0, z)``: the same parameters, two outputs."""

    def __init__(self, binary: nn.Module):
        super().__init__()
        self.binary = binary

    def forward(self, x):
        z = self.binary(x)
        return torch.cat([torch.zeros_like(z), z], 1)


def test_a_single_logit_binary_classifier_scores_as_its_two_logit_softmax(digits):
    X, digit = digits
    y = (digit % 2).long()  # odd against even
    torch.manual_seed(0)
    binary = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 1))
    optimizer = torch.optim.Adam(binary.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(
            binary(X[:150])[:, 0], y[:150].float()
        )
        loss.backward()
        optimizer.step()
    z = binary(X[:20])[:, 0].detach()
    torch.testing.assert_close(classification_margin(z[:, None], y[:20]), (2 * y[:20] - 1) * z)
    task = Classification()
    # Q = 1 − p(true class) under the sigmoid, i.e. the gradient of BCE with respect to the margin
    p_true = torch.where(y[:20] == 1, torch.sigmoid(z), 1 - torch.sigmoid(z))
    torch.testing.assert_close(task.out_to_loss(binary, (X[:20], y[:20])), 1 - p_true)
    settings = dict(proj_dim=48, progress=False)
    got = dt.TRAK(binary, task, **settings).fit((X[:150], y[:150]))
    want = dt.TRAK(TwoLogits(binary), task, **settings).fit((X[:150], y[:150]))
    targets = (X[150:160], y[150:160])
    np.testing.assert_allclose(got.score(targets).scores, want.score(targets).scores, rtol=1e-5)
    per_class = (X[150:155].repeat_interleave(2, 0), torch.arange(2).repeat(5))
    np.testing.assert_allclose(
        got.score(per_class, task=ClassLogit()).scores,
        want.score(per_class, task=ClassLogit()).scores,
        rtol=1e-5,
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="labels must be class indices 0 … 1"):
        dt.TRAK(binary, task, **settings).fit((X[:10], torch.full((10,), 2)))


def test_attributions_convert_to_a_numpy_array():
    scores = np.arange(6.0).reshape(2, 3)
    attributions = dt.Attributions(scores, method="test")
    assert attributions.shape == (2, 3)
    assert np.asarray(attributions) is scores
    np.testing.assert_array_equal(np.asarray(attributions, dtype=np.float32), scores)
    assert np.asarray(attributions, dtype=np.float32).dtype == np.float32
    copied = np.array(attributions, copy=True)
    assert copied is not scores and np.array_equal(copied, scores)


class LogitsIn(nn.Module):
    """The same network returning its logits in a dict, a ModelOutput or a tuple."""

    def __init__(self, network: nn.Module, form: str):
        super().__init__()
        self.network = network
        self.form = form

    def forward(self, x):
        logits = self.network(x)
        if self.form == "dict":
            return {"logits": logits, "hidden": x}
        if self.form == "ModelOutput":
            from transformers.modeling_outputs import ImageClassifierOutput

            return ImageClassifierOutput(logits=logits)
        return logits, x


@pytest.mark.parametrize("form", ["dict", "ModelOutput"])
def test_a_model_returning_its_logits_in_a_field_attributes_as_the_plain_one(digits, form):
    if form == "ModelOutput":
        pytest.importorskip("transformers")
    X, y = digits
    model = train(make_mlp(), X[:120], y[:120], steps=20)
    settings = dict(proj_dim=64, progress=False)
    targets = (X[100:110], y[100:110])
    want = dt.TRAK(model, Classification(), **settings).fit((X[:100], y[:100])).score(targets)
    wrapped = LogitsIn(model, form)
    got = dt.TRAK(wrapped, Classification(), **settings).fit((X[:100], y[:100])).score(targets)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-9)


def test_a_model_returning_a_tuple_is_refused_with_the_fix(digits):
    X, y = digits
    with pytest.raises(
        ValueError, match=r"is tuple.*wrap the model so that it returns that tensor"
    ):
        dt.TRAK(LogitsIn(make_mlp(), "tuple"), Classification(), progress=False).fit(
            (X[:50], y[:50])
        )
