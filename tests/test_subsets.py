"""Subset experiments: masks, resumption after SIGKILL, concurrent runners, process pool, Ray."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from datatrace.store import Store, StoreMismatchError
from datatrace.subsets import (
    LocalBackend,
    RowClaims,
    SubsetExperiment,
    SubsetRowError,
    random_masks,
    train_seed,
)
from datatrace.subsets.claims import host_id

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
import _subsets_worker as toy  # noqa: E402

# -- masks ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_train", "alpha"), [(40, 0.5), (101, 0.3), (7, 1.0), (9, 0.0)])
def test_random_masks_have_exact_sizes_and_are_deterministic(n_train, alpha):
    masks = random_masks(n_train, 12, alpha, seed=5)
    assert masks.shape == (12, n_train) and masks.dtype == bool
    assert (masks.sum(1) == round(alpha * n_train)).all()
    assert np.array_equal(masks, random_masks(n_train, 12, alpha, seed=5))


def test_random_mask_rows_do_not_depend_on_how_many_are_drawn():
    many = random_masks(50, 20, seed=1)
    assert np.array_equal(random_masks(50, 8, seed=1), many[:8])
    assert np.array_equal(random_masks(50, 12, seed=1, start=8), many[8:])
    assert not np.array_equal(random_masks(50, 8, seed=2), many[:8])
    # Rows are distinct subsets and every example is in about half of them.
    assert len({row.tobytes() for row in many}) == 20
    assert 0.1 < random_masks(50, 400, seed=1).mean(0).min()


def test_random_masks_reject_bad_settings():
    with pytest.raises(ValueError, match="alpha"):
        random_masks(10, 2, alpha=1.5)
    with pytest.raises(ValueError, match="n_train"):
        random_masks(0, 2)


# -- running in this process -------------------------------------------------------------------


def run_toy(store, **kwargs):
    model = toy.Additive(**kwargs)
    return toy.experiment(store).run(model.train, model.evaluate, progress=False)


def check_toy_outputs(experiment):
    """Every row's stored outputs and seeds against an independent computation."""
    results = experiment.results(reduce=None)
    assert len(results) == toy.N_MASKS
    for position, row in enumerate(results.rows):
        seeds = [train_seed(toy.SEED, row, repeat) for repeat in range(toy.N_SEEDS)]
        assert results.seeds[position].tolist() == seeds
        expected = toy.expected_outputs(results.masks[position], seeds)
        np.testing.assert_allclose(results.outputs[position], expected, rtol=1e-5, atol=1e-5)


def test_run_writes_every_row_and_reruns_skip_them(tmp_path):
    log = tmp_path / "calls"
    experiment = run_toy(tmp_path / "store", log=str(log))
    assert experiment.completed.all()
    assert np.array_equal(experiment.masks, random_masks(toy.N_TRAIN, toy.N_MASKS, 0.5, toy.SEED))
    check_toy_outputs(experiment)
    mean = experiment.results()
    np.testing.assert_allclose(
        mean.outputs, experiment.results(reduce=None).outputs.mean(1), rtol=1e-6
    )
    assert sorted(toy.logged_seeds(log)) == sorted(experiment.results().seeds.ravel().tolist())

    again = run_toy(tmp_path / "store", log=str(log))
    assert again.last_run_.computed == [] and again.last_run_.already_done == toy.N_MASKS
    assert len(toy.logged_seeds(log)) == toy.N_MASKS * toy.N_SEEDS


def test_rows_argument_and_incomplete_results(tmp_path):
    model = toy.Additive()
    experiment = toy.experiment(tmp_path / "store")
    experiment.run(model.train, model.evaluate, rows=[3, 1, 3], progress=False)
    assert experiment.last_run_.computed == [1, 3]
    assert np.flatnonzero(experiment.completed).tolist() == [1, 3]
    everything = experiment.results(complete_only=False)
    assert everything.outputs.shape == (toy.N_MASKS, toy.N_OUTPUTS)
    assert np.isnan(everything.outputs[0]).all() and not np.isnan(everything.outputs[1]).any()
    with pytest.raises(ValueError, match="rows must be in"):
        experiment.run(model.train, model.evaluate, rows=[toy.N_MASKS], progress=False)


