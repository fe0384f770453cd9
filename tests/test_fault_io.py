"""Faults of the storage: the disk fills up in the middle of a write, two writers write one chunk.
Each case ends with "nothing lost": the store still opens and every earlier result is unchanged."""

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr.storage
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
from fsspec.implementations.local import LocalFileSystem
from torch import nn

import datatrace as dt
import datatrace.subsets.claims
from datatrace.grads.featurize import GradientFeatures
from datatrace.store import Store, verify_store
from datatrace.subsets import SubsetExperiment

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
import _subsets_worker as toy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

N_TRAIN, N_TARGETS, CHUNK = 300, 10, 64
N_CHUNKS = -(-N_TRAIN // CHUNK)
# Where each store kind keeps its objects: zarr's local store (atomic writes), fsspec's local
# filesystem (the path of file:// URLs and object storage; nothing left by a failed write), and
# the same with torn writes (a failed write leaves part of its bytes, as a full local disk does).
KINDS = ("local", "fsspec", "fsspec-torn")


class Disk:
    """A disk that fills up: from the first write of a key ending in ``full_from`` on, every write
    fails with ENOSPC (deletes still work) until :meth:`make_space`.

    Args:
        full_from: the key (its end) whose write finds the disk full; ``None``: never full.
        torn: a failing write leaves the first half of its bytes behind (fsspec stores only).
    """

    def __init__(self, full_from: str | None = None, torn: bool = False):
        self.full_from = full_from
        self.torn = torn
        self.full = False
        self.lock = threading.Lock()  # zarr writes from its event loop and from worker threads

    def admit(self, key: str) -> None:
        with self.lock:
            if self.full_from is not None and key.endswith(self.full_from):
                self.full = True
            if self.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)

    def make_space(self) -> None:
        self.full_from, self.full = None, False


class FullDiskStore(zarr.storage.LocalStore):
    """zarr's local store, writing to a :class:`Disk`."""

    def __init__(self, root, *, read_only: bool = False, disk: Disk):
        super().__init__(root, read_only=read_only)
        self.disk = disk

    def with_read_only(self, read_only: bool = False) -> "FullDiskStore":
        return type(self)(self.root, read_only=read_only, disk=self.disk)

    async def set(self, key, value) -> None:
        self.disk.admit(key)
        await super().set(key, value)

    async def set_if_not_exists(self, key, value) -> None:
        self.disk.admit(key)
        await super().set_if_not_exists(key, value)


