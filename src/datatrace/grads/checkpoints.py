"""Reading checkpoints: state dicts, modules or files, checked against the model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

Checkpoint = Mapping[str, torch.Tensor] | nn.Module | str | Path
"""A model checkpoint: a state dict, a module with the same architecture, or the path of a file
saved with ``torch.save(model.state_dict(), path)``."""


def load_checkpoint(
    checkpoint: Checkpoint, model: nn.Module, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` under ``checkpoint``, on ``device``.

    Buffers missing from the checkpoint (e.g. a state dict of parameters only) are taken from
    the model. The model itself is not modified.

    Raises:
        ValueError: a parameter is missing, unknown names are present, or shapes differ.
    """
    if isinstance(checkpoint, nn.Module):
        state = checkpoint.state_dict()
    elif isinstance(checkpoint, (str, Path)):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise ValueError(f"{checkpoint} does not hold a state dict")
    elif isinstance(checkpoint, Mapping):
        state = checkpoint
    else:
        raise TypeError(
            f"a checkpoint must be a state dict, a module or a file path, got "
            f"{type(checkpoint).__name__}"
        )
    expected = model.state_dict()
    parameter_names = {name for name, _ in model.named_parameters()}
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(parameter_names - set(state))
    if unexpected or missing:
        hint = ""
        if unexpected and all(name.startswith("module.") for name in unexpected):
            hint = (
                " The names start with 'module.' (a DistributedDataParallel checkpoint): "
                "strip that prefix."
            )
        raise ValueError(
            "the checkpoint does not match the model: "
            + (f"missing parameters {_abbreviate(missing)}; " if missing else "")
            + (f"unknown entries {_abbreviate(unexpected)}." if unexpected else "")
            + hint
        )
    loaded = {}
    for name, reference in expected.items():
        tensor = state.get(name, reference)
        if tuple(tensor.shape) != tuple(reference.shape):
            raise ValueError(
                f"checkpoint entry {name} has shape {tuple(tensor.shape)}, the model's has "
                f"{tuple(reference.shape)}"
            )
        loaded[name] = tensor.detach().to(device)
    return loaded


def _abbreviate(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
