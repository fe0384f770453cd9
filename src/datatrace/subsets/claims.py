"""Claims on rows of a subset table, so that concurrent runners never compute the same row.

A claim is a small JSON record stored at ``<prefix>/<row>/<generation>``, created *exclusively*
(the store's ``set_if_not_exists``) and read back to learn who won. A runner that finds a row's
latest claim alive leaves the row alone. A claim is *stale* when its holder is known to be gone:

- the holder ran on this machine (same host name and boot id) and its process no longer exists
  (or the pid now belongs to a later process, or a zombie); this is how a run killed by SIGKILL is
  taken over at once;
- the holder ran in this process but no longer holds it (an interrupted run in a notebook);
- its last renewal is older than the lease (``lease_s``): the holder's machine may have died.
  Holders renew their claims from a background thread every ``lease_s / RENEWALS_PER_LEASE``.

A stale claim at generation ``g`` is taken over by creating generation ``g + 1`` exclusively, so
when two runners resume the same row at once only one of them gets it.

Exclusive creation is atomic on a local disk (zarr's ``LocalStore`` links a finished temporary
file into place), in memory (one process), and on S3/GCS/Azure through zarr's ``ObjectStore``
(conditional put). zarr's ``FsspecStore`` implements it as "exists, then write", which two runners
can both pass: for such stores the claim is read back after ``settle_s`` so that the later
writer's record is the one both see, which narrows but does not close the race (see
docs/subsets.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zarr.storage
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

# How often a holder renews its claims within one lease: a renewal can be late by up to
# (1 - 1/RENEWALS_PER_LEASE) of a lease before anyone takes the row over.
RENEWALS_PER_LEASE = 4
# For stores without atomic exclusive creation: wait this long between writing a claim and
# reading it back, so that a concurrent claimant's write has landed (object stores answer writes
# in well under a second).
NON_ATOMIC_SETTLE_S = 1.0
# Stores on which set_if_not_exists is atomic across processes.
ATOMIC_STORES: tuple[type, ...] = (zarr.storage.LocalStore,)
ATOMIC_STORE_NAMES = ("ObjectStore",)  # zarr's obstore-backed store, imported only if used
# Stores on which it is atomic within one process only.
IN_PROCESS_STORES: tuple[type, ...] = (zarr.storage.MemoryStore,)

# Tokens of the claims this process holds: a record with this host and pid whose token is not
# here belongs to an earlier, interrupted run in this process and is stale.
_HELD_TOKENS: set[str] = set()
_HELD_LOCK = threading.Lock()


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def host_id() -> str:
    """This machine: host name and boot id (a pid means nothing after a reboot)."""
    boot = _read("/proc/sys/kernel/random/boot_id") or "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


def process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux), ``None`` if unknown."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # Fields after the command name (which may contain spaces and parentheses): state is the
    # first, starttime the 20th.
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[19]) if len(fields) > 19 else None


def process_alive(pid: int, start: int | None) -> bool:
    """Whether ``pid`` is a live (non-zombie) process that started at ``start`` (if known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _read(f"/proc/{pid}/stat")
    if stat is not None:
        fields = stat.rsplit(")", 1)[-1].split()
        if fields and fields[0] in ("Z", "X"):
            return False
    return start is None or process_start(pid) in (None, start)


@dataclass(frozen=True)
class Claim:
    """A claim held by this process on one row."""

    row: int
    generation: int
    token: str
    record: dict[str, Any]


def store_is_atomic(zarr_store: zarr.abc.store.Store) -> bool:
    """Whether exclusive creation in ``zarr_store`` is atomic across processes."""
    return isinstance(zarr_store, ATOMIC_STORES) or type(zarr_store).__name__ in ATOMIC_STORE_NAMES


class RowClaims:
    """Exclusive, renewable, take-over-able claims on rows, kept in a zarr store.

    Args:
        zarr_store: the store holding the claims.
        prefix: key prefix of the claims, e.g. ``"subsets/name/claims/held"``.
        lease_s: a claim not renewed for this long is stale (seconds).
        settle_s: wait between creating and reading back a claim; ``None``: 0 on stores with
            atomic exclusive creation, :data:`NON_ATOMIC_SETTLE_S` on others.
    """

    def __init__(
        self,
        zarr_store: zarr.abc.store.Store,
        prefix: str,
        lease_s: float,
        settle_s: float | None = None,
    ):
        if lease_s <= 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self.zarr_store = zarr_store
        self.prefix = prefix.rstrip("/")
        self.lease_s = lease_s
        self.atomic = store_is_atomic(zarr_store) or isinstance(zarr_store, IN_PROCESS_STORES)
        self.settle_s = (
            (0.0 if self.atomic else NON_ATOMIC_SETTLE_S) if settle_s is None else settle_s
        )
        self.host = host_id()
        self.pid = os.getpid()
        self._prototype = default_buffer_prototype()

    # -- store access ----------------------------------------------------------------------

    def _key(self, row: int, generation: int) -> str:
        return f"{self.prefix}/{row}/{generation}"

    def _get(self, key: str) -> dict[str, Any] | None:
        buffer = sync(self.zarr_store.get(key, prototype=self._prototype))
        if buffer is None:
            return None
        try:
            return json.loads(buffer.to_bytes())
        except ValueError:
            return None  # a torn write on a non-atomic store: treat as absent

    def _put(self, key: str, record: dict[str, Any], exclusive: bool) -> None:
        buffer = self._prototype.buffer.from_bytes(json.dumps(record).encode())
        try:
            if exclusive:
                sync(self.zarr_store.set_if_not_exists(key, buffer))
            else:
                sync(self.zarr_store.set(key, buffer))
        except OSError:
            # Where writes are not atomic, a failed write (a full disk) may leave a torn record:
            # it reads as nobody's claim, yet its key is taken, so the row could never be
            # claimed again. A readable record (another runner's) is left alone.
            with contextlib.suppress(OSError):  # the error raised is the write's
                if self._get(key) is None:
                    sync(self.zarr_store.delete(key))
            raise

    def _list(self, prefix: str) -> list[str]:
        async def collect() -> list[str]:
            return [key async for key in self.zarr_store.list_dir(prefix)]

        return sync(collect())

    def generations(self, row: int) -> list[int]:
        """Generations of the claims recorded for ``row``, ascending."""
        return sorted(int(name) for name in self._list(f"{self.prefix}/{row}") if name.isdigit())

    def latest(self, row: int) -> tuple[int, dict[str, Any]] | None:
        """``(generation, record)`` of the latest claim on ``row``, or ``None``."""
        for generation in reversed(self.generations(row)):
            record = self._get(self._key(row, generation))
            if record is not None:
                return generation, record
        return None

    # -- claiming --------------------------------------------------------------------------

    def is_stale(self, record: dict[str, Any], now: float | None = None) -> bool:
        """Whether the holder of ``record`` is gone (see the module's docstring)."""
        now = time.time() if now is None else now
        if now - float(record.get("renewed", 0.0)) > self.lease_s:
            return True
        if record.get("host") != self.host:
            return False
        pid = int(record.get("pid", -1))
        if pid == self.pid:
            with _HELD_LOCK:
                return record.get("token") not in _HELD_TOKENS
        return not process_alive(pid, record.get("pid_start"))

    def acquire(self, row: int) -> Claim | None:
        """Claim ``row`` if nobody alive holds it; ``None`` if someone does (or won the race)."""
        return self.acquire_many([row]).get(row)

    def acquire_many(self, rows: list[int]) -> dict[int, Claim]:
        """Claim each of ``rows`` that nobody alive holds; returns the claims won, by row.

        All claims are written first and read back after one settle delay, so that stores
        without atomic exclusive creation pay the delay once per batch, not once per row.
        """
        attempts = []
        for row in rows:
            latest = self.latest(row)
            if latest is not None and not self.is_stale(latest[1]):
                continue
            generation = 0 if latest is None else latest[0] + 1
            now = time.time()
            record = {
                "token": uuid.uuid4().hex,
                "host": self.host,
                "pid": self.pid,
                "pid_start": process_start(self.pid),
                "started": now,
                "renewed": now,
                "taken_over": None if latest is None else latest[1].get("token"),
            }
            self._put(self._key(row, generation), record, exclusive=True)
            attempts.append((row, generation, record))
        if attempts and self.settle_s:
            time.sleep(self.settle_s)
        won = {}
        for row, generation, record in attempts:
            written = self._get(self._key(row, generation))
            if written is not None and written.get("token") == record["token"]:
                with _HELD_LOCK:
                    _HELD_TOKENS.add(record["token"])
                won[row] = Claim(row, generation, record["token"], record)
        return won

    def is_current(self, claim: Claim) -> bool:
        """Whether ``claim`` is still the row's latest claim (nobody took it over)."""
        latest = self.latest(claim.row)
        return latest is not None and latest[1].get("token") == claim.token

    def renew(self, claim: Claim) -> None:
        """Refresh the renewal time of ``claim`` (its own key; a take-over uses a new one)."""
        self._put(
            self._key(claim.row, claim.generation),
            {**claim.record, "renewed": time.time()},
            exclusive=False,
        )

    def release(self, claim: Claim) -> None:
        """Give up ``claim`` (the row is done, or failed and free again).

        Deletes its record and those of the earlier, stale generations it took over; a later
        generation (someone who took this claim over) is left alone.
        """
        with _HELD_LOCK:
            _HELD_TOKENS.discard(claim.token)
        for generation in self.generations(claim.row):
            if generation <= claim.generation:
                sync(self.zarr_store.delete(self._key(claim.row, generation)))

    def holders(self) -> dict[int, dict[str, Any]]:
        """Latest claim record of every row that has one, with ``"stale"`` added."""
        rows = sorted(int(name) for name in self._list(self.prefix) if name.isdigit())
        found = {}
        now = time.time()
        for row in rows:
            latest = self.latest(row)
            if latest is not None:
                found[row] = {
                    **latest[1],
                    "generation": latest[0],
                    "stale": self.is_stale(latest[1], now),
                }
        return found


class Renewer:
    """A background thread that renews the claims a runner holds until stopped."""

    def __init__(self, claims: RowClaims):
        self.claims = claims
        self.held: dict[int, Claim] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="datatrace-claims", daemon=True)

    def __enter__(self) -> Renewer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def add(self, claim: Claim) -> None:
        with self._lock:
            self.held[claim.row] = claim

    def remove(self, claim: Claim) -> None:
        with self._lock:
            self.held.pop(claim.row, None)

    def _loop(self) -> None:
        interval = self.claims.lease_s / RENEWALS_PER_LEASE
        while not self._stop.wait(interval):
            # The lock is held for the whole pass, so once remove() returns the claim is never
            # renewed again: a late renewal must not recreate a released claim's key.
            with self._lock:
                for claim in self.held.values():
                    try:
                        self.claims.renew(claim)
                    except Exception:  # a failed renewal is retried next interval
                        continue