def test_extend_appends_rows_of_the_same_stream(tmp_path):
    experiment = toy.experiment(tmp_path / "store")
    before = experiment.masks
    experiment.extend(6)
    assert experiment.n_rows == toy.N_MASKS + 6
    assert np.array_equal(experiment.masks[: toy.N_MASKS], before)
    expected = random_masks(toy.N_TRAIN, toy.N_MASKS + 6, toy.ALPHA, toy.SEED)
    assert np.array_equal(experiment.masks, expected)
    # Reopening with more masks than stored extends too; with fewer keeps them all.
    reopened = SubsetExperiment(
        tmp_path / "store",
        toy.NAME,
        n_train=toy.N_TRAIN,
        n_outputs=toy.N_OUTPUTS,
        n_masks=3,
        alpha=toy.ALPHA,
        seed=toy.SEED,
        n_seeds=toy.N_SEEDS,
        description={"task": "additive toy"},
    )
    assert reopened.n_rows == toy.N_MASKS + 6
    with pytest.raises(ValueError, match="has random masks"):
        reopened.extend(masks=expected[:2])


def test_explicit_masks_are_checked_and_appended(tmp_path):
    masks = random_masks(10, 4, seed=9)

    def explicit(given):
        return SubsetExperiment(tmp_path / "s", "explicit", n_train=10, n_outputs=1, masks=given)

    assert np.array_equal(explicit(masks).masks, masks)
    assert np.array_equal(explicit(masks[:2]).masks, masks)  # a prefix opens the table
    more = random_masks(10, 2, seed=10)
    assert np.array_equal(explicit(np.vstack([masks, more])).masks, np.vstack([masks, more]))
    other = masks.copy()
    other[1] = ~other[1]
    with pytest.raises(StoreMismatchError, match="rows \\[1\\] differ"):
        explicit(other)
    opened = SubsetExperiment.open(tmp_path / "s", "explicit")
    assert opened.n_rows == 6 and opened.provenance["masks"] == "explicit"


@pytest.mark.parametrize(
    "change",
    [{"seed": 4}, {"n_seeds": 3}, {"alpha": 0.25}, {"n_outputs": 6}, {"description": {"x": 1}}],
)
def test_a_table_made_differently_is_refused_before_any_write(tmp_path, change):
    toy.experiment(tmp_path / "store")
    settings = {
        "n_train": toy.N_TRAIN,
        "n_outputs": toy.N_OUTPUTS,
        "n_masks": toy.N_MASKS,
        "alpha": toy.ALPHA,
        "seed": toy.SEED,
        "n_seeds": toy.N_SEEDS,
        "description": {"task": "additive toy"},
    }
    files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*"))
    with pytest.raises(StoreMismatchError, match=next(iter(change))):
        SubsetExperiment(tmp_path / "store", toy.NAME, **{**settings, **change})
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*")) == files


def test_open_unknown_and_bad_names():
    store = Store()
    with pytest.raises(KeyError, match="no subset experiment"):
        SubsetExperiment.open(store, "missing")
    with pytest.raises(ValueError, match="give n_masks"):
        SubsetExperiment(store, "new", n_train=3, n_outputs=1)
    with pytest.raises(ValueError, match="invalid experiment name"):
        SubsetExperiment(store, "../x", n_train=3, n_outputs=1, n_masks=1)


def test_wrong_output_shape_is_reported_and_nothing_is_marked_done():
    experiment = SubsetExperiment(None, "shape", n_train=5, n_outputs=3, n_masks=2)
    with pytest.raises(SubsetRowError, match="n_outputs=3"):
        experiment.run(lambda indices, seed: None, lambda model: np.zeros(4), progress=False)
    assert not experiment.completed.any()


def test_driver_retries_failed_rows_and_keeps_finished_ones(tmp_path):
    failing = toy.Additive(fail_once_dir=str(tmp_path))
    experiment = toy.experiment(None)
    with pytest.raises(SubsetRowError, match="planned failure"):
        experiment.run(failing.train, failing.evaluate, progress=False)
    assert not experiment.completed.any()  # row 0 failed first; no claim left behind
    assert experiment.claims().holders() == {}
    # Every seed fails once, so a row of two seeds fails twice: it needs two retries.
    for marker in tmp_path.iterdir():
        marker.unlink()
    retried = toy.experiment(None)
    with pytest.raises(SubsetRowError, match="after 1 retries"):
        retried.run(failing.train, failing.evaluate, backend=LocalBackend(max_retries=1))
    retried.run(failing.train, failing.evaluate, backend=LocalBackend(max_retries=2), progress=0)
    assert retried.completed.all()
    assert retried.last_run_.retried == toy.N_SEEDS * (toy.N_MASKS - 1)
    check_toy_outputs(retried)


# -- claims -----------------------------------------------------------------------------------


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def put_claim(claims: RowClaims, row: int, **record):
    claims._put(claims._key(row, 0), {"token": "old", "renewed": time.time(), **record}, True)