class FullDiskFileSystem(LocalFileSystem):
    """fsspec's local filesystem, writing to a :class:`Disk`."""

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        try:
            self.disk.admit(path)
        except OSError:
            if self.disk.torn:
                super().pipe_file(path, value[: len(value) // 2], mode=mode, **kwargs)
            raise
        super().pipe_file(path, value, mode=mode, **kwargs)


def open_on(kind: str, path: Path, disk: Disk) -> Store:
    """A store at ``path`` whose writes go to ``disk``; a plain ``Store(path)`` reads it too."""
    if kind == "local":
        return Store(FullDiskStore(path, disk=disk))
    filesystem = FullDiskFileSystem(auto_mkdir=True, skip_instance_cache=True)
    filesystem.disk = disk
    disk.torn = kind == "fsspec-torn"
    wrapped = AsyncFileSystemWrapper(filesystem, asynchronous=True)
    return Store(zarr.storage.FsspecStore(wrapped, path=str(path)))


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


SETTINGS = {"proj_dim": 32, "chunk_size": CHUNK, "batch_size": CHUNK, "progress": False}


def trak(model, store):
    return dt.TRAK(model, dt.Classification(), store=store, **SETTINGS)


@pytest.fixture(scope="module")
def problem():
    """(model, train, targets, reference scores, reference stored arrays) of a fresh fit."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(N_TRAIN + N_TARGETS, 8, generator=generator)
    labels = torch.randint(0, 3, (N_TRAIN + N_TARGETS,), generator=generator)
    train = (inputs[:N_TRAIN], labels[:N_TRAIN])
    targets = (inputs[N_TRAIN:], labels[N_TRAIN:])
    model = make_model()
    fresh = trak(model, None).fit(train)
    stored = {
        name: fresh.store_.root[f"features/0/{name}"][:]
        for name in ("features", "out_to_loss", "example_hash")
    }
    return model, train, targets, fresh.score(targets).scores, stored


@pytest.fixture()
def featurized_rows(monkeypatch) -> list[int]:
    """Training and target rows featurized from now on (one entry per batch)."""
    rows = []
    original = GradientFeatures.featurize

    def counting(self, state, batch, checkpoint):
        rows.append(len(batch[1]))
        return original(self, state, batch, checkpoint)

    monkeypatch.setattr(GradientFeatures, "featurize", counting)
    return rows


def finished_rows(path: Path, finished: int) -> dict[str, np.ndarray]:
    """The stored arrays of the first ``finished`` row chunks, read (checked) from ``path``."""
    store = Store(path, read_only=True)
    return {
        name: store.checked(store.root[f"features/0/{name}"])[: finished * CHUNK]
        for name in ("features", "out_to_loss", "example_hash")
    }


# Writes that find the disk full → row chunks finished before.
FIT_MOMENTS = {
    "features of chunk 2": ("features/0/features/c/2/0", 2),
    "example hashes of chunk 2": ("features/0/example_hash/c/2", 2),
    "mark of chunk 2": ("features/0/done/c/2", 2),
    "kernel": ("features/0/gram/c/0/0", N_CHUNKS),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("moment", FIT_MOMENTS)
def test_full_disk_during_fit_raises_keeps_finished_chunks_and_resumes(
    problem, tmp_path, kind, moment, featurized_rows
):
    model, train, targets, scores, reference = problem
    key, finished = FIT_MOMENTS[moment]
    path = tmp_path / "store"
    disk = Disk(full_from=key)
    store = open_on(kind, path, disk)
    with pytest.raises(OSError) as error:
        trak(model, store).fit(train)
    assert error.value.errno == errno.ENOSPC  # the disk's own error, not another one

    # The store still opens; the chunk whose write failed is not marked done, earlier ones are
    # intact; what verify finds is at most the torn object of the write that failed.
    reopened = Store(path, read_only=True)
    done = reopened.checked(reopened.root["features/0/done"], marks=True)[:]
    assert done.tolist() == [1] * finished + [0] * (N_CHUNKS - finished)
    before = finished_rows(path, finished)
    for name, values in before.items():
        np.testing.assert_array_equal(values, reference[name][: finished * CHUNK], err_msg=name)
    problems = [(problem.array, problem.chunk) for problem in verify_store(reopened).problems]
    torn_array, _, torn_chunk = key.rpartition("/c/")
    if kind == "fsspec-torn" and not torn_array.endswith("done"):
        expected = [(torn_array, tuple(int(part) for part in torn_chunk.split("/")))]
        assert problems == expected
    else:
        assert problems == []

    # With space again, the same store resumes: only unfinished chunks are featurized, the
    # finished ones are unchanged, and the scores are those of a fresh fit.
    disk.make_space()
    featurized_rows.clear()
    resumed = trak(model, store).fit(train)
    assert sum(featurized_rows) == N_TRAIN - min(finished * CHUNK, N_TRAIN)
    np.testing.assert_array_equal(resumed.score(targets).scores, scores)
    for name, values in finished_rows(path, finished).items():
        np.testing.assert_array_equal(values, before[name], err_msg=name)
    assert verify_store(path).clean


@pytest.mark.parametrize("kind", KINDS)
def test_full_disk_while_saving_scores_keeps_saved_ones_and_saves_again(problem, tmp_path, kind):
    """The disk fills up at the last data write of a save (before it is marked complete)."""
    model, train, targets, scores, _ = problem
    path = tmp_path / "store"
    disk = Disk()
    fitted = trak(model, open_on(kind, path, disk)).fit(train)
    fitted.score(targets, name="first")
    first = Store(path, read_only=True).load_attributions("first")

    disk.full_from = "scores/second/out_to_loss/c/0"
    with pytest.raises(OSError) as error:
        fitted.score(targets, name="second")
    assert error.value.errno == errno.ENOSPC

    reopened = Store(path, read_only=True)
    with pytest.raises(KeyError, match="no attributions named 'second'"):
        reopened.load_attributions("second")  # never served half-saved
    again = reopened.load_attributions("first")
    np.testing.assert_array_equal(again.scores, first.scores)
    np.testing.assert_array_equal(again.out_to_loss, first.out_to_loss)
    problems = verify_store(reopened).problems  # the features are sound, the save unfinished
    assert all(problem.array.startswith("scores/second") for problem in problems)
    assert ("scores/second", "is incomplete: its save was interrupted") in {
        (problem.array, problem.problem) for problem in problems
    }

    disk.make_space()
    fitted.score(targets, name="second")
    reread = Store(path, read_only=True)
    np.testing.assert_array_equal(reread.load_attributions("second").scores, scores)
    np.testing.assert_array_equal(reread.load_attributions("first").scores, first.scores)
    assert verify_store(path).clean


@pytest.fixture(scope="module")
def toy_results():
    """The toy subset experiment run in memory without a fault."""
    model = toy.Additive()
    return toy.experiment(None).run(model.train, model.evaluate, progress=False).results(None)


@pytest.mark.parametrize("kind", ["local", "fsspec-torn"])
@pytest.mark.parametrize("key", ["outputs/c/7/0/0", "done/c/7", "claims/held/7/0"])
def test_full_disk_during_subset_run_keeps_finished_rows_and_resumes(
    tmp_path, kind, key, monkeypatch, toy_results
):
    # fsspec's local filesystem has no atomic exclusive creation: claims would wait 1 s each
    monkeypatch.setattr(datatrace.subsets.claims, "NON_ATOMIC_SETTLE_S", 0.0)
    model = toy.Additive()
    path = tmp_path / "store"
    disk = Disk()
    store = open_on(kind, path, disk)
    experiment = toy.experiment(store)
    experiment.run(model.train, model.evaluate, rows=range(5), progress=False)
    before = experiment.results(reduce=None)

    disk.full_from = f"subsets/{toy.NAME}/{key}"
    with pytest.raises(OSError) as error:
        experiment.run(model.train, model.evaluate, progress=False)
    assert error.value.errno == errno.ENOSPC  # not a SubsetRowError: the user's code did not fail

    reopened = SubsetExperiment.open(Store(path, read_only=True), toy.NAME)
    assert np.flatnonzero(reopened.completed).tolist() == list(range(7))  # rows 5, 6 finished
    after = reopened.results(reduce=None)
    for field in ("masks", "outputs", "rows", "seeds"):
        np.testing.assert_array_equal(getattr(after, field)[:5], getattr(before, field))
    assert reopened.claims().holders() == {}  # no claim left for the next run to wait out
    problems = verify_store(path).problems  # at most the torn object of row 7
    assert all(problem.chunk is not None and problem.chunk[0] == 7 for problem in problems)
    if kind == "local":
        assert problems == []

    # wait=False: a row left claimed would fail the test rather than be waited for forever
    disk.make_space()
    resumed = toy.experiment(store).run(model.train, model.evaluate, progress=False, wait=False)
    assert resumed.last_run_.computed == list(range(7, toy.N_MASKS))
    results = resumed.results(reduce=None)
    for field in ("masks", "outputs", "rows", "seeds"):
        np.testing.assert_array_equal(getattr(results, field), getattr(toy_results, field))
    assert verify_store(path).clean


# -- two writers on one chunk -----------------------------------------------------------------

# Waits for GO to exist, fits TRAK with SETTINGS (JSON) on the model and training set in PROBLEM
# (torch.save) into STORE, then writes every row chunk again REPEATS times, as overlapping shards
# would.
FIT_WHEN_GO = """
import json, os, sys, time
import torch
import datatrace as dt
torch.set_num_threads(1)
store, problem, settings, repeats, ready, go = sys.argv[1:7]
saved = torch.load(problem, weights_only=False)
estimator = dt.TRAK(saved["model"], dt.Classification(), store=store, **json.loads(settings))
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
estimator.fit(saved["train"])
opened = dt.Store(store)
group = opened.root["features/0"]
(n_rows, dim), (chunk_rows, _) = group["features"].shape, group["features"].chunks
part = opened.checkpoint_features(0, n_rows, dim, chunk_rows, dict(group.attrs["identity"]))
for _ in range(int(repeats)):
    for chunk in range(part.n_chunks):
        rows = slice(*part.rows(chunk))
        part.write(chunk, part.features[rows], part.out_to_loss[rows],
                   example_hashes=part.example_hash[rows])
"""


def start_together(tmp_path: Path, script: str, arguments: list[list[str]]) -> list:
    """One process per argument list running ``script`` (with READY and GO appended), let go at
    the same moment once all are ready."""
    go = tmp_path / "go"
    processes, readies = [], []
    for index, extra in enumerate(arguments):
        readies.append(tmp_path / f"ready{index}")
        command = [sys.executable, "-c", script, *extra, str(readies[-1]), str(go)]
        processes.append(subprocess.Popen(command, cwd=TESTS))
    deadline = time.time() + 120
    while not all(ready.exists() for ready in readies):
        assert time.time() < deadline, "the writers did not start"
        assert all(process.poll() is None for process in processes), "a writer failed to start"
        time.sleep(0.01)
    go.touch()
    return processes


def test_two_processes_writing_every_chunk_of_one_store_while_it_is_read(
    problem, tmp_path, featurized_rows
):
    """Two fits of one run into one new store at the same moment, each then writing every chunk
    again: both create the store and write every chunk. Every chunk this process reads meanwhile
    is the chunk, the store is sound, and its scores are those of a single writer."""
    model, train, targets, scores, reference = problem
    path = tmp_path / "store"
    saved = tmp_path / "problem.pt"
    torch.save({"model": model, "train": train}, saved)
    arguments = [str(path), str(saved), json.dumps(SETTINGS), "10"]
    processes = start_together(tmp_path, FIT_WHEN_GO, [arguments, arguments])
    reads = 0
    while any(process.poll() is None for process in processes):
        if not (path / "features/0/done/zarr.json").exists():
            time.sleep(0.01)
            continue  # the arrays are not all created yet (the marks are created last)
        store = Store(path, read_only=True)
        done = store.checked(store.root["features/0/done"], marks=True)[:]
        features = store.checked(store.root["features/0/features"])
        for chunk in np.flatnonzero(done):
            rows = slice(chunk * CHUNK, (chunk + 1) * CHUNK)
            np.testing.assert_array_equal(features[rows], reference["features"][rows])
            reads += 1
        time.sleep(0.01)  # leave the cores to the writers
    assert [process.wait() for process in processes] == [0, 0]
    assert reads > 0
    assert verify_store(path).clean
    fitted = trak(model, path).fit(train)
    assert featurized_rows == []  # both writers finished every chunk
    np.testing.assert_array_equal(fitted.score(targets).scores, scores)


def test_a_write_in_flight_in_another_process_is_not_taken_for_a_chunk(
    problem, tmp_path, featurized_rows
):
    """zarr's local store writes an object to ``<key>.<id>.partial`` and renames it: while
    another process writes chunk 1, its temporary objects are listed beside the chunks."""
    model, train, targets, scores, _ = problem
    path = tmp_path / "store"
    trak(model, path).fit(train, shard=(0, 2))  # chunks 0, 2 and 4
    for key in ("features/c/1/0", "out_to_loss/c/1", "example_hash/c/1", "done/c/1"):
        temporary = path / f"features/0/{key}.0123456789abcdef.partial"
        temporary.parent.mkdir(parents=True, exist_ok=True)  # as zarr's local store does
        temporary.write_bytes(b"half")
    featurized_rows.clear()
    fitted = trak(model, path).fit(train)
    assert sum(featurized_rows) == 2 * CHUNK  # chunks 1 and 3
    np.testing.assert_array_equal(fitted.score(targets).scores, scores)
    assert verify_store(path).clean
