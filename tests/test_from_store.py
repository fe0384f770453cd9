"""Reopening a fitted store: the same scores without the training data, and clear refusals."""

import numpy as np
import pytest

import datatrace as dt
from conftest import make_mlp
from datatrace.tasks import ClassLogit

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = {"proj_dim": 64, "chunk_size": 64, "batch_size": 50, "progress": False}


@pytest.fixture(scope="module")
def fitted(trained_mlps, tmp_path_factory):
    """TRAK fitted on 150 digits under two checkpoints, into a directory store."""
    models, X, y = trained_mlps
    path = tmp_path_factory.mktemp("from_store") / "store"
    checkpoints = [m.state_dict() for m in models[:2]]
    trak = dt.TRAK(models[0], dt.Classification(), store=path, damping=0.05, **SETTINGS)
    trak.fit((X[:150], y[:150]), checkpoints)
    targets = (X[1000:1012], y[1000:1012])
    return trak, path, checkpoints, targets


def test_reopened_trak_scores_like_the_fitted_one(fitted):
    trak, path, checkpoints, targets = fitted
    fresh = make_mlp(seed=7)  # another module of the same architecture; checkpoints replace it
    reopened = dt.TRAK.from_store(
        path, fresh, dt.Classification(), checkpoints, damping=0.05, progress=False
    )
    assert reopened.n_train_ == 150 and reopened.feature_dim_ == trak.feature_dim_
    assert reopened.features_.projector.config() == trak.features_.projector.config()
    np.testing.assert_array_equal(reopened.damping_, trak.damping_)
    np.testing.assert_array_equal(reopened.out_to_loss_, trak.out_to_loss_)
    want = trak.score(targets)
    got = reopened.score(targets)
    np.testing.assert_array_equal(got.scores, want.scores)
    assert got.info == want.info
    # scoring another output works on the reopened estimator as on the fitted one
    logit_targets = (targets[0][:3], targets[1][:3])
    np.testing.assert_array_equal(
        reopened.score(logit_targets, task=ClassLogit()).scores,
        trak.score(logit_targets, task=ClassLogit()).scores,
    )


@pytest.mark.parametrize("method", [dt.GradientDot, dt.GradientCosine])
def test_reopened_gradient_baselines_score_like_fitted_ones(fitted, trained_mlps, method):
    _, path, checkpoints, targets = fitted
    models, X, y = trained_mlps
    baseline = method(models[0], dt.Classification(), store=path, **SETTINGS)
    want = baseline.fit((X[:150], y[:150]), checkpoints).score(targets)
    reopened = method.from_store(path, make_mlp(seed=7), dt.Classification(), checkpoints)
    np.testing.assert_array_equal(reopened.score(targets).scores, want.scores)


def test_another_checkpoint_is_refused(fitted, trained_mlps):
    _, path, checkpoints, _ = fitted
    models, _, _ = trained_mlps
    other = [checkpoints[0], models[2].state_dict()]
    with pytest.raises(dt.StoreMismatchError, match="checkpoint 1 is not the one") as error:
        dt.TRAK.from_store(path, make_mlp(), dt.Classification(), other)
    assert "stored" in str(error.value) and "now" in str(error.value)
    with pytest.raises(dt.StoreMismatchError, match="checkpoint 0 is not the one"):
        dt.TRAK.from_store(path, make_mlp(), dt.Classification(), checkpoints[::-1])
    with pytest.raises(dt.StoreMismatchError, match="3 checkpoints given"):
        dt.TRAK.from_store(path, make_mlp(), dt.Classification(), [*checkpoints, checkpoints[0]])


def test_a_store_of_another_model_task_or_projection_is_refused(fitted):
    _, path, checkpoints, _ = fitted
    with pytest.raises(dt.StoreMismatchError, match=r"model: stored .*another model"):
        dt.TRAK.from_store(path, make_mlp(hidden=8), dt.Classification())
    with pytest.raises(dt.StoreMismatchError, match="task: stored"):
        dt.TRAK.from_store(path, make_mlp(), ClassLogit(), checkpoints)
    with pytest.raises(dt.StoreMismatchError, match="seed: stored 0, now 1"):
        dt.TRAK.from_store(path, make_mlp(), dt.Classification(), checkpoints, seed=1)
    with pytest.raises(dt.StoreMismatchError, match="projector: stored"):
        dt.TRAK.from_store(path, make_mlp(), dt.Classification(), checkpoints, projector="dense")
    with pytest.raises(dt.StoreMismatchError, match=r"params: stored .*pass the params="):
        dt.TRAK.from_store(path, make_mlp(), dt.Classification(), checkpoints, params="2.*")


def test_a_parameter_selection_is_passed_again(trained_mlps, tmp_path):
    models, X, y = trained_mlps
    path = tmp_path / "store"
    settings = {**SETTINGS, "params": "2.*"}
    trak = dt.TRAK(models[0], dt.Classification(), store=path, **settings).fit((X[:80], y[:80]))
    with pytest.raises(dt.StoreMismatchError, match="params"):
        dt.TRAK.from_store(path, models[0], dt.Classification())
    reopened = dt.TRAK.from_store(path, models[0], dt.Classification(), params="2.*")
    targets = (X[1000:1004], y[1000:1004])
    np.testing.assert_array_equal(reopened.score(targets).scores, trak.score(targets).scores)


def test_an_incomplete_store_is_refused(trained_mlps, tmp_path):
    models, X, y = trained_mlps
    path = tmp_path / "store"
    trak = dt.TRAK(models[0], dt.Classification(), store=path, **SETTINGS)
    trak.fit((X[:150], y[:150]), shard=(0, 2))  # chunks 0 and 2 of 3
    assert not hasattr(trak, "kernels_")
    with pytest.raises(ValueError, match="incomplete: checkpoint 0 has 1 of 3 row chunks"):
        dt.TRAK.from_store(path, models[0], dt.Classification())


def test_no_store_or_no_features_is_refused(tmp_path, trained_mlps):
    models, _, _ = trained_mlps
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="no datatrace store at"):
        dt.TRAK.from_store(missing, models[0], dt.Classification())
    assert not missing.exists()  # nothing created
    scores_only = tmp_path / "scores_only"
    dt.Store(scores_only).save_attributions("a", dt.Attributions(np.zeros((2, 3), np.float32)))
    with pytest.raises(ValueError, match="holds no features"):
        dt.GradientDot.from_store(scores_only, models[0], dt.Classification())