def test_claims_are_exclusive_and_stale_ones_are_taken_over_once(tmp_path):
    store = Store(tmp_path / "s")
    claims = RowClaims(store.zarr_store, "claims", lease_s=60)
    assert claims.atomic
    first = claims.acquire(0)
    assert first is not None and claims.acquire(0) is None  # live holder: this runner
    claims.release(first)
    assert claims.acquire(0) is not None

    # A claim of a process that died on this machine is stale; 8 threads race to take it over.
    put_claim(claims, 1, host=host_id(), pid=dead_pid())
    won = []
    barrier = threading.Barrier(8)

    def take():
        barrier.wait()
        won.append(RowClaims(store.zarr_store, "claims", lease_s=60).acquire(1))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(claim is not None for claim in won) == 1
    assert claims.generations(1) == [0, 1]

    # Another machine's claim is alive until its lease runs out.
    put_claim(claims, 2, host="elsewhere/boot", pid=1)
    assert claims.acquire(2) is None
    put_claim(claims, 3, host="elsewhere/boot", pid=1, renewed=time.time() - 120)
    assert claims.acquire(3) is not None


def test_claims_are_renewed_while_held(tmp_path):
    store = Store(tmp_path / "s")
    claims = RowClaims(store.zarr_store, "claims", lease_s=0.4)
    from datatrace.subsets.claims import Renewer

    with Renewer(claims) as renewer:
        claim = claims.acquire(0)
        renewer.add(claim)
        time.sleep(1.0)  # 2.5 leases: without renewals the claim would be stale
        assert not claims.is_stale(claims.latest(0)[1])
        assert claims.is_current(claim)
        renewer.remove(claim)
        claims.release(claim)
    assert claims.latest(0) is None


# -- other processes: SIGKILL and concurrent runners -------------------------------------------


def done_rows(store: Path) -> np.ndarray:
    try:
        return zarr.open_group(str(store), mode="r")[f"subsets/{toy.NAME}/done"][:].astype(bool)
    except (FileNotFoundError, KeyError, ValueError):
        return np.zeros(0, bool)


