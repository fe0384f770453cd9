"""Featurizing on a backend: row chunks × checkpoints spread over local processes or Ray.

The same division of labour as subset training (:mod:`datatrace.subsets.runner`): the driver reads
each chunk's examples, claims the chunk (:class:`~datatrace.subsets.claims.RowClaims`), hands it to
a worker of the backend (:class:`~datatrace.subsets.LocalBackend` process pool or
:class:`~datatrace.subsets.RayBackend` task), and writes what comes back — features, ``Q``, example
hashes and the chunk's partial Gram — then the chunk's completion mark, then releases the claim.
Workers never touch the store, so it has one writer per driver and works on any filesystem the
driver reaches (a local disk, object storage through fsspec).

Failures. A worker that raises or dies is retried as the backend says (``max_retries``: by the
driver for a process pool, whose broken pool is restarted; by Ray itself). A driver that dies
(SIGKILL, a lost machine) leaves its claims behind: another driver on the same store takes its
unfinished chunks over at once on the same machine (the holder's process is gone), after the lease
elsewhere. Chunks are computed deterministically, so whoever computes a chunk writes the same
bits: a store featurized by any number of workers equals the one a single process writes.

What workers receive. The gradient features (model, task, projector) and the checkpoints are sent
once per worker process (a temporary file for a process pool, Ray's object store for Ray); each
job carries only its chunk's examples, read by the driver.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import functools
import os
import pickle
import tempfile
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import zarr.errors

from datatrace.data import Examples
from datatrace.grads.checkpoints import Checkpoint
from datatrace.grads.featurize import ChunkResult, GradientFeatures, featurize_chunk
from datatrace.grads.heap import steady_heap
from datatrace.methods.kernel import uses_dual
from datatrace.progress import progress_bar
from datatrace.store import CheckpointFeatures, Store
from datatrace.store.verify import create_array
from datatrace.subsets.backends import (
    RAY_ROWS_PER_SLOT,
    Backend,
    LocalBackend,
    RayBackend,
    check_picklable,
    import_ray,
    resolve_backend,
)
from datatrace.subsets.claims import Claim, Renewer, RowClaims

# Where the claims on feature chunks live: keys under a placeholder array (as for subset tables),
# claim of (checkpoint c, chunk i) at CLAIMS_PREFIX/<i * CLAIM_CHECKPOINTS + c>/<generation>.
CLAIMS_ARRAY = "features/claims"
CLAIMS_PREFIX = f"{CLAIMS_ARRAY}/held"
# Checkpoints a claim's row number has room for: the numbering must not depend on how many
# chunks or checkpoints a store holds, which grow (added examples, more checkpoints).
CLAIM_CHECKPOINTS = 1 << 16
# A claim not renewed for this long is taken over by a driver on another machine (seconds);
# one on this machine is taken over as soon as its holder's process is gone.
DEFAULT_LEASE_S = 600.0
# How often the driver looks for finished chunks (seconds).
DEFAULT_POLL_S = 0.05
# Chunks in flight per worker process: one computing, one queued, so that a worker does not wait
# while the driver writes the previous chunk and reads the next one's examples.
CHUNKS_PER_PROCESS = 2


class FeaturizeChunkError(RuntimeError):
    """Featurizing a row chunk failed on the backend (after its retries)."""


@dataclass(frozen=True)
class ChunkJob:
    """One row chunk under one checkpoint.

    Attributes:
        checkpoint: the checkpoint's index.
        chunk: the row chunk's index in the store.
        batches: ``(first_row, past_last_row, batch)`` of each gradient batch of the chunk.
        with_gram: compute the partial Gram too.
    """

    checkpoint: int
    chunk: int
    batches: tuple[tuple[int, int, Any], ...]
    with_gram: bool


@dataclass
class FeaturizeStats:
    """What one featurization run on a backend did.

    Attributes:
        computed: ``(checkpoint, chunk)`` written by this run, in the order they finished.
        by_others: chunks finished by other drivers meanwhile.
        taken_over: chunks whose stale claim (of a dead driver) this run took over.
        retried: failed attempts retried by the driver.
        seconds: wall time.
    """

    computed: list[tuple[int, int]] = field(default_factory=list)
    by_others: int = 0
    taken_over: int = 0
    retried: int = 0
    seconds: float = 0.0


class ChunkWorker:
    """Computes :class:`ChunkJob` s; sent once to each worker process.

    Args:
        features: the gradient features (a copy without cached state is sent).
        checkpoints: every checkpoint, by index.
        use_gpu: compute on the worker's GPU (a Ray worker given ``num_gpus``) when the features'
            device is the CPU.
    """

    def __init__(
        self, features: GradientFeatures, checkpoints: Sequence[Checkpoint], use_gpu: bool = False
    ):
        self.features = features
        self.checkpoints = list(checkpoints)
        self.use_gpu = use_gpu
        self._state: tuple[int, dict[str, torch.Tensor]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        features = copy.copy(self.features)
        features._prepared = None  # the driver's cached checkpoint is not sent
        features.progress = False
        return {**self.__dict__, "features": features, "_state": None}

    def compute(self, job: ChunkJob) -> ChunkResult:
        if self.use_gpu and self.features.device.type == "cpu" and torch.cuda.is_available():
            self.features.device = torch.device("cuda")
        if self._state is None or self._state[0] != job.checkpoint:
            self._state = None  # let the previous checkpoint go first
            self._state = (job.checkpoint, self.features.load(self.checkpoints[job.checkpoint]))
        steady_heap()  # once per process: the driver's (in-process session) or a worker's
        return featurize_chunk(
            self.features, self._state[1], job.checkpoint, job.batches, job.with_gram
        )


# -- sessions: one per backend kind ------------------------------------------------------------

# The worker of this process, by token (a pool's processes and Ray's workers outlive a run).
_WORKER: tuple[str, ChunkWorker] | None = None


def _cached_worker(token: str, load) -> ChunkWorker:
    global _WORKER
    if _WORKER is None or _WORKER[0] != token:
        _WORKER = None
        _WORKER = (token, load())
    return _WORKER[1]


def _compute_in_pool(path: str, token: str, job: ChunkJob) -> ChunkResult:
    def load() -> ChunkWorker:
        with open(path, "rb") as file:
            return pickle.load(file)

    return _cached_worker(token, load).compute(job)


def _compute_on_ray(reference: list, token: str, job: ChunkJob) -> ChunkResult:
    import ray

    return _cached_worker(token, lambda: ray.get(reference[0])).compute(job)


class _Session:
    """Submit jobs, wait for them, read their results (the shape of the subset sessions)."""

    capacity = 1
    driver_retries = 0

    def submit(self, job: ChunkJob) -> Any:
        raise NotImplementedError

    def wait(self, handles: list[Any], timeout: float) -> list[Any]:
        finished, _ = concurrent.futures.wait(
            handles, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
        )
        return list(finished)

    def result(self, handle: Any) -> ChunkResult:
        return handle.result()

    def close(self, unfinished: Sequence[Any] = ()) -> None:
        for handle in unfinished:
            handle.cancel()


class _InProcessSession(_Session):
    """Chunks computed in the caller's thread, one at a time (the store writes of the previous
    one run meanwhile on :class:`_StoreWrites`' thread)."""

    def __init__(self, worker: ChunkWorker, max_retries: int):
        self.worker = worker
        self.driver_retries = max_retries

    def submit(self, job):
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(self.worker.compute(job))
        except Exception as error:  # reported by result(), like the other sessions
            future.set_exception(error)
        return future


