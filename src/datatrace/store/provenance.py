"""Fingerprints that identify what produced stored arrays."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn


def _digest(update) -> str:
    hasher = hashlib.sha256()
    update(hasher)
    return hasher.hexdigest()[:16]


def architecture_fingerprint(model: nn.Module) -> str:
    """Hash of the names, shapes and dtypes of every parameter and buffer (not their values)."""

    def update(hasher):
        for name, tensor in model.state_dict().items():
            hasher.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())

    return _digest(update)


def tensors_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """Hash of the values of a state dict (names, shapes and bytes), e.g. a checkpoint."""

    def update(hasher):
        for name in sorted(state):
            tensor = state[name].detach().cpu().contiguous()
            hasher.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            hasher.update(_bytes(tensor))

    return _digest(update)


def _bytes(tensor: torch.Tensor) -> bytes:
    # Flattened first: a 0-dim tensor (e.g. CLIP's logit_scale) cannot be viewed as bytes.
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def batch_fingerprint(batch: Any) -> str:
    """Hash of every tensor in a (nested) batch: detects a different dataset of the same size."""

    def update(hasher):
        def visit(value):
            if torch.is_tensor(value):
                tensor = value.detach().cpu().contiguous()
                hasher.update(f"{tuple(tensor.shape)}:{tensor.dtype};".encode())
                hasher.update(_bytes(tensor))
            elif isinstance(value, np.ndarray):
                hasher.update(np.ascontiguousarray(value).tobytes())
            elif isinstance(value, Mapping):
                for key in sorted(value):
                    hasher.update(str(key).encode())
                    visit(value[key])
            elif isinstance(value, (tuple, list)):
                for item in value:
                    visit(item)
            else:
                hasher.update(repr(value).encode())

        visit(batch)

    return _digest(update)


def example_fingerprints(batch: Any, n_rows: int) -> np.ndarray:
    """A 64-bit hash of each example (row) of a batch: its slice of every tensor, with shapes and
    dtypes, in a fixed order of the batch's keys. ``(n_rows,)`` uint64.

    Computed while a chunk is featurized and stored with it, so that a later run on the same
    store can tell which example, if any, differs from the one that was featurized.
    """
    hashers = [hashlib.blake2b(digest_size=8) for _ in range(n_rows)]

    def visit(value):
        if isinstance(value, np.ndarray):
            value = torch.as_tensor(value)
        if torch.is_tensor(value):
            tensor = value.detach().cpu().contiguous()
            if tensor.ndim == 0 or len(tensor) != n_rows:
                raise ValueError(
                    f"a batch column of shape {tuple(tensor.shape)} does not have one row per "
                    f"example ({n_rows})"
                )
            header = f"{tuple(tensor.shape[1:])}:{tensor.dtype};".encode()
            rows = tensor.reshape(n_rows, -1).view(torch.uint8).numpy()
            for hasher, row in zip(hashers, rows):
                hasher.update(header)
                hasher.update(row.tobytes())
        elif isinstance(value, Mapping):
            for key in sorted(value):
                for hasher in hashers:
                    hasher.update(str(key).encode())
                visit(value[key])
        elif isinstance(value, (tuple, list)) and all(
            torch.is_tensor(item) or isinstance(item, (np.ndarray, Mapping, tuple, list))
            for item in value
        ):  # columns of the batch
            for item in value:
                visit(item)
        elif isinstance(value, (tuple, list)) and len(value) == n_rows:  # one entry per example
            for hasher, item in zip(hashers, value):
                hasher.update(repr(item).encode())
        else:
            for hasher in hashers:
                hasher.update(repr(value).encode())

    visit(batch)
    return np.array([int.from_bytes(h.digest(), "little") for h in hashers], dtype=np.uint64)


def json_normalise(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings, NumPy scalars
    and arrays the numbers and lists they hold: a setting given as ``np.float32(0.5)`` is
    recorded as ``0.5``).

    Raises:
        TypeError: ``value`` holds something JSON cannot record, named by its type.
    """
    return json.loads(json.dumps(value, default=_plain))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(
        f"{type(value).__name__} {value!r:.80} cannot be recorded in the store's JSON metadata: "
        "give settings as numbers, strings, lists or dicts"
    )
