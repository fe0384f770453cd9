"""Incremental stores: add training examples to fitted features, or remove some, without
recomputing the rest.

Adding ``m`` examples appends new row chunks to every checkpoint's features (starting at the next
chunk boundary: the rows left over in the last chunk become padding, marked removed), featurizes
only them (in this process or on a backend, :mod:`datatrace.grads.distributed`), and the kernel
becomes the stored ``ΦᵀΦ`` plus the new chunks' partial Grams. Removing examples marks their
rows removed in the store and downdates the stored ``ΦᵀΦ`` by their contributions
``Φ_removedᵀΦ_removed`` (their features are read, nothing is featurized).

Indices. The training set is the stored rows that are not removed, in stored order: column ``j``
of every score matrix is the example at stored row ``train_rows()[j]``
(:meth:`~datatrace.store.CheckpointFeatures.train_rows`). Added examples come after the existing
ones; after a removal, the columns of the later examples shift down, exactly as in a fit on the
training set without the removed examples. Both change the store's training set, so the store is
then reopened with ``from_store`` (without data), not refitted from the original data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from datatrace._arguments import positions
from datatrace.data import Examples
from datatrace.grads.checkpoints import Checkpoint
from datatrace.grads.distributed import FeaturizeStats, featurize_chunks
from datatrace.grads.featurize import FINGERPRINT_EXAMPLES, GradientFeatures
from datatrace.store import CheckpointFeatures, Store
from datatrace.store.provenance import batch_fingerprint


def add_examples(
    features: GradientFeatures,
    data: Any,
    checkpoints: Sequence[Checkpoint],
    stored: Sequence[CheckpointFeatures],
    store: Store,
    backend: Any = None,
    **run_options: Any,
) -> FeaturizeStats:
    """Append the examples ``data`` to the complete stored features ``stored`` of every checkpoint
    and featurize them; a call interrupted while featurizing resumes when repeated with the same
    data.

    Args:
        features: the gradient features the store was fitted with.
        data: the new training examples.
        checkpoints: every checkpoint, by index (as fitted).
        stored: the stored features of each checkpoint.
        store: the store.
        backend: where to featurize (see :func:`~datatrace.grads.distributed.featurize_chunks`).
        **run_options: ``lease_s``, ``poll_s`` of ``featurize_chunks``.

    Returns:
        What the featurization did.

    Raises:
        ValueError: ``data`` is empty, or the store is not complete.
    """
    new = Examples(data)
    if new.n == 0:
        raise ValueError("no examples to add: data holds 0 examples")
    group = store.root["features"]
    fingerprint = batch_fingerprint(new.read(0, min(new.n, FINGERPRINT_EXAMPLES)))
    additions = list(group.attrs.get("additions", []))
    last = additions[-1] if additions else None
    resuming = (
        last is not None
        and last["n"] == new.n
        and last["train_data"] == fingerprint
        and any(part.n_rows == last["first_row"] + new.n for part in stored)
        and not all(part.is_complete() for part in stored)
    )
    if resuming:
        first = last["first_row"]
    else:
        for part in stored:
            if not part.is_complete():
                raise ValueError(
                    f"checkpoint {part.checkpoint} of the store at {store.where} is not "
                    "complete: finish fitting it before adding examples"
                )
        first = stored[0].n_chunks * stored[0].chunk_rows
        group.attrs["additions"] = [
            *additions,
            {"first_row": first, "n": new.n, "train_data": fingerprint},
        ]
    for part in stored:
        if part.n_rows != first + new.n:  # not extended yet (a resumed call may find it done)
            if part.extend(new.n) != first:
                raise ValueError(
                    f"checkpoint {part.checkpoint} of the store at {store.where} has "
                    f"{part.n_rows} rows, not those of the other checkpoints: the store was "
                    "changed by something else"
                )
    provenance = dict(group.attrs["provenance"])
    provenance["n_train"] = first + new.n  # the stored rows, padding and removed ones included
    group.attrs["provenance"] = provenance
    first_chunk = first // stored[0].chunk_rows
    jobs = [
        (index, chunk)
        for index, part in enumerate(stored)
        for chunk in part.pending()
        if chunk >= first_chunk
    ]
    return featurize_chunks(
        features, new, first, checkpoints, stored, jobs, store, backend, **run_options
    )


def remove_examples(stored: Sequence[CheckpointFeatures], indices: Any) -> np.ndarray:
    """Remove training examples from the stored features of every checkpoint.

    Args:
        stored: the complete stored features of each checkpoint.
        indices: positions in the current training set (score columns), ``(r,)`` integers,
            or a boolean mask ``(n_train,)`` (True where the example is removed).

    Returns:
        ``(r,)`` the stored rows removed.

    Raises:
        ValueError: an index is out of range, repeated or not an integer, a mask's length is
            not ``n_train``, or every training example would be removed.
    """
    n_train = stored[0].n_train
    indices = positions(indices, n_train, "indices")
    if indices.size and (indices.min() < 0 or indices.max() >= n_train):
        raise ValueError(
            f"indices must be positions in the training set, in [0, {n_train}), got "
            f"{indices.min()} … {indices.max()}"
        )
    if np.unique(indices).size != indices.size:
        raise ValueError("indices holds an example more than once")
    if indices.size == n_train:
        raise ValueError(
            f"indices removes all {n_train} training examples, which would leave nothing to "
            "attribute to: keep at least one (or fit anew on other data)"
        )
    rows = stored[0].train_rows()[indices]
    for part in stored:
        part.remove_rows(rows)
    return rows
