"""Choosing TRAK's damping by LDS: the table equals separate fits, and the best value wins."""

import numpy as np
import pytest

import datatrace as dt
from datatrace.evaluation.lds import lds
from datatrace.evaluation.tuning import select_damping
from datatrace.store import CheckpointFeatures

GRID = (0.01, 0.1, 1.0, 10.0)
TRUE_DAMPING = 0.1


@pytest.fixture(scope="module")
def problem(trained_mlps):
    """A trained MLP, 200 training digits, 20 targets, 60 subsets whose outputs are TRAK's own
    predictions at damping 0.1 plus noise (so 0.1 has the highest LDS by construction)."""
    models, X, y = trained_mlps
    train, targets = (X[:200], y[:200]), (X[1000:1020], y[1000:1020])
    settings = {"proj_dim": 64, "progress": False, "batch_size": 100}
    truth = dt.TRAK(models[0], dt.Classification(), damping=TRUE_DAMPING, **settings)
    scores = truth.fit(train).score(targets).scores
    rng = np.random.default_rng(0)
    masks = rng.random((60, 200)) < 0.5
    predicted = masks @ scores.T
    outputs = predicted + 0.3 * predicted.std(0) * rng.standard_normal(predicted.shape)
    return models[0], train, targets, masks, outputs, settings


pytestmark = pytest.mark.usefixtures("one_thread")


def test_table_equals_separate_fits_and_features_are_computed_once(problem, monkeypatch):
    model, train, targets, masks, outputs, settings = problem
    trak = dt.TRAK(model, dt.Classification(), **settings).fit(train)
    written = []
    original = CheckpointFeatures.write
    monkeypatch.setattr(
        CheckpointFeatures, "write", lambda self, *a: written.append(a) or original(self, *a)
    )
    selection = select_damping(trak, train, targets, masks, outputs, grid=GRID)
    assert written == []  # the training features were read from the store, not recomputed
    assert trak.damping == dt.DEFAULT_DAMPING  # the estimator given is left as it was
    monkeypatch.undo()
    for damping, row in zip(GRID, selection.table()):
        separate = dt.TRAK(model, dt.Classification(), damping=damping, **settings).fit(train)
        expected = lds(separate.score(targets), masks, outputs)
        assert row["damping"] == damping
        assert row["lds"] == pytest.approx(expected.mean, abs=1e-9)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(expected.ci, abs=1e-9)
    assert selection.best == TRUE_DAMPING
    assert selection.lds.argmax() == GRID.index(TRUE_DAMPING)


def test_unfitted_estimator_is_fitted_first_and_bad_grids_refused(problem):
    model, train, targets, masks, outputs, settings = problem
    trak = dt.TRAK(model, dt.Classification(), **settings)
    selection = select_damping(trak, train, targets, masks, outputs, grid=(0.1, 1.0))
    assert hasattr(trak, "store_") and selection.best == TRUE_DAMPING
    with pytest.raises(ValueError, match="grid"):
        select_damping(trak, train, targets, masks, outputs, grid=())
    with pytest.raises(ValueError, match="grid"):
        select_damping(trak, train, targets, masks, outputs, grid=(-1.0,))
    with pytest.raises(ValueError, match="grid must be a non-empty list"):
        select_damping(trak, train, targets, masks, outputs, grid=("a",))
    unfitted = dt.TRAK(model, dt.Classification(), **settings)
    with pytest.raises(ValueError, match="bootstrap must be a non-negative integer"):
        select_damping(unfitted, train, targets, masks, outputs, bootstrap=2.5)
    assert not hasattr(unfitted, "store_")  # refused before fitting