class _StoreWrites:
    """The driver's store writes, on one thread, one at a time: the next chunk is computed (in
    this process, or collected from workers) while the last one is written — torch's kernels
    and zarr's codecs and writes run without the GIL. Computing stays in the caller's thread,
    with its torch state and its memory; the writes only encode arrays already computed.

    ``submit(write, then)`` waits for the previous write, runs its ``then`` (mark the chunk done,
    release its claim, advance the progress bar) in the caller's thread, and starts ``write``;
    ``close()`` does the same for the last one. A write's error is raised there."""

    def __init__(self):
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="datatrace-store-writes"
        )
        self.pending: tuple[concurrent.futures.Future, Callable[[], None]] | None = None

    def submit(self, write: Callable[[], None], then: Callable[[], None]) -> None:
        self.finish()
        self.pending = (self.executor.submit(write), then)

    def finish(self) -> None:
        if self.pending is not None:
            future, then = self.pending
            self.pending = None
            future.result()
            then()

    def close(self) -> None:
        try:
            self.finish()
        finally:
            self.executor.shutdown(wait=True)


class _PoolSession(_Session):
    def __init__(self, worker: ChunkWorker, backend: LocalBackend):
        self.backend = backend
        self.capacity = CHUNKS_PER_PROCESS * backend.processes
        self.driver_retries = backend.max_retries
        self.token = uuid.uuid4().hex
        handle, self.path = tempfile.mkstemp(prefix="datatrace-featurize-", suffix=".pickle")
        with os.fdopen(handle, "wb") as file:
            pickle.dump(worker, file)

    def submit(self, job):
        try:
            return self.backend.pool().submit(_compute_in_pool, self.path, self.token, job)
        except concurrent.futures.process.BrokenProcessPool:
            # A worker died (killed, out of memory): start a fresh pool for the retries.
            self.backend.shutdown()
            return self.backend.pool().submit(_compute_in_pool, self.path, self.token, job)

    def close(self, unfinished=()):
        super().close(unfinished)
        if os.path.exists(self.path):
            os.remove(self.path)


