"""Incremental stores (datatrace.methods.incremental): adding and removing training examples
equals a fit from scratch on the changed training set."""

from __future__ import annotations

import numpy as np
import pytest

import _distributed_featurize as toy
from datatrace import TRAK


def subset(data, rows):
    return data[0][rows], data[1][rows]


def targets():
    images, labels = toy.train_data()
    return images[-7:], labels[-7:]


def assert_same_fit(updated: TRAK, scratch: TRAK):
    """The updated kernel is ΦᵀΦ of the kept rows (float64, to rounding); against the fit from
    scratch, to float32 rounding of the features (batches of other sizes round differently)."""
    assert updated.n_train_ == scratch.n_train_
    for left, right in zip(updated._stored, scratch._stored):
        kept = left.features[:][left.kept()].astype(np.float64)
        assert len(kept) == updated.n_train_
        np.testing.assert_allclose(left.gram(), kept.T @ kept, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(left.gram(), right.gram(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updated.out_to_loss_, scratch.out_to_loss_, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(updated.damping_, scratch.damping_, rtol=1e-5)
    np.testing.assert_allclose(
        updated.score(targets()).scores, scratch.score(targets()).scores, rtol=2e-4, atol=1e-6
    )


def test_adding_then_removing_examples_equals_fits_from_scratch(tmp_path):
    damping = {"damping_absolute": None}  # "auto": the damping is chosen again from the features
    data = toy.train_data()
    first, n = 70, len(data[1])  # 70 = 4 chunks of 16 and 6 rows: the new rows start at 80
    updated = toy.make_trak(tmp_path / "store", **damping).fit(
        subset(data, slice(0, first)), toy.checkpoints()
    )
    updated.add_examples(subset(data, slice(first, n)))
    assert updated.n_train_ == n
    assert updated.train_rows_.tolist() == list(range(70)) + list(range(80, 106))
    scratch = toy.make_trak(tmp_path / "scratch", **damping).fit(data, toy.checkpoints())
    assert_same_fit(updated, scratch)

    removed = [3, 50, 71, 95]  # positions in the training set: two old, two added examples
    updated.remove_examples(removed)
    kept = np.setdiff1d(np.arange(n), removed)
    scratch = toy.make_trak(tmp_path / "without", **damping).fit(
        subset(data, kept), toy.checkpoints()
    )
    assert updated.score(targets()).scores.shape == (7, n - len(removed))
    assert_same_fit(updated, scratch)

    # The gradient baselines read the changed store as its training set too.
    from datatrace import GradientDot

    model = toy.make_trak(None).model
    on_updated, on_scratch = (
        GradientDot.from_store(path, model, toy.Planted(), toy.checkpoints())
        for path in (tmp_path / "store", tmp_path / "without")
    )
    np.testing.assert_allclose(
        on_updated.score(targets()).scores,
        on_scratch.score(targets()).scores,
        rtol=2e-4,
        atol=1e-5,
    )
    reopened = TRAK.from_store(
        tmp_path / "store", toy.make_trak(None).model, toy.Planted(), toy.checkpoints(),
        **damping,
    )  # fmt: skip
    assert_same_fit(reopened, scratch)


def test_removing_checks_its_indices(tmp_path):
    trak = toy.make_trak(tmp_path / "store").fit(toy.train_data(), toy.checkpoints()[:1])
    with pytest.raises(ValueError, match=r"in \[0, 96\)"):
        trak.remove_examples([96])
    with pytest.raises(ValueError, match="more than once"):
        trak.remove_examples([1, 1])
    with pytest.raises(ValueError, match="integer positions"):
        trak.remove_examples([2.5])
    trak.remove_examples([0])
    assert trak.n_train_ == 95
    scores = trak.score(targets()).scores
    # Removing every example is refused before the store changes.
    with pytest.raises(ValueError, match="all 95 training examples"):
        trak.remove_examples(np.arange(95))
    with pytest.raises(ValueError, match="one entry per example"):
        trak.remove_examples(np.ones(96, bool))
    assert trak.n_train_ == 95
    np.testing.assert_array_equal(trak.score(targets()).scores, scores)
    # A boolean mask removes the positions where it is True, as their indices do.
    mask = np.zeros(95, bool)
    mask[[4, 40]] = True
    rows = trak.train_rows_
    trak.remove_examples(mask)
    assert trak.train_rows_.tolist() == np.delete(rows, [4, 40]).tolist()
    by_index = toy.make_trak(tmp_path / "by-index").fit(toy.train_data(), toy.checkpoints()[:1])
    by_index.remove_examples([0]).remove_examples([4, 40])
    np.testing.assert_array_equal(trak.score(targets()).scores, by_index.score(targets()).scores)


def test_an_interrupted_addition_resumes(tmp_path, monkeypatch):
    data = toy.train_data()
    trak = toy.make_trak(tmp_path / "store").fit(subset(data, slice(0, 64)), toy.checkpoints())
    from datatrace.methods import incremental

    monkeypatch.setattr(incremental, "featurize_chunks", lambda *args, **kwargs: None)
    with pytest.raises(RuntimeError, match="still has"):
        trak.add_examples(subset(data, slice(64, 96)))  # nothing featurized: not complete
    monkeypatch.undo()
    trak.add_examples(subset(data, slice(64, 96)))
    scratch = toy.make_trak(tmp_path / "scratch").fit(data, toy.checkpoints())
    assert_same_fit(trak, scratch)


def test_the_dual_kernel_is_rebuilt_for_the_changed_training_set(tmp_path):
    """With k > n the scores solve the n × n dual, rebuilt from Φ of the kept rows."""
    data, checkpoints = toy.train_data(), toy.checkpoints()[:1]
    updated = toy.make_trak(tmp_path / "store", proj_dim=128).fit(
        subset(data, slice(0, 70)), checkpoints
    )
    updated.add_examples(subset(data, slice(70, 96)))
    updated.remove_examples([3, 80])
    kept = np.setdiff1d(np.arange(96), [3, 80])
    scratch = toy.make_trak(tmp_path / "scratch", proj_dim=128).fit(subset(data, kept), checkpoints)
    assert updated.dual_ and scratch.dual_
    phi = updated._stored[0].features[:][updated._stored[0].kept()].astype(np.float64)
    np.testing.assert_allclose(updated._stored[0].gram(dual=True), phi @ phi.T, rtol=1e-12)
    np.testing.assert_allclose(
        updated.score(targets()).scores, scratch.score(targets()).scores, rtol=2e-4, atol=1e-6
    )
