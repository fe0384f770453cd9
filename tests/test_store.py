"""The store: resumption after a real SIGKILL, refusal of mismatched runs, saved attributions."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import datatrace as dt
from datatrace.grads.featurize import GradientFeatures

sys.path.insert(0, str(Path(__file__).parent))
import _featurize_worker as worker

TESTS = Path(__file__).parent


def done_chunks(path: Path) -> int:
    try:
        group = zarr.open_group(str(path), mode="r")
        return sum(
            int(group[f"features/{c}/done"][:].sum())
            for c in ("0", "1")
            if f"features/{c}/done" in group
        )
    except (FileNotFoundError, KeyError, ValueError):
        return 0


# Finished chunks (of 24: 12 per checkpoint) after which the featurizing process is killed: the
# first chunk, inside and at the end of the first checkpoint, late in the second.
KILL_AFTER = (1, 6, 12, 20)


@pytest.mark.parametrize("kill_after", KILL_AFTER)
def test_killed_featurization_resumes_to_identical_scores(tmp_path, monkeypatch, kill_after):
    store = tmp_path / "killed"
    process = subprocess.Popen(
        # 10 ms per example, 0.16 s per chunk: the kill after chunk 20 has four chunks (0.6 s)
        # of margin on a loaded machine (at 4 ms it once finished every chunk first)
        [sys.executable, str(TESTS / "_featurize_worker.py"), str(store), "0.01"],
        cwd=TESTS,
    )
    total = 2 * worker.N_TRAIN // worker.CHUNK
    deadline = time.time() + 120
    while done_chunks(store) < kill_after and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = done_chunks(store)
    assert kill_after <= finished_before < total, "the run must be killed midway"

    computed = []
    original = GradientFeatures.featurize

    def counting(self, state, batch, checkpoint):
        computed.append(len(batch[1]))
        return original(self, state, batch, checkpoint)

    monkeypatch.setattr(GradientFeatures, "featurize", counting)
    data = worker.SlowDigits(0.0)
    targets = digits_split_targets()
    resumed = worker.make_trak(str(store)).fit(data, worker.checkpoints()).score(targets)
    recomputed_train = worker.N_TRAIN * 2 - finished_before * worker.CHUNK
    assert sum(computed) == recomputed_train + 2 * len(targets[1])

    fresh = worker.make_trak(str(tmp_path / "fresh")).fit(data, worker.checkpoints())
    assert np.array_equal(resumed.scores, fresh.score(targets).scores)


def digits_split_targets():
    test = dt.demo.digits_split()[1]
    return test.images[:10], test.labels[:10]


@pytest.fixture(scope="module")
def fitted_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "run"
    data = worker.SlowDigits(0.0)
    trak = worker.make_trak(str(path)).fit(data, worker.checkpoints())
    trak.score(digits_split_targets(), name="test")
    return path, data


def snapshot(path: Path) -> dict[str, bytes]:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): p.read_bytes() for p in files}


MISMATCHES = {
    "model": dict(model=lambda: dt.demo.make_model("mlp", seed=0, hidden=32)),
    "task": dict(task=lambda: type("Other", (dt.Classification,), {})()),
    "projector": dict(projector="dense"),
    "proj_dim": dict(proj_dim=32),
    "seed": dict(seed=1),
    "params": dict(params="head.*"),
}


@pytest.mark.parametrize("what", MISMATCHES)
def test_mismatched_run_is_refused_and_store_untouched(fitted_store, what):
    path, data = fitted_store
    before = snapshot(path)
    settings = {
        "proj_dim": worker.PROJ_DIM,
        "store": str(path),
        "batch_size": 8,
        "chunk_size": worker.CHUNK,
        "progress": False,
    }
    model = dt.demo.make_model("mlp", seed=0, hidden=16)
    task = dt.Classification()
    change = dict(MISMATCHES[what])
    model = change.pop("model", lambda: model)()
    task = change.pop("task", lambda: task)()
    checkpoints = worker.checkpoints() if what != "model" else [model.state_dict()]
    with pytest.raises(dt.StoreMismatchError, match="different run") as error:
        dt.TRAK(model, task, **{**settings, **change}).fit(data, checkpoints)
    assert "Use a new store location" in str(error.value)
    assert snapshot(path) == before


def test_other_training_set_or_checkpoint_is_refused(fitted_store):
    path, data = fitted_store
    before = snapshot(path)
    images, labels = data.images[: worker.N_TRAIN], data.labels[: worker.N_TRAIN]
    with pytest.raises(dt.StoreMismatchError, match="train_data"):
        worker.make_trak(str(path)).fit((images.flip(0), labels.flip(0)), worker.checkpoints())
    with pytest.raises(dt.StoreMismatchError, match="n_train"):
        worker.make_trak(str(path)).fit((images[:100], labels[:100]), worker.checkpoints())
    swapped = worker.checkpoints()[::-1]
    with pytest.raises(dt.StoreMismatchError, match=r"checkpoint 0 .* featurized differently"):
        worker.make_trak(str(path)).fit(data, swapped)
    assert snapshot(path) == before


def test_complete_store_is_reused_without_recomputing(fitted_store, monkeypatch):
    path, data = fitted_store

    def fail(*args, **kwargs):
        raise AssertionError("featurized again")

    monkeypatch.setattr(GradientFeatures, "featurize", fail)
    trak = worker.make_trak(str(path)).fit(data, worker.checkpoints())
    assert trak.n_train_ == worker.N_TRAIN


def test_saved_attributions_round_trip(fitted_store, tmp_path):
    path, _ = fitted_store
    loaded = dt.Attributions.load(str(path), "test")
    assert loaded.method == "TRAK" and loaded.scores.shape == (10, worker.N_TRAIN)
    assert loaded.info["n_checkpoints"] == 2
    with pytest.raises(KeyError, match="saved: test"):
        dt.Attributions.load(str(path), "nope")
    copy = tmp_path / "copy"
    loaded.save(str(copy), "again")
    again = dt.Attributions.load(str(copy), "again")
    assert np.array_equal(again.scores, loaded.scores)
    np.testing.assert_array_equal(again.out_to_loss, loaded.out_to_loss)


def test_shards_fill_one_store(tmp_path):
    """Two shards written by independent estimators give the scores of a single run."""
    data = worker.SlowDigits(0.0)
    path = str(tmp_path / "sharded")
    first = worker.make_trak(path).fit(data, worker.checkpoints(), shard=(0, 2))
    assert not hasattr(first, "n_train_")  # half the chunks: not fitted yet
    with pytest.raises(RuntimeError, match="not fitted"):
        first.score(digits_split_targets())
    worker.make_trak(path).fit(data, worker.checkpoints(), shard=(1, 2))
    combined = worker.make_trak(path).fit(data, worker.checkpoints())
    single = worker.make_trak(None).fit(data, worker.checkpoints())
    targets = digits_split_targets()
    assert np.array_equal(combined.score(targets).scores, single.score(targets).scores)


def test_in_memory_store_by_default():
    data = worker.SlowDigits(0.0)
    trak = worker.make_trak(None).fit(data, worker.checkpoints())
    assert trak.store_.location is None
    assert trak.store_.root["features/1/done"][:].all()


def test_fsspec_url_store_gives_the_same_scores(tmp_path):
    """The fsspec path (used for object storage) on the local filesystem: file:// URLs."""
    data = worker.SlowDigits(0.0)
    targets = digits_split_targets()
    url = f"file://{tmp_path}/remote.zarr"
    remote = worker.make_trak(url).fit(data, worker.checkpoints()).score(targets, name="t")
    local = worker.make_trak(None).fit(data, worker.checkpoints()).score(targets)
    assert np.array_equal(remote.scores, local.scores)
    assert np.array_equal(dt.Attributions.load(url, "t").scores, remote.scores)
