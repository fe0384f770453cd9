"""batch_size="auto": the saved-activation probe, the budget arithmetic, and fits that do not
depend on the batch size chosen."""

import numpy as np
import pytest
import torch
from torch import nn

import datatrace as dt
from conftest import make_mlp
from datatrace.grads import memory
from datatrace.grads.memory import MAX_AUTO_BATCH, activation_bytes, choose_batch_size

pytestmark = pytest.mark.usefixtures("one_thread")


def wide_mlp(hidden):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def probe_bytes(model, n=4):
    inputs = torch.randn(n, 64)
    labels = torch.arange(n) % 10
    names = [name for name, _ in model.named_parameters()]
    return activation_bytes(model, dt.Classification(), names, model.state_dict(), (inputs, labels))


def test_saved_activations_grow_with_the_hidden_layer_per_example():
    """The tanh output (hidden floats) is saved for the backward pass of tanh and of the second
    layer: per example, the wider model saves at least 4·(1024 − 16) bytes more; its weights
    count as fixed, not per example."""
    small_fixed, small = probe_bytes(wide_mlp(16))
    wide_fixed, wide = probe_bytes(wide_mlp(1024))
    assert wide - small >= 4 * (1024 - 16)
    assert wide < 4 * 64 * 1024  # far less than a per-example weight gradient
    assert wide_fixed >= 4 * 1024 * 10  # the second layer's weight is saved, once
    assert small_fixed < wide_fixed


def test_single_example_counts_everything_per_example():
    fixed, per_example = probe_bytes(wide_mlp(16), n=1)
    assert fixed == 0 and per_example > 0


def test_choose_batch_size_fills_the_budget():
    assert choose_batch_size(fixed=100, per_example=10, budget=100 + 10 * 37, n=1000) == 32
    assert choose_batch_size(fixed=0, per_example=10, budget=10 * 5, n=1000) == 5
    assert choose_batch_size(fixed=10**9, per_example=10, budget=10, n=1000) == 1
    assert choose_batch_size(fixed=0, per_example=1, budget=10**12, n=50) == 48
    assert choose_batch_size(fixed=0, per_example=1, budget=10**12, n=10**6) == MAX_AUTO_BATCH


@pytest.mark.parametrize("projector", ["sparse", "factgrass"])
def test_auto_batch_follows_the_budget_and_not_the_scores(digits, projector):
    X, y = digits
    model = make_mlp(hidden=32)
    train, targets = (X[:300], y[:300]), (X[1000:1010], y[1000:1010])

    def fit(**settings):
        trak = dt.TRAK(
            model, dt.Classification(), proj_dim=64, projector=projector, progress=False,
            **settings,
        )  # fmt: skip
        return trak.fit(train)

    fixed = fit(batch_size=32)
    small = fit(batch_size="auto", memory_budget=300_000)
    large = fit(batch_size="auto", memory_budget=1 << 30)
    small_trak, large_trak = small, large
    chosen = [t.features_.batch_size for t in (small_trak, large_trak)]
    assert 1 <= chosen[0] < chosen[1] <= 300, chosen
    estimate = small_trak.features_.batch_estimate_
    assert estimate["fixed"] + chosen[0] * estimate["per_example"] <= 300_000 or chosen[0] == 1
    want = fixed.score(targets).scores
    for got in (small, large):
        np.testing.assert_allclose(
            got.score(targets).scores, want, rtol=2e-3, atol=2e-3 * abs(want).max()
        )


def test_bad_batch_size_and_budget_are_refused():
    model = make_mlp()
    with pytest.raises(ValueError, match="batch_size"):
        dt.TRAK(model, dt.Classification(), batch_size=0, progress=False).fit(
            (torch.randn(4, 64), torch.zeros(4, dtype=torch.long))
        )
    data = (torch.randn(4, 64), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="memory_budget"):
        dt.TRAK(
            model, dt.Classification(), batch_size="auto", memory_budget=-1, progress=False
        ).fit(data)


def test_default_budget_is_a_share_of_free_memory():
    budget = memory.default_budget(torch.device("cpu"))
    assert 0 < budget <= memory.DEFAULT_CPU_BUDGET
    assert budget <= memory.available_ram()