class _RaySession(_Session):
    def __init__(self, ray, worker: ChunkWorker, backend: RayBackend):
        self.ray = ray
        self.reference = [ray.put(worker)]  # in a list: resolved by the worker once, not per task
        self.token = uuid.uuid4().hex
        self.task = ray.remote(_compute_on_ray).options(**backend.task_options())
        self.capacity = backend.max_in_flight or RAY_ROWS_PER_SLOT * backend.slots(
            ray.cluster_resources()
        )

    def submit(self, job):
        return self.task.remote(self.reference, self.token, job)

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
        del self.reference


def open_session(backend: Backend | None, worker: ChunkWorker) -> _Session:
    """A session computing chunks with ``worker`` on ``backend`` (``None``: in this process)."""
    if backend is None:
        return _InProcessSession(worker, 0)
    if isinstance(backend, LocalBackend):
        if backend.processes == 0:
            return _InProcessSession(worker, backend.max_retries)
        check_picklable("the model, task and checkpoints", worker, repr(backend))
        return _PoolSession(worker, backend)
    if isinstance(backend, RayBackend):
        ray = import_ray()
        check_picklable("the model, task and checkpoints", worker, "RayBackend")
        if not ray.is_initialized():
            ray.init(address=backend.address, **backend.init_kwargs)
        worker.use_gpu = backend.num_gpus > 0
        return _RaySession(ray, worker, backend)
    raise TypeError(
        f"featurization runs on a LocalBackend or a RayBackend, got {type(backend).__name__}"
    )


# -- the driver -------------------------------------------------------------------------------


def chunk_claims(store: Store, lease_s: float = DEFAULT_LEASE_S) -> RowClaims:
    """The claims of drivers on the feature chunks of ``store`` (created on first use)."""
    if CLAIMS_ARRAY not in store.root:
        with contextlib.suppress(zarr.errors.ContainsArrayError):  # another driver made it
            create_array(
                store.root, CLAIMS_ARRAY, shape=(0,), dtype="uint8",
                attributes={"about": "claim records of featurizing drivers: held/<row>/<gen>"},
            )  # fmt: skip
    return RowClaims(store.zarr_store, CLAIMS_PREFIX, lease_s)


