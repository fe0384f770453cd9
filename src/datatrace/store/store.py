"""The datatrace store: a Zarr v3 group holding everything a run computes.

Layout::

    <root>/                          attrs["datatrace"]: {"format": version}
      features/                      attrs["provenance"]: model, task, projector, seed, data, ...
      features/<c>/                  one group per checkpoint c; attrs["identity"]: its fingerprint
                                     and projection seed
        features     (n_train, k)    float32, chunked along training examples
        out_to_loss  (n_train,)      float32, same row chunks
        example_hash (n_train,)      uint64 hash of each example, same row chunks (when given)
        done         (n_chunks,)     uint8, one chunk per row chunk: 1 once its data is written
        digest       (n_chunks, 3)   uint32 CRC-32 of the chunk's features, out-to-loss weights
                                     and partial Gram diagonal (0: none), written before its
                                     mark: a chunk moved from elsewhere decodes but is refused;
                                     attribute every_chunk: every chunk marked done has one
        partial_gram (n_chunks, k, k) float64 Φ_chunkᵀΦ_chunk of each row chunk, written with it
                                     (when k ≤ n); its objects deleted once folded into gram
        removed      (n_train,)      uint8 1 for rows that are not (or no longer) training
                                     examples (see remove_rows, extend); absent: none
        gram         (k, k)          float64 ΦᵀΦ of the kept rows, written when every row chunk
                                     is done (k ≤ n); attrs["gram_chunks"]: row chunks it covers
        dual_gram    (n, n)          float64 ΦΦᵀ of the kept rows, instead, when k > n and
                                     k > 4,096 (below, computed from Φ when needed)
                                     attrs["statistics"]: what the damping rule reads
                                     attrs["derived_crc32"]: seal of the attributes computed
                                     from the rows (statistics, gram_*), checked on reads
      scores/<name>/                 saved Attributions (see attributions.py)

Partial Grams. ``ΦᵀΦ = Σ_chunks Φ_chunkᵀΦ_chunk``, so the primal kernel is assembled by adding the
partial Grams in chunk order (bit for bit the same sum whichever process computed which chunk)
and never reads ``Φ``. They cost ``8k²`` bytes per chunk (``2k/chunk_rows`` times the chunk's
features), so once ``gram`` holds their sum their objects are deleted (the array's metadata
stays); adding examples later adds the new chunks' partial Grams to ``gram``. The dual ``ΦΦᵀ``
(``n × n``, used when ``k > n``) is not a sum of per-chunk terms (its blocks pair every two
chunks): it is built by reading ``Φ``, which is then smaller than one ``k × k`` matrix. A chunk
without a partial Gram (stores written before they existed) is read from ``Φ`` instead.

A row chunk's completion mark is written after its data, and every chunk is its own object, so a
crash at any point loses at most the chunks in flight, and independent processes (or machines, on
object storage) can each write their own chunks of one store. Provenance is checked before any
write: opening a store with a different model, task, projector, seed or training set raises
:class:`StoreMismatchError` and leaves the store untouched.

Every array carries a checksum per chunk and every read is checked (:mod:`datatrace.store.verify`):
a damaged or lost chunk raises :class:`StoreCorruptionError` naming it, never serves wrong values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
import zarr.errors
import zarr.storage
from zarr.core.group import GroupMetadata
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.core.sync import sync

from datatrace.methods.kernel import KernelStatistics, neighbour_sample, neighbour_statistics
from datatrace.store.provenance import json_normalise
from datatrace.store.verify import (
    ALTERED_ATTRIBUTES,
    DIGEST_COLUMNS,
    EVERY_CHUNK_DIGESTED,
    FEATURE_DERIVED_ATTRS,
    METADATA_ADVICE,
    MISPLACED,
    MISSING,
    CheckedArray,
    StoreCorruptionError,
    chunk_digest,
    create_array,
    digest_rows,
    digest_values,
    directories_without_metadata_unlisted,
    resealed,
    seal_holds,
)

if TYPE_CHECKING:
    from datatrace.attributions import Attributions

FORMAT_VERSION = 1
# Rows of the stored ΦᵀΦ per chunk: keeps chunks under ~130 MB even for k = 32768.
GRAM_CHUNK_ROWS = 512
# The dual ΦΦᵀ is stored only above this k. Below, computing it again from Φ (n²k multiply-adds,
# when a store is reopened) costs about what writing its 8n² bytes costs every fit: n = 2,000,
# k = 2,048, 2 cores: computed in 62 ms, written in 24–95 ms (the first write of a process the
# slowest), read back in 15 ms; at k = 8,192 computing takes 226 ms.
STORED_DUAL_GRAM_MIN_DIM = 4096
# Chunks of saved score matrices: (targets, training examples), ~4 MB of float32.
SCORE_CHUNK = (256, 4096)
ZARR_METADATA = "zarr.json"
PARTIAL_SUFFIX = ".partial"
# Top-level groups a datatrace store may hold: a directory with them is a damaged store, not a
# foreign directory, when its root metadata is lost.
SECTIONS = ("features", "scores", "subsets")
# Directories of chunk objects (zarr's default chunk key encoding), skipped by check_metadata.
CHUNK_DIRECTORY = "c"
# Entries of a foreign directory named when refusing it.
SHOWN_ENTRIES = 5


class StoreMismatchError(ValueError):
    """The store holds results of a different run than the one being asked for."""


def check_store_directory(path: Path, read_only: bool) -> None:
    """Refuse a local path that is not (and cannot become) a datatrace store.

    Raises:
        NotADirectoryError: ``path`` is a file.
        ValueError: ``path`` is a directory holding something else (hidden and temporary
            ``.partial`` entries are ignored), so that it is never silently turned into a store.
        FileNotFoundError: ``read_only`` and ``path`` is an empty directory.
    """
    if path.is_file():
        raise NotADirectoryError(
            f"{path} is a file, not a datatrace store directory: choose a directory path"
        )
    if not path.is_dir():
        return
    # Hidden files, and the temporary files of zarr's atomic writes (another process creating
    # the store, or a write killed midway), say nothing about what the directory holds.
    entries = sorted(
        entry.name
        for entry in path.iterdir()
        if not entry.name.startswith(".") and not entry.name.endswith(PARTIAL_SUFFIX)
    )
    if not entries:
        if read_only:
            raise FileNotFoundError(f"no datatrace store at {path}: the directory is empty")
        return
    metadata = path / ZARR_METADATA
    sections = [name for name in SECTIONS if (path / name / ZARR_METADATA).is_file()]
    if metadata.is_file():
        try:
            root = json.loads(metadata.read_bytes())
        except ValueError:  # not JSON, or not UTF-8: not a Zarr group's metadata
            if sections:
                raise StoreCorruptionError(
                    str(path), "/", None, "has damaged root metadata (it does not parse)",
                    ZARR_METADATA, METADATA_ADVICE,
                ) from None  # fmt: skip
            root = {}
        if not isinstance(root, dict):
            root = {}
        attributes = root.get("attributes")
        ours = isinstance(attributes, dict) and "datatrace" in attributes
        # A group without attributes yet is a store another process is creating this moment.
        if root.get("node_type") == "group" and (ours or entries == [ZARR_METADATA]):
            return
        if sections:  # parses, but is not (or no longer) a datatrace store's root group
            problem = metadata_problem(root) or "it lacks the datatrace attributes"
            raise StoreCorruptionError(
                str(path), "/", None, f"has damaged root metadata ({problem})",
                ZARR_METADATA, METADATA_ADVICE,
            )  # fmt: skip
    elif sections:
        raise StoreCorruptionError(
            str(path), "/", None,
            f"has lost its root metadata (no {ZARR_METADATA}, though it holds "
            f"{', '.join(sections)})", ZARR_METADATA, METADATA_ADVICE,
        )  # fmt: skip
    shown = ", ".join(entries[:SHOWN_ENTRIES]) + (", ..." if len(entries) > SHOWN_ENTRIES else "")
    raise ValueError(
        f"{path} exists and is not a datatrace store (it holds {shown}): pass an empty or new "
        "directory"
    )


def check_metadata(path: Path) -> None:
    """Refuse a local store whose metadata is damaged: every group's and array's ``zarr.json``
    must parse (zarr would raise a bare JSON error on the first read). Chunk directories are not
    walked, so the cost is one small read per group and array.

    Raises:
        StoreCorruptionError: naming the first group or array whose metadata does not parse.
    """
    for directory, subdirectories, files in os.walk(path):
        subdirectories[:] = sorted(
            name for name in subdirectories if name != CHUNK_DIRECTORY and not name.startswith(".")
        )
        if ZARR_METADATA not in files:
            continue
        relative = Path(directory).relative_to(path).as_posix()
        node = "/" if relative == "." else relative
        key = ZARR_METADATA if node == "/" else f"{node}/{ZARR_METADATA}"
        try:
            metadata = json.loads((Path(directory) / ZARR_METADATA).read_bytes())
        except FileNotFoundError:  # another process replacing this node at this moment
            continue
        except ValueError as error:
            raise StoreCorruptionError(
                str(path), node, None, f"has damaged metadata ({error})", key, METADATA_ADVICE
            ) from None
        problem = metadata_problem(metadata)
        if problem is not None:
            raise StoreCorruptionError(
                str(path), node, None, f"has damaged metadata ({problem})", key, METADATA_ADVICE
            )


def metadata_problem(metadata: Any) -> str | None:
    """What makes a parsed ``zarr.json`` unreadable as zarr v3 group or array metadata (zarr
    itself would raise a bare validation error on the first read), or ``None``."""
    if not isinstance(metadata, dict):
        return f"a JSON {type(metadata).__name__}, not an object"
    node_type = metadata.get("node_type")
    if metadata.get("zarr_format") != 3 or node_type not in ("group", "array"):
        return (
            f"zarr_format {metadata.get('zarr_format')!r} and node_type {node_type!r}, "
            "where zarr v3 metadata has 3 and 'group' or 'array'"
        )
    parse = GroupMetadata.from_dict if node_type == "group" else ArrayV3Metadata.from_dict
    try:
        parse(dict(metadata))
    except Exception as error:  # zarr raises KeyError, TypeError, ValueError and its own
        return f"not valid {node_type} metadata: {type(error).__name__}: {error}"
    return None


class Store:
    """A datatrace store on local disk, in memory, or on any fsspec filesystem.

    Args:
        location: ``None`` for an in-memory store; a local directory path; an fsspec URL such as
            ``"s3://bucket/run.zarr"`` (needs ``pip install "datatrace[remote]"``); or a
            ``zarr.abc.store.Store``.
        read_only: open without permission to write.
    """

    def __init__(
        self, location: str | Path | zarr.abc.store.Store | None = None, read_only: bool = False
    ):
        if isinstance(location, Store):
            location = location.zarr_store
        if location is None:
            zarr_store = zarr.storage.MemoryStore()
        elif isinstance(location, zarr.abc.store.Store):
            zarr_store = location
        elif "://" in str(location):
            # fsspec's local filesystem does not create parent directories unless asked to
            options = {"auto_mkdir": True} if str(location).startswith("file://") else None
            zarr_store = zarr.storage.FsspecStore.from_url(
                str(location), read_only=read_only, storage_options=options
            )
        else:
            if read_only and not Path(location).exists():
                raise FileNotFoundError(f"no datatrace store at {location}")
            check_store_directory(Path(location), read_only)
            if Path(location).is_dir():
                check_metadata(Path(location))
            zarr_store = zarr.storage.LocalStore(str(location), read_only=read_only)
        self.location = None if location is None else str(location)
        self.zarr_store = zarr_store
        mode = "r" if read_only else "a"
        try:
            self.root = zarr.open_group(store=zarr_store, mode=mode)
        except zarr.errors.ContainsGroupError:  # another process created it at the same moment
            self.root = zarr.open_group(store=zarr_store, mode=mode)
        if not read_only and "datatrace" not in self.root.attrs:
            self.root.attrs["datatrace"] = {"format": FORMAT_VERSION}
        found = self.root.attrs.get("datatrace", {}).get("format")
        if found is not None and found != FORMAT_VERSION:
            raise StoreMismatchError(
                f"the store at {self.where} has format version {found}, but this datatrace "
                f"reads version {FORMAT_VERSION}: recompute into a new store"
            )

    @property
    def where(self) -> str:
        return self.location or "<memory>"

    def lost_metadata(self, path: str) -> bool:
        """Whether objects exist under ``path`` although no group or array is there: its
        ``zarr.json`` was lost (zarr would silently create a new, empty node in its place).

        Temporary objects of writes in progress (``<key>.<id>.partial``: another process
        creating this node this moment) do not count.
        """
        if path in self.root:
            return False

        async def first() -> bool:
            async for key in self.zarr_store.list_prefix(f"{path}/"):
                if not key.endswith(PARTIAL_SUFFIX):
                    return True
            return False

        # Asked again after the listing: another process may have created the node meanwhile.
        return bool(sync(first())) and path not in self.root

    def refuse_lost_metadata(self, path: str) -> None:
        """Raise :class:`StoreCorruptionError` if ``path`` has lost its metadata."""
        if self.lost_metadata(path):
            raise StoreCorruptionError(
                self.where, path, None, "has lost its metadata (its zarr.json is missing)",
                f"{path}/{ZARR_METADATA}", METADATA_ADVICE,
            )  # fmt: skip

    def provenance(self, section: str) -> dict[str, Any] | None:
        """The provenance recorded for the group ``section`` (e.g. ``"features"``), or ``None``."""
        if section not in self.root:
            return None
        return self.root[section].attrs.get("provenance")

    def recorded_provenance(self, section: str) -> dict[str, Any] | None:
        """The provenance recorded for ``section``, or ``None`` where the section was never
        written.

        Raises:
            StoreCorruptionError: the section holds results (or objects without metadata) but
                no provenance: its ``zarr.json`` was damaged or replaced.
        """
        recorded = self.provenance(section)
        if recorded is None and (
            self.lost_metadata(section) or (section in self.root and self.groups(section))
        ):
            raise StoreCorruptionError(
                self.where, section, None, "holds results but has lost its provenance",
                f"{section}/{ZARR_METADATA}", METADATA_ADVICE,
            )  # fmt: skip
        return recorded

    def check_provenance(
        self, section: str, provenance: dict[str, Any], adopt: Iterable[str] = ()
    ) -> dict[str, Any]:
        """Record ``provenance`` for the group ``section``, or check it against what is recorded.

        Each section keeps its provenance in its own group's attributes, so processes working on
        different sections of one store never rewrite each other's metadata.

        Args:
            section: path of the group the provenance covers.
            provenance: JSON-serialisable description of what produces the section.
            adopt: keys whose recorded value wins over the given one (storage layout choices such
                as chunk sizes, which do not change results).

        Returns:
            The provenance in force (recorded values for ``adopt`` keys).

        Raises:
            StoreMismatchError: a key differs from what is recorded; nothing is written.
        """
        provenance = json_normalise(provenance)
        recorded = self.recorded_provenance(section)
        if recorded is None:
            try:
                group = self.root.require_group(section)
            except zarr.errors.ContainsGroupError:  # another process created it at the same moment
                group = self.root[section]
            group.attrs["provenance"] = provenance
            return provenance
        adopted = {**provenance, **{key: recorded[key] for key in adopt if key in recorded}}
        differences = [
            f"  {key}: stored {recorded.get(key)!r}, now {adopted.get(key)!r}"
            for key in sorted(set(recorded) | set(adopted))
            if recorded.get(key) != adopted.get(key)
        ]
        if differences:
            raise StoreMismatchError(
                f"the store at {self.where} holds {section} of a different run:\n"
                + "\n".join(differences)
                + "\nUse a new store location for this run (or delete the old one to recompute)."
            )
        return adopted

    def checkpoint_features(
        self, checkpoint: int, n_rows: int, dim: int, chunk_rows: int, attrs: dict[str, Any]
    ) -> CheckpointFeatures:
        """The feature arrays of one checkpoint, created on first use.

        Raises:
            StoreMismatchError: the stored checkpoint has different ``attrs`` (e.g. another
                checkpoint's fingerprint was featurized at this index).
        """
        return CheckpointFeatures(self, checkpoint, n_rows, dim, chunk_rows, json_normalise(attrs))

    def save_attributions(self, name: str, attributions: Attributions) -> None:
        """Write ``attributions`` under ``scores/<name>``, replacing what was there.

        The data is written first and the group's ``complete`` attribute last, so a crash while
        saving never leaves something that :meth:`load_attributions` would read as finished.
        """
        path = f"scores/{name}"
        if path in self.root:
            del self.root[path]
        group = self.root.create_group(path, attributes={"complete": False})
        scores = create_array(
            group,
            "scores",
            shape=attributions.scores.shape,
            dtype=attributions.scores.dtype,
            chunks=(
                min(attributions.n_targets, SCORE_CHUNK[0]),
                min(attributions.n_train, SCORE_CHUNK[1]),
            ),
        )
        scores[:] = attributions.scores
        if attributions.out_to_loss is not None:
            out_to_loss = create_array(
                group,
                "out_to_loss",
                shape=(attributions.n_train,),
                dtype=attributions.out_to_loss.dtype,
            )
            out_to_loss[:] = attributions.out_to_loss
        group.attrs.update(
            {
                "method": attributions.method,
                "info": json_normalise(attributions.info),
                "complete": True,
            }
        )

    def load_attributions(self, name: str) -> Attributions:
        """Read the attributions saved under ``scores/<name>``.

        Raises:
            KeyError: nothing complete is saved under that name (the message lists what is).
            StoreCorruptionError: a chunk of the saved scores is damaged or lost.
        """
        from datatrace.attributions import Attributions

        path = f"scores/{name}"
        self.refuse_lost_metadata(path)
        if path in self.root:
            for array in ("scores", "out_to_loss"):
                self.refuse_lost_metadata(f"{path}/{array}")
        if path not in self.root or not self.root[path].attrs.get("complete"):
            saved = ", ".join(self.groups("scores")) or "none"
            raise KeyError(
                f"no attributions named {name!r} in the store at {self.where} (saved: {saved})"
            )
        group = self.root[path]
        out_to_loss = self.checked(group["out_to_loss"])[:] if "out_to_loss" in group else None
        return Attributions(
            self.checked(group["scores"])[:],
            group.attrs.get("method", ""),
            out_to_loss,
            dict(group.attrs.get("info", {})),
        )

    def checked(self, array: zarr.Array, marks: bool = False) -> CheckedArray:
        """``array`` with checked reads (see :class:`~datatrace.store.verify.CheckedArray`)."""
        return CheckedArray(array, self.where, marks)

    def groups(self, path: str) -> list[str]:
        """Names of the subgroups at ``path`` (empty if it does not exist). A directory there
        without ``zarr.json`` is not one (zarr warns of it; ``verify`` reports it)."""
        if path not in self.root:
            return []
        with directories_without_metadata_unlisted():
            return sorted(name for name, _ in self.root[path].groups())


class CheckpointFeatures:
    """Row-chunked features and out-to-loss weights of the training set under one checkpoint.

    Reads are checked: a damaged chunk, or one marked done whose data is missing, raises
    :class:`~datatrace.store.verify.StoreCorruptionError` naming it.
    """

    def __init__(
        self,
        store: Store,
        checkpoint: int,
        n_rows: int,
        dim: int,
        chunk_rows: int,
        attrs: dict[str, Any],
    ):
        self.store = store
        self.checkpoint = checkpoint
        self.n_rows = n_rows
        self.chunk_rows = chunk_rows
        self.n_chunks = -(-n_rows // chunk_rows)
        path = f"features/{checkpoint}"
        store.refuse_lost_metadata(path)
        if path not in store.root:
            try:
                store.root.create_group(path, attributes={"identity": attrs})
            except zarr.errors.ContainsGroupError:
                pass  # another process created it at the same moment: checked as any other
        group = store.root[path]
        recorded = dict(group.attrs.get("identity", {}))
        if recorded != attrs:
            differences = [
                f"  {key}: stored {recorded.get(key)!r}, now {attrs.get(key)!r}"
                for key in sorted(set(recorded) | set(attrs))
                if recorded.get(key) != attrs.get(key)
            ]
            raise StoreMismatchError(
                f"checkpoint {checkpoint} in the store at {store.where} was featurized "
                "differently:\n" + "\n".join(differences) + "\nPass the same checkpoints "
                "in the same order, or use a new store location."
            )
        self.group = group
        self.dim = dim
        self.features = self._array("features", (n_rows, dim), (chunk_rows, dim), "float32")
        self.out_to_loss = self._array("out_to_loss", (n_rows,), (chunk_rows,), "float32")
        self.done = self._array("done", (self.n_chunks,), (1,), "uint8", marks=True)
        # Created by the first write with hashes (stores written before have none).
        self.example_hash = (
            self._array("example_hash", (n_rows,), (chunk_rows,), "uint64")
            if "example_hash" in group
            else None
        )
        # Created by the first write (stores written before digests have none: not checked).
        self.digest = (
            self._array("digest", (self.n_chunks, len(DIGEST_COLUMNS)), (1, 3), "uint32")
            if "digest" in group
            else None
        )
        self._digests: np.ndarray | None = None  # read once, when first needed
        # Created by the first write with a partial Gram, deleted once folded into the gram.
        self.partial_gram = self._partial_gram_array() if "partial_gram" in group else None
        # Created by the first removal (or padding of extend): absent means every row is kept.
        self.removed = (
            self._array("removed", (n_rows,), (chunk_rows,), "uint8")
            if "removed" in group
            else None
        )

    def _partial_gram_array(self) -> CheckedArray:
        # Not compressed: zstd does not shrink float64 Grams and would dominate their writes.
        return self._array(
            "partial_gram",
            (self.n_chunks, self.dim, self.dim),
            (1, self.dim, self.dim),
            "float64",
            compress=False,
        )

    def _array(
        self,
        name: str,
        shape: tuple,
        chunks: tuple,
        dtype: str,
        marks: bool = False,
        compress: bool = True,
        attributes: dict[str, Any] | None = None,
    ) -> CheckedArray:
        if name not in self.group:
            self.store.refuse_lost_metadata(f"{self.group.path}/{name}")
            try:
                create_array(
                    self.group, name, compress, shape=shape, chunks=chunks, dtype=dtype,
                    fill_value=0, attributes=attributes or {},
                )  # fmt: skip
            except zarr.errors.ContainsArrayError:
                pass  # another process created it at the same moment
        array = self.group[name]
        if array.shape != shape or array.chunks != chunks:
            raise StoreMismatchError(
                f"{self.group.path}/{name} in the store at {self.store.where} has shape "
                f"{array.shape} in chunks {array.chunks}, expected {shape} in {chunks}"
            )
        return self.store.checked(array, marks)

    def rows(self, chunk: int) -> tuple[int, int]:
        """First and past-the-end training rows of ``chunk``."""
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_rows)

    def completed(self) -> np.ndarray:
        """Boolean ``(n_chunks,)``: which row chunks are written.

        Raises:
            StoreCorruptionError: a completion mark is damaged, or a chunk marked done lacks the
                object of its features or out-to-loss weights.
        """
        done = self.done[:].astype(bool)
        # The marks are read before the objects are listed: a mark is written after its data, so
        # a chunk finished by another process meanwhile is never taken for a lost one.
        for array in (self.features, self.out_to_loss):
            if not array.stores_every_chunk:
                continue  # written before every chunk was stored: absent may mean all zero
            present = array.present_rows()
            for chunk in np.flatnonzero(done):
                if int(chunk) not in present:
                    array.read(slice(*self.rows(int(chunk))))  # raises, naming the chunk
        if self.digest is not None and self.digest.attrs.get(EVERY_CHUNK_DIGESTED):
            present = self.digest.present_rows()
            for chunk in np.flatnonzero(done):
                if int(chunk) not in present:  # lost: the chunk could no longer be checked
                    self.digest.read(slice(int(chunk), int(chunk) + 1))  # raises, naming it
        return done

    def pending(self, shard: tuple[int, int] | None = None) -> list[int]:
        """Row chunks still to compute, restricted to shard ``(index, count)`` if given."""
        chunks = np.flatnonzero(~self.completed())
        if shard is not None:
            index, count = shard
            chunks = chunks[chunks % count == index]
        return chunks.tolist()

    def write(
        self,
        chunk: int,
        features: np.ndarray,
        out_to_loss: np.ndarray,
        example_hashes: np.ndarray | None = None,
        partial_gram: np.ndarray | None = None,
    ) -> None:
        """Write one row chunk's data, then its completion mark.

        A write that fails (a full disk, any ``OSError``) raises before the mark is written, so
        the chunk is computed again by the next run.

        Args:
            chunk: index of the row chunk.
            features: ``(rows_in_chunk, k)`` float32.
            out_to_loss: ``(rows_in_chunk,)`` float32.
            example_hashes: optional ``(rows_in_chunk,)`` uint64 hash of each example, read back
                by :meth:`example_hashes`.
            partial_gram: optional ``(k, k)`` float64 ``featuresᵀfeatures`` of the chunk
                (:func:`partial_gram`), added up by :meth:`gram` instead of reading the features.
        """
        start, stop = self.rows(chunk)
        if partial_gram is not None:
            partial_gram = np.asarray(partial_gram)
            if partial_gram.shape != (self.dim, self.dim) or partial_gram.dtype != np.float64:
                raise ValueError(
                    f"partial_gram must be ({self.dim}, {self.dim}) float64 (featuresᵀfeatures of "
                    f"chunk {chunk}), got shape {partial_gram.shape} of {partial_gram.dtype}"
                )
        if example_hashes is not None:
            example_hashes = np.asarray(example_hashes)
            if example_hashes.shape != (stop - start,) or example_hashes.dtype.kind not in "ui":
                raise ValueError(
                    f"example_hashes must be ({stop - start},) integers (one per row of chunk "
                    f"{chunk}), got shape {example_hashes.shape} of {example_hashes.dtype}"
                )
        features = np.ascontiguousarray(features, dtype=np.float32)
        out_to_loss = np.ascontiguousarray(out_to_loss, dtype=np.float32)
        digests = [
            chunk_digest(features, self.chunk_rows),
            chunk_digest(out_to_loss, self.chunk_rows),
            0 if partial_gram is None else chunk_digest(np.diagonal(partial_gram)),
        ]
        self.features[start:stop] = features
        self.out_to_loss[start:stop] = out_to_loss
        if example_hashes is not None:
            if self.example_hash is None:
                self.example_hash = self._array(
                    "example_hash", (self.n_rows,), (self.chunk_rows,), "uint64"
                )
            self.example_hash[start:stop] = example_hashes.astype(np.uint64)
        if partial_gram is not None:
            if self.partial_gram is None:
                self.partial_gram = self._partial_gram_array()
            self.partial_gram[chunk] = partial_gram
        if self.digest is None:
            # Chunks marked done before the digests were written (a store of an earlier
            # version, resumed) have none; otherwise every chunk marked done has one.
            every_chunk = not self.done[:].astype(bool).any()
            self.digest = self._array(
                "digest", (self.n_chunks, len(DIGEST_COLUMNS)), (1, 3), "uint32",
                attributes={EVERY_CHUNK_DIGESTED: every_chunk},
            )  # fmt: skip
        self.digest[chunk] = np.array(digests, np.uint32)
        self._digests = None
        self.done.set_mark(chunk)

    def _check_digest(self, name: str, chunk: int, values: np.ndarray) -> None:
        """Refuse ``values``, all of array ``name``'s row chunk ``chunk`` as read, unless they
        have the digest written with the chunk (stores and chunks without one pass).

        Raises:
            StoreCorruptionError: the chunk holds values other than those written there.
        """
        if self.digest is None:
            return
        if self._digests is None or chunk >= len(self._digests):
            self._digests = self.digest.read(slice(None), required=False)
        expected = int(self._digests[chunk, DIGEST_COLUMNS.index(name)])
        array = getattr(self, name)
        digest = chunk_digest(digest_values(name, values), digest_rows(name, array))
        if expected and digest != expected:
            position = (
                (chunk, 0, 0) if name == "partial_gram" else (chunk,) + (0,) * (array.ndim - 1)
            )
            raise StoreCorruptionError(
                self.store.where, array.path, position, MISPLACED, array.key(position)
            )

    def example_hashes(self, chunk: int) -> np.ndarray | None:
        """The ``(rows_in_chunk,)`` uint64 hashes of ``chunk``'s examples written with it, or
        ``None`` where there are none: a store written before hashes were kept has no
        ``example_hash`` array (nor checksums), and a chunk not yet written has no object in it.

        Raises:
            StoreCorruptionError: the chunk's hashes are damaged, or lost from a chunk marked
                done (featurization writes them with every chunk).
        """
        if self.example_hash is None:
            if "example_hash" not in self.group:
                return None
            self.example_hash = self._array(
                "example_hash", (self.n_rows,), (self.chunk_rows,), "uint64"
            )
        start, stop = self.rows(chunk)
        hashes = self.example_hash.read(slice(start, stop), required=False)
        if not hashes.any() and not self.example_hash.has_chunk((chunk,)):
            if self.example_hash.stores_every_chunk and self.done[chunk]:
                # Featurization writes the hashes of every chunk it marks done: they are lost.
                self.example_hash.read(slice(start, stop))  # raises, naming the chunk
            return None
        return hashes

    def is_complete(self) -> bool:
        return bool(self.completed().all())

    # -- the training set: kept rows -----------------------------------------------------------

    def kept(self) -> np.ndarray:
        """Boolean ``(n_rows,)``: which stored rows are training examples (not removed)."""
        if self.removed is None:
            return np.ones(self.n_rows, bool)
        return ~self.removed[:].astype(bool)

    def train_rows(self) -> np.ndarray:
        """``(n_train,)`` the stored row of each training example: column ``j`` of every score
        matrix is the example stored at row ``train_rows()[j]``."""
        return np.flatnonzero(self.kept())

    @property
    def n_train(self) -> int:
        """Training examples: the stored rows less the removed ones."""
        return self.n_rows if self.removed is None else int(self.kept().sum())

    def train_out_to_loss(self) -> np.ndarray:
        """``(n_train,)`` float32 out-to-loss weights of the training examples (kept rows)."""
        out_to_loss = self.out_to_loss[:]
        for chunk in range(self.n_chunks):
            self._check_digest("out_to_loss", chunk, out_to_loss[slice(*self.rows(chunk))])
        return out_to_loss if self.removed is None else out_to_loss[self.kept()]

    def iter_chunks(self) -> Iterable[tuple[int, int, np.ndarray]]:
        """``(start, stop, features)`` for each row chunk, in order, of the kept rows only:
        ``start:stop`` are training-example positions (score columns), which are the stored rows
        when nothing was removed."""
        kept = None if self.removed is None else self.kept()
        position = 0
        for chunk in range(self.n_chunks):
            start, stop = self.rows(chunk)
            block = self.features[start:stop]
            self._check_digest("features", chunk, block)
            if kept is not None:
                block = block[kept[start:stop]]
            yield position, position + len(block), block
            position += len(block)

    def stored_partial_gram(self, chunk: int) -> np.ndarray | None:
        """The ``(k, k)`` partial Gram written with ``chunk``, or ``None`` where there is none
        (a store written before partial Grams, the dual case, or folded into the gram).

        Raises:
            StoreCorruptionError: the chunk's partial Gram is damaged.
        """
        if self.partial_gram is None or not self.partial_gram.has_chunk((chunk, 0, 0)):
            return None
        gram = self.partial_gram.read(slice(chunk, chunk + 1))[0]
        self._check_digest("partial_gram", chunk, gram)
        return gram

    def chunk_gram(self, chunk: int) -> np.ndarray:
        """``(k, k)`` float64 ``Σ φ_iφ_iᵀ`` over the kept rows of ``chunk``: its stored partial
        Gram less its removed rows, or (without one) computed from its features."""
        start, stop = self.rows(chunk)
        removed = np.zeros(stop - start, bool) if self.removed is None else ~self.kept()[start:stop]
        try:
            gram = self.stored_partial_gram(chunk)
        except StoreCorruptionError as error:
            if error.problem != MISSING:
                raise
            gram = None  # folded into the gram by another process this moment: read Φ
        if gram is None:
            features = self.features[start:stop]
            self._check_digest("features", chunk, features)
            return partial_gram(features[~removed])
        if removed.any():
            gram = gram - partial_gram(self.features[start:stop][removed])
        return gram

    def gram(self, dual: bool = False) -> np.ndarray:
        """``ΦᵀΦ`` ``(k, k)``, or ``ΦΦᵀ`` ``(n_train, n_train)`` with ``dual``, in float64, of
        the kept rows; built once and stored (the dual only when ``k >``
        :data:`STORED_DUAL_GRAM_MIN_DIM`: below, computing it again costs about what storing it
        does).

        The primal adds the row chunks' partial Grams in chunk order (reading ``Φ`` only for
        chunks stored without one), starting from the stored gram where it covers the first
        chunks (examples added since, :meth:`extend`); the partial Grams folded in are then
        deleted. The dual reads ``Φ``.
        """
        name = "dual_gram" if dual else "gram"
        attrs = self.attributes()
        cached, first = None, 0
        if name in self.group and attrs.get(f"{name}_complete"):
            cached = self.store.checked(self.group[name])[:]
            first = self.n_chunks if dual else int(attrs.get("gram_chunks", self.n_chunks))
            if first >= self.n_chunks:
                return cached
        self._require_complete("computing the kernel")
        if dual:
            features = np.concatenate([block for _, _, block in self.iter_chunks()])
            features = features.astype(np.float64)
            gram = features @ features.T
            if self.dim <= STORED_DUAL_GRAM_MIN_DIM:
                return gram
        else:
            gram = np.zeros((self.dim, self.dim)) if cached is None else cached
            for chunk in range(first, self.n_chunks):
                gram = gram + self.chunk_gram(chunk)
        self._write_gram(name, gram)
        if not dual:
            self._drop_partial_grams(range(first, self.n_chunks))
        return gram

    def _drop_partial_grams(self, chunks: Iterable[int]) -> None:
        """Delete the objects of the partial Grams of ``chunks``, folded into the gram (8k² bytes
        each). The array's metadata stays: a process still writing a chunk (two fits racing on
        one store) then writes an ordinary object, and a reader that misses one reads ``Φ``."""
        if self.partial_gram is None:
            return
        for chunk in chunks:
            sync(self.store.zarr_store.delete(self.partial_gram.key((chunk, 0, 0))))

    def _write_gram(self, name: str, gram: np.ndarray) -> None:
        self.update_attributes({f"{name}_complete": False})
        side = len(gram)
        array = create_array(
            self.group,
            name,
            compress=False,  # a 2,000² dual Gram: zstd saved 6% of 31 MiB at 2.9× the write time
            shape=(side, side),
            chunks=(min(side, GRAM_CHUNK_ROWS), side),
            dtype="float64",
            overwrite=True,
        )
        array[:] = gram
        update = {f"{name}_complete": True}
        if name == "gram":
            update["gram_chunks"] = self.n_chunks
        self.update_attributes(update)

    def attributes(self) -> dict[str, Any]:
        """The group's attributes, its derived ones (statistics, which kernels are built and
        what they cover) checked against their seal.

        Raises:
            StoreCorruptionError: they fail it (the group's ``zarr.json`` was altered).
        """
        attrs = self.group.attrs.asdict()
        if not seal_holds(attrs, FEATURE_DERIVED_ATTRS):
            names = ", ".join(name for name in FEATURE_DERIVED_ATTRS if name in attrs)
            raise StoreCorruptionError(
                self.store.where, self.group.path, None, ALTERED_ATTRIBUTES.format(names=names),
                f"{self.group.path}/{ZARR_METADATA}",
            )  # fmt: skip
        return attrs

    def update_attributes(self, values: dict[str, Any], drop: Iterable[str] = ()) -> None:
        """Set ``values`` and delete ``drop`` among the group's attributes, resealed, in one
        metadata write (so that a crash leaves the old attributes or the new, each sealed)."""
        attrs = self.attributes()
        attrs.update(values)
        for name in drop:
            attrs.pop(name, None)
        self.group.attrs.put(resealed(attrs, FEATURE_DERIVED_ATTRS))

    def statistics(self, dual_gram: np.ndarray | None = None) -> KernelStatistics:
        """The :class:`~datatrace.methods.kernel.KernelStatistics` (trace, neighbour cosine,
        coupling) the damping rules read, of the kept rows (recorded ones missing a field, from
        an earlier version, are recomputed); from ``dual_gram`` (:meth:`gram` with ``dual``)
        when given, without reading ``Φ``."""
        recorded = self.attributes().get("statistics")
        if recorded is not None and set(recorded) == set(KernelStatistics.__dataclass_fields__):
            return KernelStatistics(**recorded)
        self._require_complete("choosing the damping")
        if dual_gram is not None:
            statistics = KernelStatistics.of_dual_gram(dual_gram, self.features.shape[1])
            self.update_attributes({"statistics": asdict(statistics)})
            return statistics
        rows = neighbour_sample(self.n_train)
        sample = self.features[self.train_rows()[rows], :]
        trace = 0.0

        def chunks_adding_to_the_trace():
            nonlocal trace
            for start, stop, block in self.iter_chunks():
                trace += float(np.square(block, dtype=np.float64).sum())
                yield start, stop, block

        # One read of Φ for both statistics.
        cosine, coupling = neighbour_statistics(sample, rows, chunks_adding_to_the_trace())
        statistics = KernelStatistics(self.n_train, self.features.shape[1], trace, cosine, coupling)
        self.update_attributes({"statistics": asdict(statistics)})
        return statistics

    # -- incremental changes ---------------------------------------------------------------

    def _forget_derived(self) -> None:
        """Drop what the training set's change invalidates: the statistics and the dual gram
        (rebuilt from ``Φ``); the primal gram is updated, not dropped."""
        self.update_attributes({}, drop=("statistics", "dual_gram_complete"))

    def extend(self, n_new: int) -> int:
        """Make room for ``n_new`` more rows, in new row chunks; returns the first new row.

        The new rows start at the next chunk boundary, so no finished chunk is rewritten: the
        rows between the last example and that boundary become padding, marked removed. The
        new chunks are pending (featurize them, e.g.
        :func:`datatrace.methods.incremental.add_examples`);
        the stored gram keeps covering the old chunks (``gram_chunks``) and :meth:`gram` adds
        the new chunks' partial Grams to it.
        """
        if n_new < 1:
            raise ValueError(f"n_new must be positive, got {n_new}")
        first = self.n_chunks * self.chunk_rows
        n_rows = first + n_new
        attrs = self.attributes()
        if "gram_complete" in attrs and "gram_chunks" not in attrs:
            self.update_attributes({"gram_chunks": self.n_chunks})  # a gram written before it
        padding = first - self.n_rows
        if padding and self.removed is None:
            self.removed = self._array("removed", (self.n_rows,), (self.chunk_rows,), "uint8")
            self.removed[:] = np.zeros(self.n_rows, np.uint8)
        old_rows = self.n_rows
        self.n_rows, self.n_chunks = n_rows, -(-n_rows // self.chunk_rows)
        for array in (self.features, self.out_to_loss, self.example_hash, self.removed):
            if array is not None:
                array.resize((n_rows, *array.shape[1:]))
        self.done.resize((self.n_chunks,))
        if self.digest is not None:
            self.digest.resize((self.n_chunks, len(DIGEST_COLUMNS)))
            self._digests = None
        if self.partial_gram is not None:
            self.partial_gram.resize((self.n_chunks, self.dim, self.dim))
        if self.removed is not None:
            # Written whole (with the padding marked): every chunk of the mask is stored.
            mask = np.zeros(n_rows, np.uint8)
            mask[:old_rows] = self.removed.read(slice(0, old_rows))
            mask[old_rows:first] = 1
            self.removed[:] = mask
        self._forget_derived()
        return first

    def remove_rows(self, rows: np.ndarray) -> None:
        """Remove the stored ``rows`` from the training set, downdating the stored gram by their
        contributions (``ΦᵀΦ − Φ_rowsᵀΦ_rows``): their features stay stored but are no longer
        read (:meth:`iter_chunks`, :meth:`train_out_to_loss`, the kernels).

        Raises:
            ValueError: a row is out of range or already removed.
        """
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        kept = self.kept()
        if rows.size and (rows[0] < 0 or rows[-1] >= self.n_rows):
            raise ValueError(f"rows to remove must be in [0, {self.n_rows}), got {rows}")
        if not kept[rows].all():
            raise ValueError(f"stored rows {rows[~kept[rows]].tolist()} are already removed")
        self._require_complete("removing examples")
        gram = None
        if self.attributes().get("gram_complete"):
            gram = self.gram() - partial_gram(self.features[rows, :])
            self.update_attributes({"gram_complete": False})  # until the downdated one is written
        if self.removed is None:
            self.removed = self._array("removed", (self.n_rows,), (self.chunk_rows,), "uint8")
        mask = (~kept).astype(np.uint8)
        mask[rows] = 1
        self.removed[:] = mask
        self._forget_derived()
        if gram is not None:
            self._write_gram("gram", gram)

    def _require_complete(self, purpose: str) -> None:
        if not self.is_complete():
            missing = int((~self.completed()).sum())
            raise RuntimeError(
                f"checkpoint {self.checkpoint} still has {missing} of {self.n_chunks} row chunks "
                f"to featurize: finish featurizing (every shard) before {purpose}"
            )


def partial_gram(features: np.ndarray) -> np.ndarray:
    """``featuresᵀfeatures`` ``(k, k)`` in float64 of a block of features ``(rows, k)``: the
    one computation of every partial Gram (by workers, by :meth:`CheckpointFeatures.gram` for
    chunks stored without one), so that each chunk's term is the same bits wherever it is made."""
    block = np.asarray(features, dtype=np.float64)
    return block.T @ block
