"""Featurizing on a backend (datatrace.grads.distributed): local processes, Ray, killed workers
and drivers, partial Grams, and stores written before partial Grams."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import _distributed_featurize as toy
from datatrace.grads.distributed import CLAIM_CHECKPOINTS  # claim row = chunk · this + checkpoint
from datatrace.store import Store
from datatrace.subsets import LocalBackend

TESTS = Path(__file__).parent


def contents(store_path) -> dict[str, np.ndarray]:
    """Every array of the features of a store (features, Q, hashes, marks, Grams)."""
    root = zarr.open_group(str(store_path), mode="r")
    found = {}
    for checkpoint in ("0", "1"):
        group = root[f"features/{checkpoint}"]
        for name in ("features", "out_to_loss", "example_hash", "done", "gram"):
            found[f"{checkpoint}/{name}"] = group[name][:]
    return found


def assert_identical(left, right):
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].dtype == right[name].dtype, name
        assert np.array_equal(left[name], right[name]), name  # bit for bit


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The store one process writes (and its TRAK), with one torch thread like the workers."""
    path = tmp_path_factory.mktemp("reference") / "store"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trak = toy.make_trak(path).fit(toy.train_data(), toy.checkpoints())
    finally:
        torch.set_num_threads(threads)
    return path, trak


@pytest.fixture(scope="module")
def pool():
    """Two worker processes, kept for the module's tests (starting them takes seconds)."""
    backend = LocalBackend(processes=2, max_retries=1)
    yield backend
    backend.shutdown()


def test_two_local_processes_write_the_store_one_process_writes(tmp_path, reference, pool):
    trak = toy.make_trak(tmp_path / "store").fit(toy.train_data(), toy.checkpoints(), backend=pool)
    assert_identical(contents(reference[0]), contents(tmp_path / "store"))
    targets = toy.train_data()[0][:5], toy.train_data()[1][:5]
    np.testing.assert_array_equal(trak.score(targets).scores, reference[1].score(targets).scores)
    # Claims are released, partial Grams folded into the gram.
    assert not list((tmp_path / "store" / "features/0/partial_gram").rglob("c/*/*/*"))
    assert not list((tmp_path / "store" / "features" / "claims").rglob("held/*/*"))


def test_the_gradient_baselines_featurize_on_a_backend(tmp_path, reference, pool):
    from datatrace import GradientDot

    def baseline(store, backend=None):
        return GradientDot(
            toy.make_trak(None).model, toy.Planted(), proj_dim=toy.PROJ_DIM, store=store,
            batch_size=toy.BATCH, chunk_size=toy.CHUNK, progress=False,
        ).fit(toy.train_data(), toy.checkpoints(), backend=backend)  # fmt: skip

    on_pool = baseline(tmp_path / "pool", pool)
    in_process = baseline(reference[0])  # the features are there: nothing is recomputed
    targets = toy.train_data()[0][:5], toy.train_data()[1][:5]
    np.testing.assert_array_equal(on_pool.score(targets).scores, in_process.score(targets).scores)


def test_a_worker_killed_mid_chunk_is_retried_and_the_store_is_identical(tmp_path, reference, pool):
    marker = tmp_path / "killed"
    task = toy.Planted(marker=str(marker), kill_row=40, driver_pid=os.getpid())
    toy.make_trak(tmp_path / "store", task).fit(toy.train_data(), toy.checkpoints(), backend=pool)
    assert marker.exists(), "a worker must have been killed"
    assert_identical(contents(reference[0]), contents(tmp_path / "store"))