def featurize_chunks(
    features: GradientFeatures,
    train: Examples,
    data_offset: int,
    checkpoints: Sequence[Checkpoint],
    stored: Sequence[CheckpointFeatures],
    jobs: Sequence[tuple[int, int]],
    store: Store,
    backend: str | Backend | None = None,
    *,
    lease_s: float = DEFAULT_LEASE_S,
    poll_s: float = DEFAULT_POLL_S,
) -> FeaturizeStats:
    """Featurize the row chunks ``jobs`` (``(checkpoint, chunk)`` pairs) into ``stored``.

    Args:
        features: the gradient features.
        train: the examples; stored row ``r`` is example ``r - data_offset``.
        data_offset: the stored row of ``train``'s first example (0 for a fit; the first new row
            when examples are added, :func:`datatrace.methods.incremental.add_examples`).
        checkpoints: every checkpoint, by index.
        stored: the stored features of each checkpoint.
        jobs: what to compute, in this order (chunks done meanwhile are skipped).
        store: the store (for the claims).
        backend: ``None``: in this process, without claims (``shard=`` divides the work); else a
            :class:`~datatrace.subsets.LocalBackend` / :class:`~datatrace.subsets.RayBackend` or
            its name, with claims on the chunks.
        lease_s: claims of a driver on another machine are taken over after this long without
            renewal (seconds).
        poll_s: how often the driver looks for finished chunks (seconds).

    Returns:
        :class:`FeaturizeStats`.

    Raises:
        FeaturizeChunkError: with a backend, a chunk failed after its retries (finished chunks
            are kept); without one, the chunk's error itself (e.g.
            :class:`~datatrace.grads.featurize.NonFiniteError`).
    """
    started = time.perf_counter()
    stats = FeaturizeStats()
    backend = None if backend is None else resolve_backend(backend)
    pending = deque(jobs)
    if not pending:
        return stats
    with_gram = [not uses_dual(part.dim, part.n_train) for part in stored]
    claims = None if backend is None else chunk_claims(store, lease_s)

    def job(index: int, chunk: int) -> ChunkJob:
        start, stop = stored[index].rows(chunk)
        bounds = [
            (lo, min(lo + features.batch_size, stop))
            for lo in range(start, stop, features.batch_size)
        ]
        batches = tuple(
            (lo, hi, train.read(lo - data_offset, hi - data_offset)) for lo, hi in bounds
        )
        return ChunkJob(index, chunk, batches, with_gram[index])

    def rows(index: int, chunk: int) -> int:
        start, stop = stored[index].rows(chunk)
        return stop - start

    session = open_session(backend, ChunkWorker(features, checkpoints))
    held: dict[tuple[int, int], Claim] = {}
    in_flight: dict[Any, tuple[ChunkJob, int]] = {}
    waiting: list[tuple[int, int]] = []
    failure: tuple[ChunkJob, BaseException] | None = None
    total = sum(rows(*pair) for pair in pending)
    description = f"featurizing {len(checkpoints)} checkpoint(s)"
    with (
        progress_bar(total, description, features.progress) as advance,
        _renewer(claims) as renewer,
    ):

        def release(key: tuple[int, int]) -> None:
            claim = held.pop(key, None)
            if claim is not None:
                renewer.remove(claim)
                claims.release(claim)

        def write(key: tuple[int, int], result: ChunkResult) -> None:
            stored[key[0]].write(
                key[1],
                result.features,
                result.out_to_loss,
                example_hashes=result.example_hashes,
                partial_gram=result.partial_gram,
            )

        def written(key: tuple[int, int]) -> None:
            stats.computed.append(key)
            release(key)
            advance(rows(*key))

        writes = _StoreWrites()

        try:
            while pending or in_flight or (waiting and failure is None):
                while pending and failure is None and len(in_flight) < session.capacity:
                    batch = [
                        pending.popleft()
                        for _ in range(min(len(pending), session.capacity - len(in_flight)))
                    ]
                    won = (
                        {key: None for key in batch} if claims is None else _acquire(claims, batch)
                    )
                    for key in batch:
                        if key not in won:
                            waiting.append(key)
                            continue
                        if won[key] is not None:
                            held[key] = won[key]
                            renewer.add(won[key])
                            if won[key].record.get("taken_over"):
                                stats.taken_over += 1
                        if stored[key[0]].done[key[1]]:  # finished by another driver meanwhile
                            release(key)
                            stats.by_others += 1
                            advance(rows(*key))
                            continue
                        chunk_job = job(*key)
                        in_flight[session.submit(chunk_job)] = (chunk_job, 0)
                if in_flight:
                    for handle in session.wait(list(in_flight), timeout=poll_s):
                        chunk_job, attempt = in_flight.pop(handle)
                        key = (chunk_job.checkpoint, chunk_job.chunk)
                        try:
                            result = session.result(handle)
                        except Exception as error:  # user code may raise anything
                            if attempt < session.driver_retries:
                                stats.retried += 1
                                in_flight[session.submit(chunk_job)] = (chunk_job, attempt + 1)
                            else:
                                release(key)
                                failure = failure or (chunk_job, error)
                            continue
                        if claims is None or _still_ours(claims, held[key], key):
                            writes.submit(
                                functools.partial(write, key, result),
                                functools.partial(written, key),
                            )
                        else:
                            release(key)
                            advance(rows(*key))
                    continue
                if failure is not None:
                    break
                if waiting:  # held by live drivers: wait for them to finish or die
                    time.sleep(poll_s)
                    for key in waiting:
                        if stored[key[0]].done[key[1]]:
                            stats.by_others += 1
                            advance(rows(*key))
                        else:
                            pending.append(key)
                    waiting = []
        finally:
            try:
                writes.close()  # the last chunk's write completes (or raises) first
            finally:
                session.close(unfinished=list(in_flight))
                for key in list(held):
                    release(key)
    features._prepared = None  # let the checkpoint's tensors go
    stats.seconds = time.perf_counter() - started
    if failure is not None:
        chunk_job, error = failure
        if backend is None:
            raise error  # in this process, as featurizing always did: the error itself
        retries = f" after {session.driver_retries} retries" if session.driver_retries else ""
        raise FeaturizeChunkError(
            f"featurizing row chunk {chunk_job.chunk} under checkpoint {chunk_job.checkpoint} "
            f"failed{retries}: {type(error).__name__}: {error}\nChunks finished before are kept; "
            "rerun to resume."
        ) from error
    return stats


