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


def json_normalise(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))
