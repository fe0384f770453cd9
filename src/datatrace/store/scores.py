"""A score matrix larger than memory: ``(n_targets, n_train)`` in checksummed chunks of a store.

Layout, under ``scores/<name>/`` — the layout of saved attributions (:meth:`Store.save_attributions
<datatrace.store.Store.save_attributions>`), so that ``Store.load_attributions`` and
:func:`~datatrace.store.verify_store` read a finished one like any other::

    scores       (n_targets, n_train)  float32, chunks (row_chunk, column_chunk)
    out_to_loss  (n_train,)            float32, the weights Q that multiply the scores
    done         (n_chunks,)           uint8, one mark per score chunk (row-major grid order):
                                       1 once the chunk's data is written
    attrs: complete (set last), streamed, method, info, provenance

Chunks are written whole, each followed by its mark; ``complete`` is set once every mark is.
A crash at any point leaves a matrix that reads as incomplete (reading it raises, naming how much
is missing), and writing it again with the same provenance computes only the unmarked chunks. A
different provenance (other targets, another fit) is refused rather than mixed in.

Reads go through :class:`~datatrace.store.verify.CheckedArray`: a damaged or lost chunk raises
:class:`~datatrace.store.StoreCorruptionError` naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import zarr.errors

from datatrace.store.provenance import json_normalise
from datatrace.store.store import SCORE_CHUNK, Store, StoreMismatchError
from datatrace.store.verify import create_array

if TYPE_CHECKING:
    from datatrace.attributions import Attributions

SECTION = "scores"


class IncompleteScoresError(RuntimeError):
    """A streamed score matrix is read before every chunk of it is written."""


def score_chunks(n_targets: int, n_train: int, feature_rows: int) -> tuple[int, int]:
    """The chunk shape ``(rows, columns)`` of a streamed score matrix.

    Rows: :data:`~datatrace.store.store.SCORE_CHUNK`'s. Columns: the multiple of the features'
    row chunk ``feature_rows`` nearest below ``SCORE_CHUNK``'s (at least one), so that a column
    chunk of scores is computed from whole stored feature chunks, each read once.
    """
    columns = feature_rows * max(1, SCORE_CHUNK[1] // feature_rows)
    return min(n_targets, SCORE_CHUNK[0]), min(n_train, columns)


class ScoreMatrix:
    """A ``(n_targets, n_train)`` float32 score matrix in a store, read and written by chunks.

    ``matrix.rows(lo, hi)`` reads the scores of targets ``lo:hi`` (``(hi - lo, n_train)``),
    ``matrix.columns(lo, hi)`` those of training examples ``lo:hi`` (``(n_targets, hi - lo)``),
    ``matrix[j0:j1, i0:i1]`` any block. Each read costs the chunks it touches.

    Open one with :meth:`open` (a finished matrix, or any attributions saved in the store) or
    :meth:`create` (to write it); ``TRAK.score(targets, out=...)`` returns one.

    Args:
        store: the store.
        name: the matrix is ``scores/<name>``.

    Raises:
        KeyError: nothing is saved under ``name``.
    """

    def __init__(self, store: Store, name: str):
        self.store = store
        self.name = name
        self.path = f"{SECTION}/{name}"
        store.refuse_lost_metadata(self.path)
        if self.path not in store.root:
            saved = ", ".join(store.groups(SECTION)) or "none"
            raise KeyError(
                f"no scores named {name!r} in the store at {store.where} (saved: {saved})"
            )
        self.group = store.root[self.path]
        for array in ("scores", "out_to_loss", "done"):
            store.refuse_lost_metadata(f"{self.path}/{array}")
        if "scores" not in self.group:
            raise IncompleteScoresError(self._incomplete_message("its scores array is not created"))
        self._scores = store.checked(self.group["scores"])
        self._done = store.checked(self.group["done"], marks=True) if "done" in self.group else None

    @classmethod
    def open(cls, store: Store, name: str) -> ScoreMatrix:
        """A finished matrix ``scores/<name>`` for reading.

        Raises:
            KeyError: nothing is saved under ``name``.
            IncompleteScoresError: it is not finished (the message says how much is written).
        """
        matrix = cls(store, name)
        matrix.require_complete()
        return matrix

    @classmethod
    def create(
        cls,
        store: Store,
        name: str,
        shape: tuple[int, int],
        chunks: tuple[int, int],
        provenance: dict[str, Any],
        out_to_loss: np.ndarray,
        method: str = "",
        info: dict[str, Any] | None = None,
    ) -> ScoreMatrix:
        """The matrix ``scores/<name>`` to write: created, or reopened to finish it.

        A matrix already there with the same ``provenance`` and shape is reopened as it is, with
        its own chunks (its marked chunks are kept; a finished one needs nothing more).

        Args:
            shape: ``(n_targets, n_train)``.
            chunks: ``(rows, columns)`` of each stored chunk of a new matrix
                (:func:`score_chunks`).
            provenance: JSON-serialisable description of what the scores are (the fit, the
                targets); a resumed matrix must have the same.
            out_to_loss: ``(n_train,)`` weights ``Q`` that multiply the scores.
            method, info: as in :class:`~datatrace.Attributions`.

        Raises:
            StoreMismatchError: ``scores/<name>`` holds something else (other provenance or
                shape, or attributions saved whole); nothing is written.
        """
        provenance = json_normalise(provenance)
        path = f"{SECTION}/{name}"
        store.refuse_lost_metadata(path)
        if path not in store.root:
            attributes = {
                "complete": False,
                "streamed": True,
                "provenance": provenance,
                "shape": list(shape),
                "chunks": list(chunks),
            }
            try:
                store.root.create_group(path, attributes=attributes)
            except zarr.errors.ContainsGroupError:
                pass  # another process created it at the same moment: checked as any other
        group = store.root[path]
        if not group.attrs.get("streamed"):
            raise StoreMismatchError(
                f"{path} in the store at {store.where} holds attributions saved whole (by "
                "score(name=...)): pass another name, or delete them first"
            )
        # The chunks are a layout choice: a matrix being resumed keeps its own.
        chunks = tuple(group.attrs.get("chunks", chunks))
        expected = {"provenance": provenance, "shape": list(shape)}
        found = {key: group.attrs.get(key) for key in expected}
        if found != expected:
            raise StoreMismatchError(
                f"{path} in the store at {store.where} holds the scores of a different query:\n"
                + "\n".join(_differences(found, expected))
                + f"\nPass another name (or delete {path}) to compute these."
            )
        group = store.root[path]
        if group.attrs.get("complete"):
            return cls(store, name)
        n_targets, n_train = shape
        grid = (-(-n_targets // chunks[0])) * (-(-n_train // chunks[1]))
        arrays = {
            "scores": dict(shape=shape, chunks=chunks, dtype="float32"),
            "out_to_loss": dict(shape=(n_train,), chunks=(n_train,), dtype="float32"),
            "done": dict(shape=(grid,), chunks=(1,), dtype="uint8"),
        }
        for array, settings in arrays.items():
            if array not in group:
                store.refuse_lost_metadata(f"{path}/{array}")
                create_array(group, array, fill_value=0, **settings)
        # Rewritten on every resume: cheap, and a crash while it was written leaves no doubt.
        store.checked(group["out_to_loss"])[:] = np.asarray(out_to_loss, dtype=np.float32)
        group.attrs.update({"method": method, "info": json_normalise(info or {})})
        return cls(store, name)

    # -- shape and state -------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_targets, n_train)``."""
        return tuple(self._scores.shape)

    @property
    def n_targets(self) -> int:
        return self.shape[0]

    @property
    def n_train(self) -> int:
        return self.shape[1]

    @property
    def chunks(self) -> tuple[int, int]:
        """``(rows, columns)`` of each stored chunk."""
        return tuple(self._scores.chunks)

    @property
    def grid(self) -> tuple[int, int]:
        """Number of chunks along targets and along training examples."""
        return tuple(self._scores.cdata_shape)

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete"))

    @property
    def method(self) -> str:
        return self.group.attrs.get("method", "")

    @property
    def info(self) -> dict[str, Any]:
        return dict(self.group.attrs.get("info", {}))

    @property
    def out_to_loss(self) -> np.ndarray | None:
        """``(n_train,)`` weights ``Q`` that multiply the scores, if saved."""
        if "out_to_loss" not in self.group:
            return None
        return self.store.checked(self.group["out_to_loss"])[:]

    def done(self) -> np.ndarray:
        """Boolean ``(row_chunks, column_chunks)``: which chunks are written."""
        if self._done is None:  # attributions saved whole: all or nothing
            return np.full(self.grid, self.complete)
        return self._done[:].astype(bool).reshape(self.grid)

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return (
            f"ScoreMatrix({self.path!r}, n_targets={self.n_targets}, n_train={self.n_train}, "
            f"chunks={self.chunks}, {state})"
        )

    # -- writing ---------------------------------------------------------------------------

    def write(self, row_start: int, column_start: int, block: np.ndarray) -> None:
        """Write a block of whole chunks, then mark each of them done.

        Args:
            row_start, column_start: where the block starts (multiples of the chunk shape).
            block: ``(rows, columns)`` float32, ending at chunk boundaries or at the matrix's
                edge.

        Raises:
            ValueError: the block does not cover whole chunks.
        """
        block = np.asarray(block, dtype=np.float32)
        row_stop, column_stop = row_start + block.shape[0], column_start + block.shape[1]
        for start, stop, size, length, axis in (
            (row_start, row_stop, self.chunks[0], self.n_targets, "rows"),
            (column_start, column_stop, self.chunks[1], self.n_train, "columns"),
        ):
            if start % size or (stop % size and stop != length) or stop > length:
                raise ValueError(
                    f"a block of {axis} {start}:{stop} does not cover whole chunks of {size} "
                    f"(of {length}): write chunk-aligned blocks"
                )
        self._scores[row_start:row_stop, column_start:column_stop] = block
        columns = range(column_start // self.chunks[1], -(-column_stop // self.chunks[1]))
        for row in range(row_start // self.chunks[0], -(-row_stop // self.chunks[0])):
            for column in columns:
                self._done.set_mark(row * self.grid[1] + column)

    def finish(self) -> None:
        """Mark the matrix complete once every chunk is written.

        Raises:
            IncompleteScoresError: some chunks are not written.
        """
        done = self.done()
        if not done.all():
            raise IncompleteScoresError(
                self._incomplete_message(f"{int((~done).sum())} of {done.size} chunks are missing")
            )
        self.group.attrs["complete"] = True

    # -- reading ---------------------------------------------------------------------------

    def require_complete(self) -> None:
        """Raise :class:`IncompleteScoresError` unless every chunk is written."""
        if not self.complete:
            done = self.done()
            raise IncompleteScoresError(
                self._incomplete_message(f"{int(done.sum())} of {done.size} chunks are written")
            )

    def __getitem__(self, selection: Any) -> np.ndarray:
        """Scores at ``selection`` (integers, slices or 1-d integer arrays per axis)."""
        self.require_complete()
        return self._scores.read(selection)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Scores of targets ``start:stop``, ``(stop - start, n_train)``."""
        return self[_checked_range(start, stop, self.n_targets, "targets"), :]

    def columns(self, start: int, stop: int) -> np.ndarray:
        """Scores of training examples ``start:stop`` for every target,
        ``(n_targets, stop - start)``."""
        return self[:, _checked_range(start, stop, self.n_train, "training examples")]

    def to_attributions(self) -> Attributions:
        """The whole matrix in memory, as :class:`~datatrace.Attributions`."""
        from datatrace.attributions import Attributions

        return Attributions(self[:, :], self.method, self.out_to_loss, self.info)

    def _incomplete_message(self, state: str) -> str:
        return (
            f"{self.path} in the store at {self.store.where} is incomplete ({state}): its "
            "writing was interrupted. Run the same query again (TRAK.score(targets, out=...)) "
            "to finish it"
        )


def _checked_range(start: int, stop: int, length: int, what: str) -> slice:
    if not 0 <= start <= stop <= length:
        raise IndexError(f"{what} {start}:{stop} are outside 0:{length}")
    return slice(start, stop)


def _differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    lines = []
    for key in expected:
        if found.get(key) == expected.get(key):
            continue
        if isinstance(expected[key], dict) and isinstance(found.get(key), dict):
            inner = found[key]
            for field in sorted(set(inner) | set(expected[key])):
                if inner.get(field) != expected[key].get(field):
                    lines.append(
                        f"  {key}.{field}: stored {inner.get(field)!r}, now "
                        f"{expected[key].get(field)!r}"
                    )
        else:
            lines.append(f"  {key}: stored {found.get(key)!r}, now {expected[key]!r}")
    return lines
