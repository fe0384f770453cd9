"""Where subset models are trained: in this process, in a local process pool, or on Ray.

A backend only computes: it receives :class:`RowJob` s (a row's training indices and seeds), runs
the user's ``train`` and ``evaluate`` for each seed, and hands back a ``(n_seeds, n_outputs)``
array. The driver (:mod:`datatrace.subsets.runner`) claims rows and writes results into the store,
so workers never need access to the store's filesystem.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import pickle
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TrainFn = Callable[[np.ndarray, int], Any]
EvaluateFn = Callable[[Any], Any]


@dataclass(frozen=True)
class RowJob:
    """One row of a subset table to compute.

    Attributes:
        row: index of the row in the table.
        train_indices: ``(n_subset,)`` int64 training examples the models are trained on.
        seeds: one training seed per model of this row, ``(n_seeds,)``.
        n_outputs: length of the vector ``evaluate`` must return.
    """

    row: int
    train_indices: np.ndarray
    seeds: tuple[int, ...]
    n_outputs: int


def compute_row(train: TrainFn, evaluate: EvaluateFn, job: RowJob) -> np.ndarray:
    """Train and evaluate one model per seed of ``job``.

    Returns:
        ``(n_seeds, n_outputs)`` float32.

    Raises:
        ValueError: ``evaluate`` returned something that is not a vector of ``n_outputs`` values.
    """
    outputs = np.empty((len(job.seeds), job.n_outputs), dtype=np.float32)
    for position, seed in enumerate(job.seeds):
        model = train(job.train_indices, seed)
        outputs[position] = as_output_vector(evaluate(model), job.n_outputs)
    return outputs


def as_output_vector(values: Any, n_outputs: int) -> np.ndarray:
    """``values`` (numpy, torch, list) as a float32 ``(n_outputs,)`` array, or a ValueError."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float32)
    if array.shape != (n_outputs,):
        raise ValueError(
            f"evaluate(model) must return a vector of n_outputs={n_outputs} values (one per "
            f"target example), got shape {array.shape}"
        )
    return array


class Session(ABC):
    """A backend opened for one run: submit jobs, wait for them, read their results."""

    #: Rows in flight at once (the driver claims a row only when it can submit it).
    capacity: int = 1
    #: Times the driver resubmits a failed row (0 where the backend retries by itself).
    driver_retries: int = 0

    @abstractmethod
    def submit(self, job: RowJob) -> Any:
        """Start computing ``job``; returns a handle."""

    @abstractmethod
    def wait(self, handles: Sequence[Any], timeout: float) -> list[Any]:
        """The handles among ``handles`` that have finished (waiting at most ``timeout`` s)."""

    @abstractmethod
    def result(self, handle: Any) -> np.ndarray:
        """The ``(n_seeds, n_outputs)`` outputs of a finished job (raises the job's error)."""

    def close(self, unfinished: Sequence[Any] = ()) -> None:  # noqa: B027  optional hook
        """Release the backend's resources, cancelling the jobs of the ``unfinished`` handles."""


class Backend(ABC):
    """Settings of where subset models are trained; :meth:`open` starts a session."""

    @abstractmethod
    def open(self, train: TrainFn, evaluate: EvaluateFn) -> Session:
        """A session computing rows with the user's ``train`` and ``evaluate``."""


def check_picklable(name: str, function: Any, where: str) -> None:
    """Raise a ValueError that says how to fix it if ``function`` cannot be sent to ``where``."""
    try:
        pickle.dumps(function)
    except Exception as error:  # pickling raises many types
        raise ValueError(
            f"{name} ({function!r}) cannot be pickled, but {where} sends it to other processes: "
            "define it as a module-level function (or a method of a module-level class) in an "
            "importable module, not a lambda, a nested function or a notebook cell; or run "
            f"in-process with LocalBackend(processes=0). Pickling failed with: {error}"
        ) from None


# -- local ------------------------------------------------------------------------------------


