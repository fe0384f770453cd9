"""The driver of a subset run: claim rows, hand them to a backend, write what comes back.

The driver is the only writer: it claims a row right before submitting it (so it holds claims
only on rows in flight), checks on return that nobody took the claim over, writes outputs and
seeds, then the row's ``done`` mark, then releases the claim. Whatever kills the driver (an
exception, Ctrl-C, SIGKILL), finished rows stay finished and unfinished ones are claimable again:
at once by a runner on the same machine, after the lease by one elsewhere.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from datatrace._arguments import positions
from datatrace.progress import progress_bar
from datatrace.subsets.backends import Backend, RowJob, as_output_vector, resolve_backend
from datatrace.subsets.claims import Claim, Renewer

if TYPE_CHECKING:
    from datatrace.subsets.experiment import SubsetExperiment


class SubsetRowError(RuntimeError):
    """Training or evaluating the models of a row failed (after its retries)."""


@dataclass
class RunStats:
    """What one :meth:`SubsetExperiment.run` did.

    Attributes:
        computed: rows this run trained and wrote, in the order they finished.
        already_done: rows that were finished when the run started.
        by_others: rows finished by other runners while this one ran.
        taken_over: rows whose stale claim (of a dead runner) this run took over.
        retried: failed attempts that were retried by the driver.
        seconds: wall time of the run.
    """

    computed: list[int] = field(default_factory=list)
    already_done: int = 0
    by_others: int = 0
    taken_over: int = 0
    retried: int = 0
    seconds: float = 0.0


def requested_rows(rows: Any, n_rows: int) -> np.ndarray:
    """Sorted unique row indices from ``rows`` (``None``: all), checked against ``n_rows``."""
    if rows is None:
        return np.arange(n_rows)
    if isinstance(rows, slice):
        return np.arange(n_rows)[rows]
    array = np.unique(positions(rows, n_rows, "rows"))
    if array.size and (array[0] < 0 or array[-1] >= n_rows):
        raise ValueError(f"rows must be in [0, {n_rows}), got {array[0]} … {array[-1]}")
    return array


def run_rows(
    experiment: SubsetExperiment,
    train,
    evaluate,
    backend: str | Backend,
    rows: Any,
    progress: bool,
    wait: bool,
    lease_s: float,
    poll_s: float,
) -> RunStats:
    """Compute every unfinished row of ``rows``; see :meth:`SubsetExperiment.run`."""
    started = time.perf_counter()
    stats = RunStats()
    backend = resolve_backend(backend)
    requested = requested_rows(rows, experiment.n_rows)
    arrays = experiment.row_arrays()
    done_array = arrays["done"]
    done_at_start = done_array[:].astype(bool)[requested] if requested.size else np.zeros(0, bool)
    stats.already_done = int(done_at_start.sum())
    pending = deque(int(row) for row in requested[~done_at_start])
    if not pending:
        stats.seconds = time.perf_counter() - started
        return stats
    masks = arrays["masks"]
    claims = experiment.claims(lease_s)

    def is_done(row: int) -> bool:
        return bool(done_array[row])

    def job(row: int) -> RowJob:
        return RowJob(
            row=row,
            train_indices=np.flatnonzero(masks[row]).astype(np.int64),
            seeds=tuple(experiment.row_seeds(row)),
            n_outputs=experiment.n_outputs,
        )

    session = backend.open(train, evaluate)
    held: dict[int, Claim] = {}
    in_flight: dict[Any, tuple[RowJob, int]] = {}
    waiting: list[int] = []
    failure: tuple[int, BaseException] | None = None
    description = f"subsets of {experiment.name!r}"
    with (
        progress_bar(len(pending), description, progress) as advance,
        Renewer(claims) as renewer,
    ):

        def release(row: int) -> None:
            claim = held.pop(row)
            renewer.remove(claim)
            claims.release(claim)

        try:
            while pending or in_flight or (wait and waiting and failure is None):
                while pending and failure is None and len(in_flight) < session.capacity:
                    batch = [
                        pending.popleft()
                        for _ in range(min(len(pending), session.capacity - len(in_flight)))
                    ]
                    won = claims.acquire_many(batch)
                    for row in batch:
                        if row not in won:
                            waiting.append(row)
                            continue
                        held[row] = won[row]
                        renewer.add(won[row])
                        if won[row].record.get("taken_over"):
                            stats.taken_over += 1
                        if is_done(row):  # finished by another runner since we last looked
                            release(row)
                            stats.by_others += 1
                            advance(1)
                            continue
                        row_job = job(row)
                        in_flight[session.submit(row_job)] = (row_job, 0)
                if in_flight:
                    for handle in session.wait(list(in_flight), timeout=poll_s):
                        row_job, attempt = in_flight.pop(handle)
                        try:
                            outputs = session.result(handle)
                        except Exception as error:  # user code may raise anything
                            if attempt < session.driver_retries:
                                stats.retried += 1
                                in_flight[session.submit(row_job)] = (row_job, attempt + 1)
                            else:
                                release(row_job.row)
                                failure = failure or (row_job.row, error)
                            continue
                        _write(experiment, arrays, claims, held[row_job.row], row_job, outputs)
                        release(row_job.row)
                        stats.computed.append(row_job.row)
                        advance(1)
                    continue
                if failure is not None:
                    break
                if waiting and wait:
                    time.sleep(poll_s)
                    for row in waiting:
                        if is_done(row):
                            stats.by_others += 1
                            advance(1)
                        else:
                            pending.append(row)
                    waiting = []
        finally:
            session.close(unfinished=list(in_flight))
            for row in list(held):
                release(row)
    stats.seconds = time.perf_counter() - started
    if failure is not None:
        row, error = failure
        raise SubsetRowError(
            f"row {row} of subset experiment {experiment.name!r} failed"
            f"{f' after {session.driver_retries} retries' if session.driver_retries else ''}: "
            f"{type(error).__name__}: {error}\nRows finished before are kept; rerun to resume."
        ) from error
    return stats


def _write(experiment, arrays, claims, claim: Claim, row_job: RowJob, outputs) -> None:
    if not claims.is_current(claim):
        # The lease ran out (e.g. the machine was suspended) and another runner took the row
        # over: it writes the row, so this result is dropped rather than written twice.
        warnings.warn(
            f"row {row_job.row} of {experiment.name!r} was taken over by another runner while "
            "this one computed it; keeping the other runner's result (increase lease_s if "
            "rows take longer than the lease)",
            stacklevel=3,
        )
        return
    outputs = np.asarray(outputs, dtype=np.float32)
    expected = (len(row_job.seeds), experiment.n_outputs)
    if outputs.shape != expected:
        outputs = np.stack([as_output_vector(o, experiment.n_outputs) for o in outputs])
    experiment.write_row(row_job.row, outputs, list(row_job.seeds), arrays)
