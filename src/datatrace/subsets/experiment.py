"""A store-backed table of subset masks and the outputs of models trained on them.

Layout, under ``<store>/subsets/<name>/`` (attrs["provenance"]: n_train, n_outputs, alpha, seed,
n_seeds, masks source, user description; and, only where they are not the classic defaults, the
small-drop protocol's drop_fraction and the seed_policy)::

    masks        (R, n_train)           bool, one row per chunk
    outputs      (R, n_seeds, n_outputs) float32, one row per chunk, NaN until computed
    train_seeds  (R, n_seeds)           int64, the seed train() got for each model
    done         (R,)                   uint8, one chunk per row: 1 once the row's data is written
    claims       (0,)                   placeholder array; claim records live under claims/held/
    config/                             attrs["config"]: the CLI config of the latest run

A row's ``done`` mark is written after its outputs and seeds, so a reader (or a resumed run)
never mistakes a half-written row for a finished one. Every chunk carries a checksum, and reads
of finished rows are checked: a damaged or lost chunk raises
:class:`~datatrace.store.StoreCorruptionError` naming it. Rows are independent chunks, so concurrent
runners (processes on one machine, or one driver per machine on a shared store) each write their
own rows; claims (:mod:`datatrace.subsets.claims`) make sure no two compute the same row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.errors

from datatrace._arguments import non_negative_integer, positive_integer
from datatrace.store import Store, StoreMismatchError
from datatrace.store.verify import CheckedArray, create_array
from datatrace.subsets.backends import Backend, EvaluateFn, TrainFn
from datatrace.subsets.claims import RowClaims
from datatrace.subsets.masks import (
    check_alpha,
    check_masks,
    check_seed_policy,
    kept_fraction,
    random_masks,
    train_seeds,
)

SECTION = "subsets"
CLAIMS_PREFIX = "claims/held"
# A claim not renewed for this long is taken over (holders renew every lease / 4). Long enough
# to ride out a stalled network or a stopped-the-world GC on object storage; it only delays
# take-over of rows whose runner died on *another* machine (same-machine deaths are seen at once).
DEFAULT_LEASE_S = 300.0
# How often a runner waiting for rows claimed by other runners checks on them.
DEFAULT_POLL_S = 1.0
# Path segments of letters, digits and "_.-", not starting with a dot (no "." or ".." segments).
NAME_PATTERN = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*(/[A-Za-z0-9_\-][A-Za-z0-9_.\-]*)*")


@dataclass(frozen=True)
class SubsetResults:
    """Rows of a subset table.

    Attributes:
        masks: ``(R, n_train)`` bool; row ``r`` marks the training examples model ``r`` saw.
        outputs: ``(R, n_outputs)`` float32 outputs averaged over seeds, or
            ``(R, n_seeds, n_outputs)`` with ``reduce=None``; NaN for unfinished rows.
        rows: ``(R,)`` indices of these rows in the table.
        seeds: ``(R, n_seeds)`` seeds passed to ``train`` (0 for unfinished rows).
    """

    masks: np.ndarray
    outputs: np.ndarray
    rows: np.ndarray
    seeds: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


class SubsetExperiment:
    """Store-backed table of ``(mask, outputs)`` rows under ``<store>/subsets/<name>/``.

    Each row is a subset of the training set; :meth:`run` trains ``n_seeds`` models on each
    unfinished row with the user's ``train(train_indices, seed) -> model`` and records
    ``evaluate(model) -> (n_outputs,)``. Runs resume where they stopped, and several runners
    (processes, machines) can work on one table at once.

    Args:
        store: a :class:`~datatrace.store.Store`, a directory, an fsspec URL, or ``None`` (memory).
        name: the table's name (letters, digits, ``_.-``, ``/`` for nesting).
        n_train: size of the training set.
        n_outputs: length of the vector ``evaluate`` returns (e.g. number of target examples).
        masks: explicit ``(R, n_train)`` bool masks; an existing table must start with them (more
            rows are appended).
        n_masks: random masks: the table has at least this many rows (``random_masks(n_train,
            n_masks, alpha, seed)``); ``None`` opens an existing table as it is.
        alpha: fraction of the training set in each random mask.
        seed: seed of the masks and of the training seeds (``train_seed(seed, row, repeat)``).
        n_seeds: models trained per row, each with its own seed.
        description: JSON-serialisable description of what produces the outputs (e.g. the name
            and settings of the training function); part of the provenance.
        drop_fraction: random masks of the small-drop LDS protocol: each row leaves out
            ``dropped_count(n_train, drop_fraction)`` examples (``alpha`` is then ignored and set
            to :func:`~datatrace.subsets.masks.kept_fraction`). ``None``: the classic protocol.
        seed_policy: ``"per-row"`` (each row its own seeds) or ``"fixed"`` (every row gets row
            0's seeds, :meth:`row_seeds`; with a deterministic ``train`` that keeps the full
            run's data order, subsets' models then differ only by what they drop).

    Raises:
        StoreMismatchError: the store holds a table of this name made differently (another
            n_train, seed, alpha, n_seeds, description, or other explicit masks).
    """

    def __init__(
        self,
        store: Store | str | Path | None,
        name: str,
        *,
        n_train: int,
        n_outputs: int,
        masks: np.ndarray | None = None,
        n_masks: int | None = None,
        alpha: float = 0.5,
        seed: int = 0,
        n_seeds: int = 1,
        description: dict[str, Any] | None = None,
        drop_fraction: float | None = None,
        seed_policy: str = "per-row",
    ):
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(
                f"invalid experiment name {name!r}: use letters, digits, '_', '.', '-' and '/' "
                "(no segment starting with a dot)"
            )
        n_train = positive_integer("n_train", n_train)
        n_outputs = positive_integer("n_outputs", n_outputs)
        n_seeds = positive_integer("n_seeds", n_seeds)
        seed = non_negative_integer("seed", seed)
        if masks is not None and n_masks is not None:
            raise ValueError("give either masks (explicit) or n_masks (random), not both")
        self.store = store if isinstance(store, Store) else Store(store)
        self.name = name
        self.path = f"{SECTION}/{name}"
        self.n_train = n_train
        self.n_outputs = n_outputs
        self.n_seeds = n_seeds
        self.seed = seed
        self.seed_policy = check_seed_policy(seed_policy)
        if drop_fraction is not None and masks is not None:
            raise ValueError("drop_fraction describes random masks: give it or masks, not both")
        self.drop_fraction = drop_fraction
        if drop_fraction is not None:
            alpha = kept_fraction(n_train, drop_fraction)
        explicit = None if masks is None else check_masks(masks, n_train)
        self.source = "random" if explicit is None else "explicit"
        self.alpha = alpha if explicit is None else None
        if explicit is None:
            check_alpha(alpha)
        self.description = description or {}
        exists = self.store.provenance(self.path) is not None
        if explicit is None and n_masks is None and not exists:
            raise ValueError(
                f"no subset experiment {name!r} in the store at {self.store.where} yet: give "
                "n_masks (random masks) or masks (explicit) to create it"
            )
        if n_masks is not None and n_masks < 0:
            raise ValueError(f"n_masks must be non-negative, got {n_masks}")
        provenance = {
            "kind": "subset-experiment",
            "n_train": n_train,
            "n_outputs": n_outputs,
            "alpha": self.alpha,
            "seed": seed,
            "n_seeds": n_seeds,
            "masks": self.source,
            "description": self.description,
        }
        # Recorded only when set, so that the provenance of classic tables (and every table
        # stored before these options) stays what it was.
        if drop_fraction is not None:
            provenance["drop_fraction"] = drop_fraction
        if self.seed_policy != "per-row":
            provenance["seed_policy"] = self.seed_policy
        self.provenance = self.store.check_provenance(self.path, provenance)
        # Arrays are created with their final number of rows, so that runners creating the same
        # table at the same moment write identical metadata.
        self._create_arrays(len(explicit) if explicit is not None else (n_masks or 0))
        stored = self.n_rows
        if explicit is not None:
            if exists:
                self._check_explicit_prefix(explicit)
            self._append_explicit(explicit[stored:])
        elif n_masks is not None and n_masks > stored:
            self._resize(n_masks)
        self._resize(self.n_rows)  # every array as long as the masks, whoever created them
        self._repair_masks(explicit)

    @classmethod
    def open(cls, store: Store | str | Path | None, name: str) -> SubsetExperiment:
        """An existing table, with the settings recorded in its provenance.

        Raises:
            FileNotFoundError: ``store`` is a local path that does not exist.
            KeyError: the store has no table of this name (the message lists those it has).
        """
        if isinstance(store, (str, Path)) and "://" not in str(store) and not Path(store).exists():
            raise FileNotFoundError(f"no datatrace store at {store}")
        store = store if isinstance(store, Store) else Store(store)
        recorded = store.provenance(f"{SECTION}/{name}")
        if recorded is None or recorded.get("kind") != "subset-experiment":
            names = ", ".join(list_experiments(store)) or "none"
            raise KeyError(
                f"no subset experiment {name!r} in the store at {store.where} (found: {names})"
            )
        return cls(
            store,
            name,
            n_train=recorded["n_train"],
            n_outputs=recorded["n_outputs"],
            alpha=recorded["alpha"] if recorded["alpha"] is not None else 0.5,
            seed=recorded["seed"],
            n_seeds=recorded["n_seeds"],
            description=recorded["description"],
            drop_fraction=recorded.get("drop_fraction"),
            seed_policy=recorded.get("seed_policy", "per-row"),
            **(
                {"masks": np.zeros((0, recorded["n_train"]), bool)}
                if recorded["masks"] == "explicit"
                else {}
            ),
        )

    def __repr__(self) -> str:
        return (
            f"SubsetExperiment({self.name!r}, rows={self.n_rows}, "
            f"done={int(self.completed.sum())}, n_train={self.n_train}, "
            f"n_outputs={self.n_outputs}, n_seeds={self.n_seeds})"
        )

    # -- storage ---------------------------------------------------------------------------

    @property
    def group(self) -> zarr.Group:
        return self.store.root[self.path]

    def _array_specs(self, rows: int) -> dict[str, tuple[tuple, tuple, str, Any]]:
        return {
            "masks": ((rows, self.n_train), (1, self.n_train), "bool", False),
            "outputs": (
                (rows, self.n_seeds, self.n_outputs),
                (1, self.n_seeds, self.n_outputs),
                "float32",
                np.nan,
            ),
            "train_seeds": ((rows, self.n_seeds), (1, self.n_seeds), "int64", 0),
            "done": ((rows,), (1,), "uint8", 0),
        }

    def _create_arrays(self, rows: int) -> None:
        group = self.group
        for name, (shape, chunks, dtype, fill) in self._array_specs(rows).items():
            if name in group:
                continue
            self.store.refuse_lost_metadata(f"{group.path}/{name}")
            try:
                # Every chunk is stored, even an all-False mask (a subset may be empty), so that a
                # mask chunk's presence says the row's mask was written.
                create_array(group, name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill)
            except zarr.errors.ContainsArrayError:
                pass  # another runner created it at the same moment
        if "claims" not in group:
            try:
                create_array(
                    group,
                    "claims",
                    shape=(0,),
                    dtype="uint8",
                    attributes={
                        "about": "claim records of runners: claims/held/<row>/<generation> (JSON); "
                        "see datatrace.subsets.claims"
                    },
                )
            except zarr.errors.ContainsArrayError:
                pass

    def _array(self, name: str) -> CheckedArray:
        """The array ``name``, with checked reads and every chunk written stored."""
        return self.store.checked(self.group[name], marks=name == "done")

    def _resize(self, rows: int) -> None:
        for name, (shape, _, _, _) in self._array_specs(rows).items():
            array = self._array(name)
            if array.shape[0] < rows:
                array.resize(shape)

    def _written_mask_rows(self) -> set[int]:
        """Rows whose mask chunk exists in the store."""
        return self._array("masks").present_rows()

    def _repair_masks(self, explicit: np.ndarray | None) -> None:
        """Write the masks of rows whose mask is missing (a run killed while creating them)."""
        missing = sorted(set(range(self.n_rows)) - self._written_mask_rows())
        if not missing:
            return
        masks = self._array("masks")
        for row in missing:
            if self.source == "random":
                masks[row] = random_masks(self.n_train, 1, self.alpha, self.seed, start=row)[0]
            elif explicit is not None and row < len(explicit):
                masks[row] = explicit[row]
            else:
                raise StoreMismatchError(
                    f"the masks of rows {missing[:5]}… of {self.name!r} in the store at "
                    f"{self.store.where} were never written: reopen with the explicit masks"
                )

    def _check_explicit_prefix(self, explicit: np.ndarray) -> None:
        shared = min(len(explicit), self.n_rows)
        if shared == 0:
            return
        stored = self._array("masks").read(slice(0, shared), required=False)
        written = self._written_mask_rows()
        differ = [
            row
            for row in range(shared)
            if row in written and not np.array_equal(stored[row], explicit[row])
        ]
        if differ:
            raise StoreMismatchError(
                f"the store at {self.store.where} holds subset experiment {self.name!r} with "
                f"other masks (rows {differ[:5]} differ): use a new name for new masks"
            )

    def _append_explicit(self, new_masks: np.ndarray) -> None:
        if len(new_masks) == 0:
            return
        start = self.n_rows
        self._resize(start + len(new_masks))
        masks = self._array("masks")
        for offset, mask in enumerate(new_masks):
            masks[start + offset] = mask

    # -- public ----------------------------------------------------------------------------

    @property
    def n_rows(self) -> int:
        """Rows in the table ``R``."""
        return self._array("masks").shape[0]

    @property
    def masks(self) -> np.ndarray:
        """``(R, n_train)`` bool: every row's mask, finished or not."""
        return self._array("masks")[:]

    @property
    def completed(self) -> np.ndarray:
        """``(R,)`` bool: which rows are finished."""
        return self._array("done")[:].astype(bool)

    def row_seeds(self, row: int) -> list[int]:
        """The seeds ``train`` gets for the models of ``row`` (row 0's for every row under the
        ``"fixed"`` seed policy)."""
        return train_seeds(self.seed, row, self.n_seeds, self.seed_policy)

    @property
    def protocol(self) -> str:
        """The LDS protocol the table's masks serve: ``"small-drop"`` or ``"classic"``."""
        return "classic" if self.drop_fraction is None else "small-drop"

    def extend(
        self, n_masks: int | None = None, *, masks: np.ndarray | None = None
    ) -> SubsetExperiment:
        """Append rows: ``n_masks`` more random masks (the same stream), or explicit ``masks``.

        Extend from one process while no runner works on the table; runners see new rows at
        their next :meth:`run`.

        Returns:
            ``self``.
        """
        if (n_masks is None) == (masks is None):
            raise ValueError("give n_masks (random tables) or masks (explicit tables)")
        if masks is not None:
            if self.source != "explicit":
                raise ValueError(f"{self.name!r} has random masks: extend it with n_masks")
            self._append_explicit(check_masks(masks, self.n_train))
            return self
        if self.source != "random":
            raise ValueError(f"{self.name!r} has explicit masks: extend it with masks=...")
        if n_masks < 0:
            raise ValueError(f"n_masks must be non-negative, got {n_masks}")
        start = self.n_rows
        self._resize(start + n_masks)
        array = self._array("masks")
        for row in range(start, start + n_masks):
            array[row] = random_masks(self.n_train, 1, self.alpha, self.seed, start=row)[0]
        return self

    def claims(self, lease_s: float = DEFAULT_LEASE_S) -> RowClaims:
        """The claims of runners on this table's rows."""
        return RowClaims(self.store.zarr_store, f"{self.group.path}/{CLAIMS_PREFIX}", lease_s)

    def run(
        self,
        train: TrainFn,
        evaluate: EvaluateFn,
        *,
        backend: str | Backend = "local",
        rows: Any = None,
        progress: bool = True,
        wait: bool = True,
        lease_s: float = DEFAULT_LEASE_S,
        poll_s: float = DEFAULT_POLL_S,
    ) -> SubsetExperiment:
        """Train and evaluate models on every unfinished row (of ``rows``), writing as they finish.

        Args:
            train: ``train(train_indices (n_subset,) int64, seed: int) -> model``.
            evaluate: ``evaluate(model) -> (n_outputs,)`` (numpy, torch or a list).
            backend: ``"local"`` (in this process), ``"processes"`` (a process per core),
                ``"ray"``, or a :class:`LocalBackend` / :class:`RayBackend` with settings.
            rows: row indices to work on (default: all).
            progress: show a progress bar.
            wait: when the only rows left are being computed by other runners, wait for them
                (taking over any whose runner dies) rather than return.
            lease_s: claims not renewed for this long are taken over (see
                :mod:`datatrace.subsets.claims`).
            poll_s: seconds between checks on rows held by other runners.

        Returns:
            ``self``; ``self.last_run_`` holds what this run did (:class:`RunStats`).

        Raises:
            SubsetRowError: a row failed (after its retries); rows finished before are kept.
        """
        from datatrace.subsets.runner import run_rows

        self.last_run_ = run_rows(
            self, train, evaluate, backend, rows, progress, wait, lease_s, poll_s
        )
        return self

    def results(self, reduce: str | None = "mean", complete_only: bool = True) -> SubsetResults:
        """The table's masks and outputs.

        Args:
            reduce: ``"mean"`` averages the seeds of each row; ``None`` keeps them.
            complete_only: only finished rows (otherwise unfinished ones hold NaN).

        Returns:
            :class:`SubsetResults`.

        Raises:
            StoreCorruptionError: a chunk of a finished row is damaged or lost.
        """
        if reduce not in ("mean", None):
            raise ValueError(f"reduce must be 'mean' or None, got {reduce!r}")
        done = self.completed
        rows = np.flatnonzero(done) if complete_only else np.arange(len(done))
        # Only the rows asked for are read (up to the marks' length: rows appended meanwhile have
        # no mark yet), so that an unfinished row, perhaps being written or left torn by a failed
        # write, never stops the finished ones from being read.
        read = {
            name: self._array(name).read(rows, required=done)
            for name in ("masks", "outputs", "train_seeds")
        }
        masks, outputs, seeds = read["masks"], read["outputs"], read["train_seeds"]
        if reduce == "mean":
            outputs = outputs.mean(axis=1)
        return SubsetResults(masks=masks, outputs=outputs, rows=rows, seeds=seeds)

    def write_row(
        self, row: int, outputs: np.ndarray, seeds: list[int], arrays: dict | None = None
    ) -> None:
        """Store one row's ``(n_seeds, n_outputs)`` outputs and seeds, then mark it done.

        ``arrays`` (from :meth:`row_arrays`) saves reopening the arrays for every row.
        """
        arrays = arrays or self.row_arrays()
        arrays["outputs"][row] = outputs
        arrays["train_seeds"][row] = np.asarray(seeds, dtype=np.int64)
        arrays["done"].set_mark(row)

    def row_arrays(self) -> dict[str, CheckedArray]:
        """The arrays a row is read from and written to, opened once (reads checked)."""
        return {name: self._array(name) for name in ("masks", "outputs", "train_seeds", "done")}

    def save_config(self, config: dict[str, Any]) -> None:
        """Keep the (CLI) config of a run beside the results, in ``config/`` attrs."""
        group = self.group.require_group("config")
        group.attrs["config"] = config

    def saved_config(self) -> dict[str, Any] | None:
        """The config saved by :meth:`save_config`, if any."""
        if "config" not in self.group:
            return None
        return self.group["config"].attrs.get("config")


def list_experiments(store: Store) -> list[str]:
    """Names of the subset experiments in ``store`` (nested names included)."""
    found = []

    def visit(path: str, prefix: str) -> None:
        for name in store.groups(path):
            full = f"{prefix}{name}"
            recorded = store.provenance(f"{path}/{name}")
            if isinstance(recorded, dict) and recorded.get("kind") == "subset-experiment":
                found.append(full)
            else:
                visit(f"{path}/{name}", f"{full}/")

    visit(SECTION, "")
    return found