class LocalBackend(Backend):
    """Train in this process (``processes=0``, the default) or in a pool of local processes.

    Args:
        processes: worker processes; 0 trains in this process, one row at a time. Workers are
            started with ``spawn`` (safe with torch and threads), so ``train`` and ``evaluate``
            must be picklable: module-level functions of an importable module. A script that
            uses processes must guard its entry point with ``if __name__ == "__main__":``.
        max_retries: times a failed row is retried before the run stops with its error.
        threads_per_process: torch threads in each worker process (0: leave torch's default,
            which oversubscribes the cores when several workers share them).

    The worker processes are started by the first run and kept for the next runs with this
    backend object (starting one imports torch and the user's code: seconds), until
    :meth:`shutdown` or until the backend is garbage-collected.
    """

    def __init__(self, processes: int = 0, max_retries: int = 0, threads_per_process: int = 1):
        if processes < 0 or max_retries < 0 or threads_per_process < 0:
            raise ValueError(
                "processes, max_retries and threads_per_process must be non-negative, got "
                f"{processes}, {max_retries}, {threads_per_process}"
            )
        self.processes = processes
        self.max_retries = max_retries
        self.threads_per_process = threads_per_process
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def __repr__(self) -> str:
        return (
            f"LocalBackend(processes={self.processes}, max_retries={self.max_retries}, "
            f"threads_per_process={self.threads_per_process})"
        )

    def pool(self) -> concurrent.futures.ProcessPoolExecutor:
        """The worker pool, started on first use and kept for later runs (see :meth:`shutdown`)."""
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.threads_per_process,),
            )
            self._finalizer = weakref.finalize(self, self._pool.shutdown, cancel_futures=True)
        return self._pool

    def shutdown(self) -> None:
        """Stop the worker processes (a later run starts new ones)."""
        if self._pool is not None:
            self._finalizer.detach()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def open(self, train: TrainFn, evaluate: EvaluateFn) -> Session:
        if self.processes == 0:
            return _InProcessSession(train, evaluate, self.max_retries)
        where = f"LocalBackend(processes={self.processes})"
        check_picklable("train", train, where)
        check_picklable("evaluate", evaluate, where)
        return _PoolSession(train, evaluate, self)


class _InProcessSession(Session):
    def __init__(self, train: TrainFn, evaluate: EvaluateFn, max_retries: int):
        self.train, self.evaluate = train, evaluate
        self.driver_retries = max_retries

    def submit(self, job: RowJob) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(compute_row(self.train, self.evaluate, job))
        except Exception as error:  # reported by result(), like other backends
            future.set_exception(error)
        return future

    def wait(self, handles, timeout):
        return [handle for handle in handles if handle.done()]

    def result(self, handle):
        return handle.result()