def worker(store, log, delay, *barrier):
    return subprocess.Popen(
        [sys.executable, str(TESTS / "_subsets_worker.py"), str(store), str(log), str(delay)]
        + [str(path) for path in barrier],
        cwd=TESTS,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_a_run_killed_with_sigkill_resumes_without_recomputing_finished_rows(tmp_path):
    store, first_log, second_log = tmp_path / "store", tmp_path / "first", tmp_path / "second"
    process = worker(store, first_log, 0.1)
    # Kill after a few rows, in the middle of a row: an odd number of train() calls means the
    # row's first seed has started and its second has not, so the row is claimed and unfinished.
    deadline = time.time() + 120
    while process.poll() is None and time.time() < deadline:
        calls = len(toy.logged_seeds(first_log))
        if calls >= 9 and calls % 2 == 1:
            break
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = done_rows(store)
    assert 3 <= finished.sum() < toy.N_MASKS, "the run must be killed midway"
    experiment = toy.experiment(store)
    before = experiment.results(reduce=None)
    holders = experiment.claims().holders()
    assert len(holders) == 1 and next(iter(holders.values()))["stale"]
    assert next(iter(holders.values()))["pid"] == process.pid

    resumed = run_toy(store, log=str(second_log))
    assert resumed.completed.all()
    assert resumed.last_run_.taken_over == 1
    assert sorted(resumed.last_run_.computed) == np.flatnonzero(~finished).tolist()
    after = resumed.results(reduce=None)
    assert np.array_equal(after.outputs[before.rows], before.outputs)  # finished rows untouched
    check_toy_outputs(resumed)
    seeds = resumed.results().seeds
    first, second = toy.logged_seeds(first_log), toy.logged_seeds(second_log)
    for row in range(toy.N_MASKS):
        calls_first = sum(first.count(seed) for seed in seeds[row])
        calls_second = sum(second.count(seed) for seed in seeds[row])
        if finished[row]:
            assert (calls_first, calls_second) == (toy.N_SEEDS, 0), row
        else:
            assert calls_second == toy.N_SEEDS, row
    assert resumed.claims().holders() == {}


def test_two_concurrent_runners_compute_every_row_exactly_once(tmp_path):
    """Two runners started at the same moment create the table together and share its rows."""
    store, ready, go = tmp_path / "store", tmp_path / "ready", tmp_path / "go"
    logs = [tmp_path / "log0", tmp_path / "log1"]
    processes = [worker(store, log, 0.05, f"{ready}{i}", go) for i, log in enumerate(logs)]
    deadline = time.time() + 120
    while not all(Path(f"{ready}{i}").exists() for i in range(2)) and time.time() < deadline:
        time.sleep(0.01)
    go.touch()
    outputs = [process.communicate(timeout=180)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    computed = [json.loads(output.strip().splitlines()[-1])["computed"] for output in outputs]
    assert sorted(computed[0] + computed[1]) == list(range(toy.N_MASKS))
    assert computed[0] and computed[1], "both runners must have done some of the work"
    experiment = toy.experiment(store)
    assert experiment.completed.all()
    check_toy_outputs(experiment)
    calls = toy.logged_seeds(*logs)
    for row_seeds in experiment.results().seeds:
        assert sum(calls.count(seed) for seed in row_seeds) == toy.N_SEEDS
    assert len(calls) == toy.N_MASKS * toy.N_SEEDS
    assert experiment.claims().holders() == {}


# -- backends ---------------------------------------------------------------------------------


def store_contents(experiment):
    group = experiment.group
    return {name: group[name][:] for name in ("masks", "outputs", "train_seeds", "done")}


def assert_same_contents(left, right):
    for name in left:
        assert np.array_equal(left[name], right[name], equal_nan=True), name


def test_process_pool_gives_the_same_store_as_in_process(tmp_path):
    in_process = run_toy(tmp_path / "local")
    model = toy.Additive()
    pooled = toy.experiment(tmp_path / "pool").run(
        model.train, model.evaluate, backend=LocalBackend(processes=2), progress=False
    )
    assert_same_contents(store_contents(in_process), store_contents(pooled))


def test_process_pool_refuses_unpicklable_functions():
    experiment = SubsetExperiment(None, "lambda", n_train=4, n_outputs=1, n_masks=1)
    with pytest.raises(ValueError, match="module-level function"):
        experiment.run(lambda i, s: i, lambda m: [0.0], backend=LocalBackend(processes=1))


# -- Ray --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance (2 CPUs) for the module's Ray tests: it takes seconds to start."""
    ray = pytest.importorskip("ray")
    # The toy model lives in a test helper that Ray's workers cannot import: send it by value.
    ray.cloudpickle.register_pickle_by_value(toy)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(toy)


@pytest.mark.slow
def test_ray_backend_gives_the_same_store_as_local(tmp_path, ray_session):
    from datatrace.subsets import RayBackend

    in_process = run_toy(tmp_path / "local")
    model = toy.Additive()
    on_ray = toy.experiment(tmp_path / "ray").run(
        model.train, model.evaluate, backend=RayBackend(num_cpus=1), progress=False
    )
    assert sorted(on_ray.last_run_.computed) == list(range(toy.N_MASKS))
    assert_same_contents(store_contents(in_process), store_contents(on_ray))
    assert on_ray.claims().holders() == {}


@pytest.mark.slow
def test_ray_retries_failed_tasks(tmp_path, ray_session):
    from datatrace.subsets import RayBackend

    masks = random_masks(toy.N_TRAIN, 3, seed=11)
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()

    def table(name):
        return SubsetExperiment(
            tmp_path / "store",
            name,
            n_train=toy.N_TRAIN,
            n_outputs=toy.N_OUTPUTS,
            masks=masks,
            n_seeds=toy.N_SEEDS,
        )

    # Each seed fails on its first call, so each row's task fails twice before it succeeds.
    failing = toy.Additive(fail_once_dir=str(tmp_path / "first"))
    retried = table("retried").run(
        failing.train, failing.evaluate, backend=RayBackend(max_retries=2), progress=False
    )
    assert retried.completed.all()
    assert len(list((tmp_path / "first").iterdir())) == 3 * toy.N_SEEDS  # the failures happened
    for position, row in enumerate(retried.results(reduce=None).rows):
        expected = toy.expected_outputs(masks[row], retried.row_seeds(row))
        np.testing.assert_allclose(retried.results(reduce=None).outputs[position], expected, 1e-5)

    failing = toy.Additive(fail_once_dir=str(tmp_path / "second"))
    with pytest.raises(SubsetRowError, match="planned failure"):
        table("not_retried").run(
            failing.train, failing.evaluate, backend=RayBackend(max_retries=1), progress=False
        )


def test_ray_missing_says_how_to_install(monkeypatch):
    from datatrace.subsets import RayBackend

    monkeypatch.setitem(sys.modules, "ray", None)
    experiment = SubsetExperiment(None, "no-ray", n_train=4, n_outputs=1, n_masks=1)
    with pytest.raises(ImportError, match=r'pip install "datatrace\[ray\]"'):
        experiment.run(toy.Additive().train, toy.Additive().evaluate, backend=RayBackend())