class _NoRenewer:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None

    def add(self, claim):
        pass

    def remove(self, claim):
        pass


def _renewer(claims: RowClaims | None):
    return _NoRenewer() if claims is None else Renewer(claims)


def _claim_row(key: tuple[int, int]) -> int:
    index, chunk = key
    if index >= CLAIM_CHECKPOINTS:
        raise ValueError(f"at most {CLAIM_CHECKPOINTS} checkpoints can be featurized on a backend")
    return chunk * CLAIM_CHECKPOINTS + index


def _acquire(claims: RowClaims, keys: list[tuple[int, int]]) -> dict[tuple[int, int], Claim]:
    won = claims.acquire_many([_claim_row(key) for key in keys])
    return {key: won[_claim_row(key)] for key in keys if _claim_row(key) in won}


def _still_ours(claims: RowClaims, claim: Claim, key: tuple[int, int]) -> bool:
    if claims.is_current(claim):
        return True
    # The lease ran out (e.g. the machine was suspended) and another driver took the chunk over:
    # it writes the chunk (the same values), so this result is dropped rather than written twice.
    warnings.warn(
        f"row chunk {key[1]} of checkpoint {key[0]} was taken over by another driver while this "
        "one computed it; keeping the other driver's result (increase lease_s if chunks take "
        "longer than the lease)",
        stacklevel=3,
    )
    return False