def _init_worker(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


class _PoolSession(Session):
    def __init__(self, train: TrainFn, evaluate: EvaluateFn, backend: LocalBackend):
        self.train, self.evaluate = train, evaluate
        self.backend = backend
        self.capacity = backend.processes
        self.driver_retries = backend.max_retries

    def submit(self, job):
        try:
            return self.backend.pool().submit(compute_row, self.train, self.evaluate, job)
        except concurrent.futures.process.BrokenProcessPool:
            # A worker died (e.g. killed for memory): start a fresh pool for the retries.
            self.backend.shutdown()
            return self.backend.pool().submit(compute_row, self.train, self.evaluate, job)

    def wait(self, handles, timeout):
        finished, _ = concurrent.futures.wait(
            handles, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
        )
        return list(finished)

    def result(self, handle):
        return handle.result()

    def close(self, unfinished=()):
        # The pool outlives the run (its workers have imported torch and the user's code); only
        # an interrupted run's queued jobs are cancelled.
        for handle in unfinished:
            handle.cancel()


# -- Ray --------------------------------------------------------------------------------------

# Rows kept in flight per task slot of the cluster: enough that a worker finishing a row finds the
# next one queued, while the driver holds claims only on rows about to be computed.
RAY_ROWS_PER_SLOT = 2


def import_ray():
    """The ``ray`` module, or an ImportError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError(
            'the Ray backend needs Ray: pip install "datatrace[ray]" (or use backend="local")'
        ) from None
    return ray


class RayBackend(Backend):
    """Train on a Ray cluster (or a local Ray instance): one Ray task per row.

    One task computes every seed of its row, so a row is retried, and written, as a unit, and
    per-task overhead (a few ms) is paid once per row. The driver writes results into the store;
    workers need neither the store nor its filesystem. ``train`` and ``evaluate`` are sent once
    through Ray's object store (``ray.put``), so functions that close over large data pay for it
    once, not per task.

    Args:
        num_cpus: CPUs requested per task (Ray also sets ``OMP_NUM_THREADS`` to it).
        num_gpus: GPUs requested per task (fractions share a GPU between tasks).
        max_retries: retries of a failed task, for exceptions raised by ``train``/``evaluate``
            and for crashed workers alike.
        address: cluster to connect to if Ray is not initialised yet (``"auto"``: the cluster
            this machine belongs to; ``"ray://host:10001"``: a remote one through Ray Client);
            ``None`` starts a local instance. If ``ray.init`` was already called, it is used.
        resources: custom resources requested per task, e.g. ``{"large_memory": 1}``.
        memory: bytes of memory to reserve per task (Ray's scheduling hint), or ``None``.
        max_in_flight: rows submitted at once; default ``RAY_ROWS_PER_SLOT`` × the number of tasks
            the cluster can run at once.
        runtime_env: Ray runtime environment for the tasks (e.g. ``{"pip": [...]}``,
            ``{"working_dir": "."}``) so that workers can import the user's module.
        init_kwargs: further keyword arguments for ``ray.init`` when this backend starts Ray.
    """

    def __init__(
        self,
        num_cpus: float = 1,
        num_gpus: float = 0,
        max_retries: int = 3,
        address: str | None = None,
        *,
        resources: dict[str, float] | None = None,
        memory: int | None = None,
        max_in_flight: int | None = None,
        runtime_env: dict[str, Any] | None = None,
        init_kwargs: dict[str, Any] | None = None,
    ):
        if num_cpus < 0 or num_gpus < 0 or max_retries < 0:
            raise ValueError(
                f"num_cpus, num_gpus and max_retries must be non-negative, got {num_cpus}, "
                f"{num_gpus}, {max_retries}"
            )
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.max_retries = max_retries
        self.address = address
        self.resources = dict(resources or {})
        self.memory = memory
        self.max_in_flight = max_in_flight
        self.runtime_env = runtime_env
        self.init_kwargs = dict(init_kwargs or {})

    def __repr__(self) -> str:
        return (
            f"RayBackend(num_cpus={self.num_cpus}, num_gpus={self.num_gpus}, "
            f"max_retries={self.max_retries}, address={self.address!r})"
        )

    def open(self, train: TrainFn, evaluate: EvaluateFn) -> Session:
        ray = import_ray()
        check_picklable("train", train, "RayBackend")
        check_picklable("evaluate", evaluate, "RayBackend")
        if not ray.is_initialized():
            ray.init(address=self.address, **self.init_kwargs)
        return _RaySession(ray, train, evaluate, self)

    def task_options(self) -> dict[str, Any]:
        """Options of each row's Ray task."""
        options: dict[str, Any] = {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "max_retries": self.max_retries,
            # Retry exceptions raised by the user's code too, not only crashed workers.
            "retry_exceptions": True,
        }
        if self.resources:
            options["resources"] = self.resources
        if self.memory is not None:
            options["memory"] = self.memory
        if self.runtime_env is not None:
            options["runtime_env"] = self.runtime_env
        return options

    def slots(self, cluster: dict[str, float]) -> int:
        """Tasks the cluster ``cluster`` (``ray.cluster_resources()``) can run at once."""
        limits = []
        if self.num_cpus:
            limits.append(cluster.get("CPU", 0) / self.num_cpus)
        if self.num_gpus:
            limits.append(cluster.get("GPU", 0) / self.num_gpus)
        for name, amount in self.resources.items():
            limits.append(cluster.get(name, 0) / amount)
        return max(1, int(min(limits)) if limits else 1)


def _compute_row_from_ref(functions: tuple[TrainFn, EvaluateFn], job: RowJob) -> np.ndarray:
    train, evaluate = functions
    return compute_row(train, evaluate, job)


class _RaySession(Session):
    def __init__(self, ray, train: TrainFn, evaluate: EvaluateFn, backend: RayBackend):
        self.ray = ray
        self.functions = ray.put((train, evaluate))
        self.task = ray.remote(_compute_row_from_ref).options(**backend.task_options())
        self.capacity = backend.max_in_flight or RAY_ROWS_PER_SLOT * backend.slots(
            ray.cluster_resources()
        )
        self.driver_retries = 0

    def submit(self, job):
        return self.task.remote(self.functions, job)

    def wait(self, handles, timeout):
        ready, rest = self.ray.wait(list(handles), num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        return ready

    def result(self, handle):
        return self.ray.get(handle)

    def close(self, unfinished=()):
        for handle in unfinished:
            self.ray.cancel(handle)
        del self.functions


def resolve_backend(backend: str | Backend) -> Backend:
    """A :class:`Backend` from a backend or its name (``"local"``, ``"processes"``, ``"ray"``)."""
    if isinstance(backend, Backend):
        return backend
    names = {
        "local": LocalBackend,
        "processes": lambda: LocalBackend(processes=multiprocessing.cpu_count()),
        "ray": RayBackend,
    }
    if backend not in names:
        raise ValueError(
            f"unknown backend {backend!r}: use one of {sorted(names)} or pass "
            "LocalBackend(...) / RayBackend(...)"
        )
    return names[backend]()
