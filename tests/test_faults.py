"""Faults of the training data and the model: a changed example, NaN outputs. Each case ends
with "nothing lost": the store still opens and what was stored before is unchanged."""

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import datatrace as dt
from datatrace.grads.featurize import NonFiniteError

pytestmark = pytest.mark.usefixtures("one_thread")

N_TRAIN, CHUNK = 300, 64


def trak(model, store):
    return dt.TRAK(model, dt.Classification(), proj_dim=64, store=store, chunk_size=CHUNK,
                   batch_size=50, progress=False)  # fmt: skip


def snapshot(path) -> dict[str, np.ndarray]:
    """Every array of the features group, read raw."""
    group = zarr.open_group(str(path), mode="r")
    arrays = {}
    for name, node in group["features"].members(max_depth=None):
        if isinstance(node, zarr.Array):
            arrays[name] = node[:]
    return arrays


def assert_unchanged(before: dict, after: dict) -> None:
    assert before.keys() <= after.keys()
    for name, values in before.items():
        np.testing.assert_array_equal(after[name], values, err_msg=name)


@pytest.fixture()
def fitted(trained_mlps, tmp_path):
    models, X, y = trained_mlps
    train, targets = (X[:N_TRAIN].clone(), y[:N_TRAIN].clone()), (X[1000:1010], y[1000:1010])
    path = tmp_path / "store"
    scores = trak(models[0], path).fit(train).score(targets).scores
    return models[0], train, targets, path, scores


def test_a_changed_example_in_the_middle_is_refused_with_its_index(fitted):
    model, (X, y), targets, path, scores = fitted
    before = snapshot(path)
    for change in ("label", "pixel"):
        X2, y2 = X.clone(), y.clone()
        if change == "label":
            y2[200] = (y2[200] + 1) % 10
        else:
            X2[137, 5] += 0.25
        index = 200 if change == "label" else 137
        with pytest.raises(dt.StoreMismatchError, match=f"training example {index} differs"):
            trak(model, path).fit((X2, y2))
        assert_unchanged(before, snapshot(path))
    # the original data still fits and scores as before
    again = trak(model, path).fit((X, y)).score(targets).scores
    np.testing.assert_array_equal(again, scores)


class SometimesNaN(nn.Module):
    """The wrapped model, with NaN outputs for inputs whose first pixel is exactly ``marker``."""

    def __init__(self, inner: nn.Module, marker: float | None):
        super().__init__()
        self.inner = inner
        self.marker = marker

    def forward(self, x):
        out = self.inner(x)
        if self.marker is None:
            return out
        poisoned = (x[..., 0] == self.marker).unsqueeze(-1)
        return torch.where(poisoned, torch.full_like(out, float("nan")), out)


def test_nan_outputs_name_the_examples_store_nothing_and_the_store_resumes(trained_mlps, tmp_path):
    models, X, y = trained_mlps
    X = X[:N_TRAIN].clone()
    marker = 0.123456
    X[[70, 75, 250], 0] = marker  # chunk 1 (rows 64-127) and chunk 3 (192-255)
    train = (X, y[:N_TRAIN])
    path = tmp_path / "store"
    broken = SometimesNaN(models[0], marker)
    with pytest.raises(NonFiniteError, match=r"of 2 training examples are NaN.*70, 75"):
        trak(broken, path).fit(train)
    group = zarr.open_group(str(path), mode="r")
    done = group["features/0/done"][:]
    assert done.tolist()[:2] == [1, 0]  # chunk 0 kept, chunk 1 not marked done
    assert "gram" not in group["features/0"] and "dual_gram" not in group["features/0"]
    before = snapshot(path)
    # the model is fixed: the same store resumes and is complete
    fixed = SometimesNaN(models[0], None)
    fitted = trak(fixed, path).fit(train)
    assert_unchanged(
        {"0/features": before["0/features"][:CHUNK]},
        {"0/features": snapshot(path)["0/features"][:CHUNK]},
    )
    reference = trak(fixed, tmp_path / "fresh").fit(train)
    targets = (X[100:110], y[100:110])
    np.testing.assert_array_equal(fitted.score(targets).scores, reference.score(targets).scores)


def test_nan_target_features_are_refused_with_their_indices(trained_mlps, tmp_path):
    models, X, y = trained_mlps
    marker = 0.654321
    targets = X[1000:1010].clone()
    targets[3, 0] = marker
    model = SometimesNaN(models[0], marker)
    fitted = trak(model, None).fit((X[:N_TRAIN], y[:N_TRAIN]))
    with pytest.raises(NonFiniteError, match="examples 3"):
        fitted.score((targets, y[1000:1010]))