def test_a_driver_killed_with_sigkill_is_taken_over(tmp_path, reference):
    store = tmp_path / "store"
    process = subprocess.Popen(
        [sys.executable, str(TESTS / "_distributed_featurize.py"), str(store), "0.15"], cwd=TESTS
    )
    deadline = time.time() + 120
    done = 0
    while process.poll() is None and time.time() < deadline:
        try:
            done = int(zarr.open_group(str(store), mode="r")["features/0/done"][:].sum())
        except (FileNotFoundError, KeyError, ValueError):
            done = 0
        if done >= 2:
            break
        time.sleep(0.05)
    time.sleep(0.2)  # in the middle of the next chunk (each takes 2 × 0.15 s)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert 2 <= done < 96 // toy.CHUNK, "the driver must be killed midway"
    held = list((store / "features" / "claims" / "held").glob("*/*"))
    # One chunk computes while the previous one is written: the killed driver held the claims of
    # the chunk it computed and of at most one being written (whose mark may be down already).
    assert 1 <= len(held) <= 2, "the killed driver held the claims of the chunks in flight"
    marks = zarr.open_group(str(store), mode="r")["features/0/done"][:]
    unfinished = [path for path in held if not marks[int(path.parent.name) // CLAIM_CHECKPOINTS]]

    from datatrace.grads import distributed

    stats = {}
    original = distributed.featurize_chunks

    def recording(*args, **kwargs):
        stats["run"] = original(*args, **kwargs)
        return stats["run"]

    distributed.featurize_chunks = recording
    try:
        toy.make_trak(store).fit(
            toy.train_data(), toy.checkpoints(), backend=LocalBackend(processes=0)
        )
    finally:
        distributed.featurize_chunks = original
    assert stats["run"].taken_over == len(unfinished) >= 1
    assert_identical(contents(reference[0]), contents(store))


def test_partial_grams_add_up_to_the_gram_numpy_computes(tmp_path):
    trak = toy.make_trak(tmp_path / "store")
    features = __import__("datatrace._estimator", fromlist=["x"]).gradient_features(trak)
    stored = features.featurize_train(
        toy.train_data(), toy.checkpoints(), Store(tmp_path / "store")
    )
    for part in stored:
        phi = part.features[:].astype(np.float64)
        partials = [part.stored_partial_gram(chunk) for chunk in range(part.n_chunks)]
        for chunk, partial in enumerate(partials):
            start, stop = part.rows(chunk)
            np.testing.assert_allclose(partial, phi[start:stop].T @ phi[start:stop], rtol=1e-12)
        np.testing.assert_allclose(sum(partials), phi.T @ phi, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(part.gram(), phi.T @ phi, rtol=1e-10, atol=1e-12)
        # Folded into the gram, then deleted.
        assert all(part.stored_partial_gram(chunk) is None for chunk in range(part.n_chunks))


def test_a_store_written_without_partial_grams_still_fits(tmp_path, reference):
    """Stores of earlier versions have no partial_gram: the gram is read from the features."""
    store = tmp_path / "store"
    trak = toy.make_trak(store)
    features = __import__("datatrace._estimator", fromlist=["x"]).gradient_features(trak)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        features.featurize_train(toy.train_data(), toy.checkpoints(), Store(store))
    finally:
        torch.set_num_threads(threads)
    root = zarr.open_group(str(store), mode="a")
    for checkpoint in ("0", "1"):
        del root[f"features/{checkpoint}/partial_gram"]
    refit = toy.make_trak(store).fit(toy.train_data(), toy.checkpoints())
    assert_identical(contents(reference[0]), contents(store))  # the same bits, read from Φ
    targets = toy.train_data()[0][:4], toy.train_data()[1][:4]
    np.testing.assert_array_equal(refit.score(targets).scores, reference[1].score(targets).scores)


def test_partial_grams_are_checked_by_verify(tmp_path):
    from datatrace.store.verify import verify_store

    store = tmp_path / "store"
    trak = toy.make_trak(store)
    features = __import__("datatrace._estimator", fromlist=["x"]).gradient_features(trak)
    features.featurize_train(toy.train_data(), toy.checkpoints()[:1], Store(store))
    chunk = next((store / "features/0/partial_gram/c/2").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = verify_store(store)
    assert [(p.array, p.chunk) for p in report.problems] == [("features/0/partial_gram", (2, 0, 0))]
    verify_store(store, repair=True)
    assert not verify_store(store).problems
    # The repaired chunk is featurized again, with its partial Gram.
    refit = toy.make_trak(store).fit(toy.train_data(), toy.checkpoints()[:1])
    phi = refit._stored[0].features[:].astype(np.float64)
    np.testing.assert_allclose(refit._stored[0].gram(), phi.T @ phi, rtol=1e-10, atol=1e-12)


# -- Ray --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance (2 CPUs): it takes seconds to start."""
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(toy)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(toy)


def test_ray_writes_the_store_one_process_writes(tmp_path, reference, ray_session):
    from datatrace.subsets import RayBackend

    toy.make_trak(tmp_path / "store").fit(
        toy.train_data(), toy.checkpoints(), backend=RayBackend(num_cpus=1)
    )
    assert_identical(contents(reference[0]), contents(tmp_path / "store"))


def test_in_process_writes_overlap_the_next_chunks_computation(tmp_path, monkeypatch, reference):
    from datatrace.grads import distributed
    from datatrace.store.store import CheckpointFeatures

    spans = {"compute": [], "write": []}
    compute, write = distributed.featurize_chunk, CheckpointFeatures.write

    def timed(kind, function):
        def run(*args, **kwargs):
            start = time.perf_counter()
            time.sleep(0.05)  # long enough that overlapping spans cannot be missed
            try:
                return function(*args, **kwargs)
            finally:
                spans[kind].append((start, time.perf_counter()))

        return run

    monkeypatch.setattr(distributed, "featurize_chunk", timed("compute", compute))
    monkeypatch.setattr(CheckpointFeatures, "write", timed("write", write))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        toy.make_trak(tmp_path / "store").fit(toy.train_data(), toy.checkpoints())
    finally:
        torch.set_num_threads(threads)
    overlapping = [
        (w, c) for w in spans["write"] for c in spans["compute"] if w[0] < c[1] and c[0] < w[1]
    ]
    assert len(spans["write"]) == len(spans["compute"]) > 2
    assert overlapping, "every store write waited for the next chunk's computation"
    # The same bits as a run without the delays (the reference).
    assert_identical(contents(reference[0]), contents(tmp_path / "store"))


def test_chunks_are_computed_in_the_callers_torch_state(tmp_path, monkeypatch):
    from datatrace.grads import distributed

    seen = []
    compute = distributed.ChunkWorker.compute

    def recording_compute(self, job):
        seen.append(torch.is_autocast_enabled("cpu"))
        return compute(self, job)

    monkeypatch.setattr(distributed.ChunkWorker, "compute", recording_compute)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        toy.make_trak(tmp_path / "store").fit(toy.train_data(), toy.checkpoints())
    assert seen and all(seen), seen


def test_a_failed_store_write_is_raised_and_the_chunk_stays_pending(tmp_path, monkeypatch):
    from datatrace.store.store import CheckpointFeatures

    write, calls = CheckpointFeatures.write, []

    def failing_write(self, chunk, *args, **kwargs):
        calls.append(chunk)
        if len(calls) == 2:
            raise OSError("disk full")
        return write(self, chunk, *args, **kwargs)

    monkeypatch.setattr(CheckpointFeatures, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        toy.make_trak(tmp_path / "store").fit(toy.train_data(), toy.checkpoints())
    done = zarr.open_group(str(tmp_path / "store"), mode="r")["features/0/done"][:]
    assert done[0] == 1 and done[1] == 0
