"""What the store serves is what was written: checksummed chunks, checked reads, ``verify_store``.

Every array the store creates gets zarr's CRC-32C codec after its compressor and is written with
every chunk stored, even one holding only the fill value. So a flipped bit or a truncated object
fails its checksum, and a missing object can only mean a lost one. Reads go through
:class:`CheckedArray`, which turns both into a :class:`StoreCorruptionError` naming the array and
the chunk, where zarr would raise a bare codec error or silently serve the fill value.
:func:`verify_store` (``datatrace verify``) checks a whole store and, with ``repair``, drops what is
damaged so that the next run recomputes only that.

Arrays written before checksums (no CRC-32C codec) still read. zarr skipped writing their
all-fill chunks, so there a missing object cannot be told from an empty chunk, and a flipped bit
is caught only when the compressed stream no longer decodes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

if TYPE_CHECKING:
    from datatrace.store.store import Store

# zarr's default compressor for numbers (zstd, level 0), then a CRC-32C of the compressed bytes:
# zstd frames carry no checksum by default, so without it most flipped bits decode to wrong values.
COMPRESSORS = (ZstdCodec(level=0, checksum=False), Crc32cCodec())
CHECKSUM_ONLY = (Crc32cCodec(),)
# Store every chunk written, even one of fill values only (zarr skips those by default), so that
# a missing chunk object always means a lost one.
WRITE_EVERY_CHUNK = {"write_empty_chunks": True}
MISSING = "is missing, though it was written"
# What to do about lost or damaged metadata, which verify cannot rebuild.
METADATA_ADVICE = (
    "The data chunks may be intact, but what they are cannot be read or checked without it: "
    "restore the file from a copy, or move the store aside and start a new one"
)


class StoreCorruptionError(ValueError):
    """A chunk of the store is damaged (fails its checksum, does not decode) or lost.

    Attributes:
        where: the store's location.
        array: path of the array in the store, e.g. ``"features/0/features"``.
        chunk: the chunk's grid coordinates, e.g. ``(3, 0)``.
        problem: what is wrong with it.
        key: the chunk's object in the store, e.g. ``"features/0/features/c/3/0"``.
    """

    def __init__(
        self,
        where: str,
        array: str,
        chunk: tuple[int, ...] | None,
        problem: str,
        key: str,
        advice: str | None = None,
    ):
        self.where, self.array, self.chunk, self.problem, self.key = (
            where,
            array,
            chunk,
            problem,
            key,
        )
        self.advice = advice
        part = array if chunk is None else f"chunk {format_chunk(chunk)} of {array}"
        if advice is None:
            advice = (
                f"`datatrace verify {where}` lists all damage; with --repair it drops what is "
                "damaged so that the next run recomputes it"
            )
        super().__init__(f"{part} in the store at {where} {problem} (object {key}). {advice}")

    def __reduce__(self):  # the message is built from the fields: pickle those
        fields = (self.where, self.array, self.chunk, self.problem, self.key, self.advice)
        return type(self), fields


def format_chunk(chunk: tuple[int, ...] | None) -> str:
    """``"3"`` for a chunk of a 1-d array, ``"(3, 0)"`` otherwise, ``"—"`` for none."""
    if chunk is None:
        return "—"
    return str(chunk[0]) if len(chunk) == 1 else f"({', '.join(map(str, chunk))})"


def create_array(
    group: zarr.Group, name: str, compress: bool = True, **settings: Any
) -> zarr.Array:
    """``group.create_array(name, **settings)`` with the checksum and every chunk stored;
    ``compress=False`` leaves zstd out (for float64 matrices such as partial Grams, which it does
    not shrink and whose writes it makes ~6× slower), keeping the checksum."""
    compressors = COMPRESSORS if compress else CHECKSUM_ONLY
    return group.create_array(name, compressors=compressors, config=WRITE_EVERY_CHUNK, **settings)


def has_checksum(array: zarr.Array) -> bool:
    """Whether ``array`` was created with the checksum (by this version of the store)."""
    return any(isinstance(codec, Crc32cCodec) for codec in getattr(array.metadata, "codecs", ()))


class CheckedArray:
    """A zarr array whose reads raise :class:`StoreCorruptionError` rather than serve damage.

    A read decodes as zarr does; if a chunk fails to decode, it is found and named. A chunk that
    must have been written (``required``) and reads as nothing but the fill value is looked up,
    and if its object is missing the read fails. So checking costs nothing beyond the read,
    unless a chunk holds only the fill value (one existence check then). Writes store every chunk.
    Other attributes (``shape``, ``chunks``, ``resize``, ...) are the zarr array's.

    Args:
        array: the zarr array.
        where: the store's location, for messages.
        marks: the array holds completion marks, where a missing chunk means "not done": only
            decoding is checked.
    """

    def __init__(self, array: zarr.Array, where: str, marks: bool = False):
        self.array = array.with_config(WRITE_EVERY_CHUNK)
        self.where = where
        self.marks = marks
        # Arrays written before checksums did not store their all-fill chunks.
        self.stores_every_chunk = has_checksum(array)

    def __getattr__(self, name: str) -> Any:
        if name == "array":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.array, name)

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, selection: Any) -> np.ndarray:
        return self.read(selection)

    def __setitem__(self, selection: Any, values: Any) -> None:
        self.array[selection] = values

    def set_mark(self, index: int) -> None:
        """Set completion mark ``index`` (of an array of ``marks``, one per chunk) to 1.

        If the write fails (a full disk, any ``OSError``), the mark's object is deleted before
        the error is raised: where writes are not atomic (fsspec's local filesystem, ``file://``
        URLs) the failed write may have left a torn object, which would read as damage, so that
        the next run would stop on it instead of computing the chunk again.
        """
        try:
            self.array[index] = 1
        except OSError:
            with contextlib.suppress(OSError):  # the error raised is the write's
                sync(self.array.store.delete(self.key((index,))))
            raise

    def key(self, chunk: tuple[int, ...]) -> str:
        """The store key of the object holding ``chunk``."""
        return f"{self.array.path}/{self.array.metadata.encode_chunk_key(chunk)}".lstrip("/")

    def has_chunk(self, chunk: tuple[int, ...]) -> bool:
        """Whether the object of ``chunk`` exists."""
        return bool(sync(self.array.store.exists(self.key(chunk))))

    def present_rows(self) -> set[int]:
        """Indices along the first axis of the chunks whose objects exist (one listing).

        Temporary objects of writes in progress (zarr's local store writes ``<key>.<id>.partial``
        and then renames it), which another process may be writing this moment, are not chunks.
        """
        prefix = f"{self.array.path}/c/".lstrip("/")
        rows = set()
        for key in sync(_list(self.array.store, prefix)):
            coordinates = key[len(prefix) :].split("/")
            if all(coordinate.isdigit() for coordinate in coordinates):
                rows.add(int(coordinates[0]))
        return rows

    def read(self, selection: Any = slice(None), required: bool | np.ndarray = True) -> np.ndarray:
        """The values at ``selection``: per axis an integer, a slice, or an integer array (integer
        arrays select orthogonally, as ``zarr.Array.oindex``).

        Args:
            selection: what to read.
            required: which chunks must have been written: all (``True``), none (``False``), or a
                boolean array over the chunks' index along the first axis (e.g. rows marked done).

        Raises:
            StoreCorruptionError: a chunk read does not decode, or a required one is missing.
        """
        index = self._index(selection)
        orthogonal = any(isinstance(item, np.ndarray) for item in _as_tuple(selection))
        try:
            values = self.array.oindex[selection] if orthogonal else self.array[selection]
        except OSError:  # an I/O failure, not damage
            raise
        except Exception as error:
            self._name_damaged_chunk(index, error)
            raise
        if required is not False and not self.marks and self.stores_every_chunk:
            self._check_present(index, np.asarray(values), required)
        return values

    def _index(self, selection: Any) -> list[int | np.ndarray]:
        """Per axis, the integer or the integer array of positions that ``selection`` reads."""
        items = list(_as_tuple(selection))
        ellipses = [position for position, item in enumerate(items) if item is Ellipsis]
        if ellipses:
            at = ellipses[0]
            items[at : at + 1] = [slice(None)] * (self.array.ndim - len(items) + 1)
        items += [slice(None)] * (self.array.ndim - len(items))
        index: list[int | np.ndarray] = []
        for item, size in zip(items, self.array.shape):
            if isinstance(item, slice):
                index.append(np.arange(*item.indices(size)))
            elif isinstance(item, (int, np.integer)):
                index.append(int(item) + size if item < 0 else int(item))
            else:
                positions = np.asarray(item)
                if positions.dtype == bool:
                    positions = np.flatnonzero(positions)
                elif positions.dtype.kind not in "iu" or positions.ndim != 1:
                    raise TypeError(
                        f"CheckedArray reads integers, slices and 1-d integer arrays, got {item!r}"
                    )
                index.append(np.where(positions < 0, positions + size, positions))
        return index

    def _regions(self, index: list[int | np.ndarray]) -> Iterator[tuple[tuple[int, ...], Any]]:
        """Each chunk that ``index`` touches: its grid coordinates and where its values are in
        the result (a tuple of slices where possible, so that looking costs no copy)."""
        per_axis = []
        for positions, chunk in zip(index, self.array.chunks):
            if isinstance(positions, int):  # the axis is dropped from the result
                per_axis.append([(positions // chunk, None)])
                continue
            if positions.size == 0:
                return
            ids = positions // chunk
            if np.all(ids[1:] >= ids[:-1]):
                starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
                stops = np.r_[starts[1:], len(ids)]
                per_axis.append(
                    [(int(ids[s]), slice(int(s), int(e))) for s, e in zip(starts, stops)]
                )
            else:
                unique, inverse = np.unique(ids, return_inverse=True)
                order = np.argsort(inverse, kind="stable")
                groups = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
                per_axis.append(list(zip(unique.tolist(), groups)))
        for combination in itertools.product(*per_axis):
            chunk = tuple(coordinate for coordinate, _ in combination)
            parts = [part for _, part in combination if part is not None]
            if any(isinstance(part, np.ndarray) for part in parts):
                parts = np.ix_(
                    *[
                        part if isinstance(part, np.ndarray) else np.arange(part.start, part.stop)
                        for part in parts
                    ]
                )
            yield chunk, tuple(parts)

    def _name_damaged_chunk(self, index: list[int | np.ndarray], error: Exception) -> None:
        """Raise :class:`StoreCorruptionError` for the first chunk of ``index`` that does not
        decode on its own; return if each does (``error`` was not damage)."""
        grid = self.array.cdata_shape
        for chunk, _ in self._regions(index):
            if not all(0 <= coordinate < size for coordinate, size in zip(chunk, grid)):
                continue
            try:
                self.array.get_block_selection(chunk)
            except OSError:
                raise
            except Exception as chunk_error:
                problem = _decode_problem(chunk_error)
                raise StoreCorruptionError(
                    self.where, self.array.path, chunk, problem, self.key(chunk)
                ) from error

    def _check_present(
        self, index: list[int | np.ndarray], values: np.ndarray, required: bool | np.ndarray
    ) -> None:
        fill = self.array.fill_value
        for chunk, region in self._regions(index):
            if required is not True and not (chunk[0] < len(required) and required[chunk[0]]):
                continue
            if _all_fill(values[region], fill) and not self.has_chunk(chunk):
                raise StoreCorruptionError(
                    self.where,
                    self.array.path,
                    chunk,
                    MISSING,
                    self.key(chunk),
                )


def _as_tuple(selection: Any) -> tuple:
    return selection if isinstance(selection, tuple) else (selection,)


def _all_fill(values: np.ndarray, fill: Any) -> bool:
    """Whether ``values`` are all ``fill`` (NaN matching NaN); looks at the first value first."""
    if values.size == 0:
        return False
    first = values.flat[0]
    if isinstance(fill, (float, np.floating)) and np.isnan(fill):
        return bool(np.isnan(first)) and bool(np.isnan(values).all())
    return bool(first == fill) and bool((values == fill).all())


def _decode_problem(error: Exception) -> str:
    if isinstance(error, ValueError) and "checksum" in str(error).lower():
        return "fails its checksum: the object was truncated or altered"
    return f"does not decode ({type(error).__name__}: {error})"


def block_selection(array: zarr.Array, chunk: tuple[int, ...]) -> tuple[slice, ...]:
    """The slices of ``array`` that chunk ``chunk`` holds."""
    return tuple(
        slice(coordinate * size, min((coordinate + 1) * size, length))
        for coordinate, size, length in zip(chunk, array.chunks, array.shape)
    )


# -- the whole-store check -------------------------------------------------------------------


@dataclass(frozen=True)
class MarkedLayout:
    """Groups (under ``section``) whose ``done`` array marks row chunks finished.

    Attributes:
        section: top-level group the layout is found under.
        rows: arrays chunked along rows like the marks: chunk ``c`` along the first axis is row
            chunk ``c``.
        required: of these, those every finished row chunk has.
        finite: of these, those whose finished chunks must hold finite values.
        derived: arrays computed from the rows (deleted when a row is dropped); each may have an
            attribute ``<name>_complete`` saying it is finished.
        derived_attrs: group attributes computed from the rows (deleted with them).
        rerun: what recomputes a dropped row chunk.
    """

    section: str
    rows: tuple[str, ...]
    required: tuple[str, ...]
    finite: tuple[str, ...]
    derived: tuple[str, ...]
    derived_attrs: tuple[str, ...]
    rerun: str


# The attributes of a checkpoint's features group computed from its rows (sealed: SEAL_ATTRIBUTE).
FEATURE_DERIVED_ATTRS = ("gram_complete", "gram_chunks", "dual_gram_complete", "statistics")

# The layouts of store.py (features) and subsets/experiment.py (subset tables).
MARKED_LAYOUTS = (
    MarkedLayout(
        section="features",
        # partial_gram: (n_chunks, k, k), one chunk per row chunk; absent once folded into gram
        rows=("features", "out_to_loss", "example_hash", "partial_gram"),
        required=("features", "out_to_loss", "example_hash"),
        finite=("features", "out_to_loss", "partial_gram"),
        derived=("gram", "dual_gram"),
        derived_attrs=FEATURE_DERIVED_ATTRS,
        rerun="the next fit recomputes it",
    ),
    MarkedLayout(
        section="subsets",
        rows=("masks", "outputs", "train_seeds"),
        required=("masks", "outputs", "train_seeds"),
        finite=(),
        derived=(),
        derived_attrs=(),
        rerun="the next subsets run recomputes it",
    ),
)
SCORES_SECTION = "scores"
LEFT_AS_IS = "left as is: verify cannot recompute it"
RESTORE_METADATA = (
    "left as is: restore its zarr.json from a copy, or move the store aside and start a new one"
)
REBUILT = "the next fit rebuilds it"
REBUILD = f"delete it: {REBUILT}"
NOT_FINITE = "holds NaN or infinite values"
MISPLACED = (
    "holds values other than those written there (a chunk moved from another position or another "
    "store: it decodes, but its digest is not the one recorded when its row chunk was written)"
)
# Columns of a row chunk's digests (CheckpointFeatures' "digest" array): which array's chunk each
# covers; a partial Gram's digest covers its diagonal.
DIGEST_COLUMNS = ("features", "out_to_loss", "partial_gram")
# Attribute of the digest array: every chunk marked done has its digest (false where chunks were
# finished before the array was created, by an earlier version; absent in stores of that time).
EVERY_CHUNK_DIGESTED = "every_chunk"


def chunk_digest(values: np.ndarray, rows: int | None = None) -> int:
    """CRC-32 of ``values``' bytes in C order, zero-padded to ``rows`` rows when given: what a
    row chunk's recorded digest is checked against. A chunk's own checksum (zarr's crc32c codec)
    covers its encoded bytes only, so a chunk copied to another position, or from another store,
    would still pass it. The padding makes the last, partial row chunk's digest that of the
    whole chunk, which it stays when the array grows (``extend``: its tail becomes padding that
    reads as zeros)."""
    values = np.ascontiguousarray(values)
    if rows is not None and len(values) < rows:
        padding = np.zeros((rows - len(values), *values.shape[1:]), values.dtype)
        values = np.concatenate([values, padding])
    return zlib.crc32(values.view(np.uint8))


SEAL_ATTRIBUTE = "derived_crc32"
"""The group attribute holding :func:`attribute_seal` of the group's derived attributes."""

ALTERED_ATTRIBUTES = (
    "has attributes derived from its features ({names}) that fail their checksum: its zarr.json "
    "was altered"
)


def attribute_seal(attrs: Mapping[str, Any], names: Sequence[str]) -> int | None:
    """CRC-32 of the attributes ``names`` present in ``attrs`` (canonical JSON), or ``None`` if
    none is. Zarr's checksums cover chunks, not a group's ``zarr.json``: a flipped digit there
    (the neighbour cosine ``ρ`` 0.67 read as 0.47) still parses, and the damping rule would read
    it. The seal is written with those attributes in one metadata write and checked on reads."""
    values = {name: attrs[name] for name in names if name in attrs}
    if not values:
        return None
    return zlib.crc32(json.dumps(values, sort_keys=True, separators=(",", ":")).encode())


def seal_holds(attrs: Mapping[str, Any], names: Sequence[str]) -> bool:
    """Whether ``attrs``' seal matches its attributes ``names``: true without a seal (nothing
    derived yet, or a store written before seals)."""
    seal = attrs.get(SEAL_ATTRIBUTE)
    return seal is None or seal == attribute_seal(attrs, names)


def resealed(attrs: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """``attrs`` with its seal of ``names`` recomputed (dropped when none of them is left)."""
    attrs = dict(attrs)
    seal = attribute_seal(attrs, names)
    if seal is None:
        attrs.pop(SEAL_ATTRIBUTE, None)
    else:
        attrs[SEAL_ATTRIBUTE] = seal
    return attrs


def digest_values(name: str, values: np.ndarray) -> np.ndarray:
    """What the digest of array ``name``'s chunk covers: a partial Gram's diagonal, else it all."""
    return np.diagonal(values.reshape(values.shape[-2:])) if name == "partial_gram" else values


def digest_rows(name: str, array: Any) -> int | None:
    """The rows a chunk of array ``name`` is padded to for its digest (none for a partial Gram,
    whose digest is of its diagonal)."""
    return None if name == "partial_gram" else array.chunks[0]


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a store.

    Attributes:
        array: path of the array (or group) in the store.
        chunk: grid coordinates of the chunk, or ``None`` for the whole array or group.
        problem: what is wrong.
        repair: what ``repair=True`` does about it.
        repairable: whether ``repair=True`` drops it (``False``: it is left as is).
    """

    array: str
    chunk: tuple[int, ...] | None
    problem: str
    repair: str
    repairable: bool = True


@dataclass
class VerifyReport:
    """What :func:`verify_store` found.

    Attributes:
        where: the store's location.
        problems: everything wrong, in store order.
        arrays: number of arrays checked.
        chunks: number of chunk objects decoded.
        unchecksummed: arrays written before checksums (damage there may go unnoticed).
        repaired: whether the problems were repaired.
    """

    where: str
    problems: list[Problem] = field(default_factory=list)
    arrays: int = 0
    chunks: int = 0
    unchecksummed: list[str] = field(default_factory=list)
    repaired: bool = False

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def left(self) -> list[Problem]:
        """The problems that ``repair`` leaves as is (it cannot recompute what they damaged)."""
        return [problem for problem in self.problems if not problem.repairable]


def verify_store(store: Store | str | Path, repair: bool = False) -> VerifyReport:
    """Check a whole store: every chunk of every array decodes, completion marks agree with the
    chunks present, the features and out-to-loss weights of finished chunks are finite, saved
    scores are complete, and no node has lost its ``zarr.json`` while objects remain under it.

    With ``repair``, drop what is damaged so that the next run recomputes only that: the marks of
    damaged feature and subset row chunks (and their damaged objects), the arrays and attributes
    derived from those rows (``gram``, ``dual_gram``, ``statistics``), damaged or incomplete
    saved scores, and a kernel or saved score matrix whose metadata was lost. Damage elsewhere
    is reported and left as is (:attr:`VerifyReport.left`).

    Args:
        store: a :class:`~datatrace.store.Store`, a directory or an fsspec URL (opened read-only
            unless ``repair``).
        repair: drop what is damaged.

    Returns:
        :class:`VerifyReport`.
    """
    from datatrace.store.store import Store

    if not isinstance(store, Store):
        store = Store(store, read_only=not repair)
    check = _Verification(store)
    check.run()
    if repair and check.report.problems:
        check.repair()
    return check.report


@contextlib.contextmanager
def directories_without_metadata_unlisted() -> Iterator[None]:
    """Silence zarr's warning about a directory without ``zarr.json`` while listing nodes: it
    is not a node, and :func:`lost_nodes` reports it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Object at .* is not recognized", UserWarning)
        yield


def store_nodes(store: Store) -> dict[str, zarr.Group | zarr.Array]:
    """Every group and array of ``store`` by path (zarr's listing; a directory without
    ``zarr.json`` is not a node: :func:`lost_nodes` finds those)."""
    with directories_without_metadata_unlisted():
        return dict(store.root.members(max_depth=None))


def lost_nodes(
    store: Store, nodes: Mapping[str, zarr.Group | zarr.Array] | None = None
) -> dict[str, int]:
    """The nodes of ``store`` whose ``zarr.json`` was lost while objects remain under them, with
    the number of those objects, in store order. zarr lists no node there, so every object of
    the store is listed and placed under the deepest node above it: an array owns it as a
    chunk; a group with it in a directory below has lost the node of that directory. Temporary
    objects of writes in progress and hidden names do not count, and a node is looked up again
    before it is reported (another process may have created it since ``nodes`` was listed).

    Args:
        store: the store.
        nodes: its groups and arrays by path, if already listed (:func:`store_nodes`).
    """
    from datatrace.store.store import PARTIAL_SUFFIX, ZARR_METADATA

    nodes = store_nodes(store) if nodes is None else nodes
    arrays = {path for path, node in nodes.items() if isinstance(node, zarr.Array)}
    groups = {""} | set(nodes) - arrays
    known = arrays | groups
    lost: dict[str, int] = {}
    for key in sync(_list(store.zarr_store, "")):
        parts = key.split("/")
        if key.endswith(PARTIAL_SUFFIX) or any(part.startswith(".") for part in parts):
            continue
        depth = next(d for d in range(len(parts) - 1, -1, -1) if "/".join(parts[:d]) in known)
        if "/".join(parts[:depth]) in groups and depth < len(parts) - 1:
            node = "/".join(parts[: depth + 1])
            lost[node] = lost.get(node, 0) + 1
    return {
        node: count
        for node, count in sorted(lost.items())
        if not sync(store.zarr_store.exists(f"{node}/{ZARR_METADATA}"))
    }


def lost_metadata_problem(count: int) -> str:
    """What is wrong with a node whose ``zarr.json`` is missing, ``count`` objects under it."""
    objects = f"{count} object{'s' if count > 1 else ''} remain{'s' if count == 1 else ''}"
    return f"has lost its metadata (its zarr.json is missing; {objects} under it)"


class _Verification:
    def __init__(self, store: Store):
        self.store = store
        self.report = VerifyReport(store.where)
        self.nodes = store_nodes(store)
        # What repair does, applied once the whole store is read.
        self.delete_keys: set[str] = set()
        self.delete_nodes: set[str] = set()
        self.drop_attrs: set[tuple[str, str]] = set()
        self.delete_prefixes: set[str] = set()  # directories of lost nodes

    def run(self) -> None:
        checked: set[str] = set()
        for path, node in self.nodes.items():
            if not isinstance(node, zarr.Group):
                continue
            layout = self._marked_layout(path)
            if layout is not None:
                checked |= self._check_marked(path, node, layout)
            elif path.startswith(f"{SCORES_SECTION}/") and "scores" in node:
                checked |= self._check_scores(path, node)
        for path, node in self.nodes.items():
            if isinstance(node, zarr.Array) and path not in checked:
                for chunk, problem in self._check_array(path, node, required=False):
                    self._problem(path, chunk, problem, LEFT_AS_IS, repairable=False)
        self._check_lost_metadata()

    def _check_lost_metadata(self) -> None:
        """Report the nodes whose ``zarr.json`` was lost (:func:`lost_nodes`). A lost kernel or
        saved score matrix is dropped by ``repair`` (rebuilt from the checked features, or
        scored again); anything else needs its file back."""
        for node, count in lost_nodes(self.store, self.nodes).items():
            parent, _, name = node.rpartition("/")
            layout = self._marked_layout(parent)
            problem = lost_metadata_problem(count)
            if layout is not None and name in layout.derived:
                repair = f"delete its objects: {REBUILT}"
                self._drop_derived(parent, layout)
            elif node.startswith(f"{SCORES_SECTION}/"):
                scores = "/".join(node.split("/")[:2])
                repair = f"delete {scores}: score again to save it"
                self.delete_nodes.add(scores)
            else:
                self._problem(node, None, problem, RESTORE_METADATA, repairable=False)
                continue
            self.delete_prefixes.add(node)
            self._problem(node, None, problem, repair)

    def _drop_derived(self, path: str, layout: MarkedLayout) -> None:
        """Have ``repair`` drop what the group at ``path`` derived from its rows."""
        self.delete_nodes |= {f"{path}/{name}" for name in layout.derived}
        self.drop_attrs |= {(path, name) for name in layout.derived_attrs}

    def _marked_layout(self, path: str) -> MarkedLayout | None:
        done = self.nodes.get(f"{path}/done")
        if not isinstance(done, zarr.Array) or done.ndim != 1 or done.chunks != (1,):
            return None
        for layout in MARKED_LAYOUTS:
            if path.startswith(f"{layout.section}/"):
                return layout
        return None

    def _check_marked(self, path: str, group: zarr.Group, layout: MarkedLayout) -> set[str]:
        done_array = self.nodes[f"{path}/done"]
        done = np.zeros(done_array.shape[0], bool)

        def keep_mark(chunk: tuple[int, ...], block: np.ndarray) -> None:
            done[chunk[0]] = bool(block[0])

        damaged_rows = {}
        for chunk, problem in self._check_array(f"{path}/done", done_array, False, keep_mark):
            damaged_rows.setdefault(chunk[0], []).append((f"{path}/done", chunk, problem))
        checked = {f"{path}/done"}
        digests = self._digests(path, done, damaged_rows, checked)
        for name in layout.rows:
            array = self.nodes.get(f"{path}/{name}")
            if not isinstance(array, zarr.Array) or array.cdata_shape[:1] != (len(done),):
                continue  # not chunked like the marks: checked as any other array
            checked.add(f"{path}/{name}")
            required = done if name in layout.required else False
            expected = None
            if digests is not None and name in DIGEST_COLUMNS:
                expected = digests[:, DIGEST_COLUMNS.index(name)]
            problems = self._check_array(
                f"{path}/{name}", array, required, finite=name in layout.finite, digests=expected
            )
            for chunk, problem in problems:
                damaged_rows.setdefault(chunk[0], []).append((f"{path}/{name}", chunk, problem))
        repair = "unmark row chunk {row}: " + layout.rerun
        if layout.derived:
            repair += f" (and rebuilds {', '.join(layout.derived)})"
        for row in sorted(damaged_rows):
            for array_path, chunk, problem in damaged_rows[row]:
                self._problem(array_path, chunk, problem, repair.format(row=row))
                if problem != MISSING:
                    self.delete_keys.add(CheckedArray(self.nodes[array_path], "").key(chunk))
            self.delete_keys.add(CheckedArray(done_array, "").key((row,)))
        altered = not seal_holds(group.attrs.asdict(), layout.derived_attrs)
        if altered:
            names = ", ".join(name for name in layout.derived_attrs if name in group.attrs)
            self._problem(
                path, None, ALTERED_ATTRIBUTES.format(names=names),
                f"drop them, with {' and '.join(layout.derived)}: the next fit rebuilds them from "
                "the features",
            )  # fmt: skip
        if damaged_rows or altered:
            self._drop_derived(path, layout)
        for name in layout.derived:
            complete = bool(group.attrs.get(f"{name}_complete"))
            array = self.nodes.get(f"{path}/{name}")
            problems = []
            if isinstance(array, zarr.Array):
                checked.add(f"{path}/{name}")
                problems = self._check_array(f"{path}/{name}", array, complete)
            elif complete:
                problems = [(None, "is marked complete but missing")]
            for chunk, problem in problems:
                self._problem(f"{path}/{name}", chunk, problem, REBUILD)
            if problems:
                self.delete_nodes.add(f"{path}/{name}")
                self.drop_attrs.add((path, f"{name}_complete"))
        return checked

    def _digests(self, path, done, damaged_rows, checked) -> np.ndarray | None:
        """The ``(n_chunks, 3)`` digests recorded with each row chunk of the group at ``path``
        (0 where none was: a chunk not written, or written before digests), or ``None`` if the
        group has none; a damaged digest, or a lost one of a chunk marked ``done`` where every
        chunk has one, is reported with its row and reads as 0."""
        array = self.nodes.get(f"{path}/digest")
        if not isinstance(array, zarr.Array) or array.shape != (len(done), len(DIGEST_COLUMNS)):
            return None
        checked.add(f"{path}/digest")
        digests = np.zeros(array.shape, np.uint64)

        def keep(chunk: tuple[int, ...], block: np.ndarray) -> None:
            digests[chunk[0]] = block

        required = done if array.attrs.get(EVERY_CHUNK_DIGESTED) else False
        for chunk, problem in self._check_array(f"{path}/digest", array, required, digests=None,
                                                each=keep):  # fmt: skip
            damaged_rows.setdefault(chunk[0], []).append((f"{path}/digest", chunk, problem))
        return digests

    def _check_scores(self, path: str, group: zarr.Group) -> set[str]:
        complete = bool(group.attrs.get("complete"))
        problems = [] if complete else [(path, None, "is incomplete: its save was interrupted")]
        checked = set()
        for name in ("scores", "out_to_loss"):
            array = self.nodes.get(f"{path}/{name}")
            if isinstance(array, zarr.Array):
                checked.add(f"{path}/{name}")
                for chunk, problem in self._check_array(f"{path}/{name}", array, complete):
                    problems.append((f"{path}/{name}", chunk, problem))
        for array_path, chunk, problem in problems:
            self._problem(array_path, chunk, problem, f"delete {path}: score again to save it")
        if problems:
            self.delete_nodes.add(path)
        return checked

    def _check_array(
        self,
        path: str,
        array: zarr.Array,
        required: bool | np.ndarray,
        marks: Callable[[tuple[int, ...], np.ndarray], None] | None = None,
        finite: bool = False,
        digests: np.ndarray | None = None,
        each: Callable[[tuple[int, ...], np.ndarray], None] | None = None,
    ) -> list[tuple[tuple[int, ...], str]]:
        """Decode every chunk of ``array`` that is present or ``required`` (as for
        :meth:`CheckedArray.read`), returning the problems found. ``marks``: the array holds
        completion marks (a missing chunk is not done), each decoded chunk is passed to it.
        ``digests``: per row chunk, the digest its values must have (0: none recorded).
        ``each``: passed every chunk that decodes."""
        self.report.arrays += 1
        checked = CheckedArray(array, self.store.where, marks=marks is not None)
        if not checked.stores_every_chunk and array.nchunks > 0:
            self.report.unchecksummed.append(path)
        present = set(sync(_list(self.store.zarr_store, f"{array.path}/")))
        found = []
        for chunk in np.ndindex(*array.cdata_shape):
            needed = bool(
                required is True
                or (required is not False and chunk[0] < len(required) and required[chunk[0]])
            )
            if checked.key(chunk) not in present:
                if needed and checked.stores_every_chunk and marks is None:
                    found.append((chunk, MISSING))
                continue
            try:
                block = checked.read(block_selection(array, chunk), required=False)
            except StoreCorruptionError as error:
                found.append((chunk, error.problem))
                continue
            self.report.chunks += 1
            expected = 0 if digests is None or chunk[0] >= len(digests) else int(digests[chunk[0]])
            name = path.rsplit("/", 1)[-1]
            if finite and needed and not np.isfinite(block).all():
                found.append((chunk, NOT_FINITE))
            elif expected and expected != chunk_digest(
                digest_values(name, np.asarray(block)), digest_rows(name, array)
            ):
                found.append((chunk, MISPLACED))
            elif marks is not None:
                marks(chunk, np.asarray(block).reshape(-1))
            if each is not None:
                each(chunk, np.asarray(block).reshape(-1))
        return found

    def _problem(
        self,
        path: str,
        chunk: tuple[int, ...] | None,
        problem: str,
        repair: str,
        repairable: bool = True,
    ) -> None:
        self.report.problems.append(Problem(path, chunk, problem, repair, repairable))

    def repair(self) -> None:
        for key in sorted(self.delete_keys):
            sync(self.store.zarr_store.delete(key))
        for prefix in sorted(self.delete_prefixes):
            sync(self.store.zarr_store.delete_dir(prefix))
        for path in sorted(self.delete_nodes):
            if path in self.store.root:
                del self.store.root[path]
        dropped: dict[str, set[str]] = {}
        for path, name in self.drop_attrs:
            dropped.setdefault(path, set()).add(name)
        for path, names in sorted(dropped.items()):
            if path not in self.store.root:
                continue
            group = self.store.root[path]
            attrs = group.attrs.asdict()
            if names.isdisjoint(attrs):
                continue
            for name in names:
                attrs.pop(name, None)
            layout = self._marked_layout(path)
            group.attrs.put(resealed(attrs, layout.derived_attrs if layout else ()))
        self.report.repaired = True


async def _list(zarr_store: zarr.abc.store.Store, prefix: str) -> list[str]:
    return [key async for key in zarr_store.list_prefix(prefix)]
