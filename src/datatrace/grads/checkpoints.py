"""Reading checkpoints: state dicts, modules or files, checked against the model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from datatrace.data import all_finite

Checkpoint = Mapping[str, torch.Tensor] | nn.Module | str | Path
"""A model checkpoint: a state dict, a module with the same architecture, or the path of a file
saved with ``torch.save(model.state_dict(), path)``."""


# The prefix torch.compile's wrapper (OptimizedModule) puts before every name of its state dict.
COMPILED_PREFIX = "_orig_mod."


def uncompiled(model: nn.Module) -> nn.Module:
    """The module that ``torch.compile`` wrapped (``model._orig_mod``), or ``model`` itself.

    Attribution differentiates the model through forward hooks, ``functional_call`` and
    ``torch.func`` transforms, which a compiled graph does not go through reliably (hooks on
    submodules are traced away); the original module computes the same function with the same
    parameters, which the wrapper shares."""
    original = getattr(model, "_orig_mod", None)
    compiled = type(model).__name__ == "OptimizedModule" and isinstance(original, nn.Module)
    return original if compiled else model


def load_checkpoint(
    checkpoint: Checkpoint, model: nn.Module, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` under ``checkpoint``, on ``device``.

    Buffers missing from the checkpoint (e.g. a state dict of parameters only) are taken from
    the model, and so are frozen parameters (``requires_grad=False`` in the model: a fine-tune's
    base weights, which a checkpoint of its trainable parameters — LoRA adapters — leaves out).
    The model itself is not modified. A ``torch.compile``'d model or checkpoint
    module stands for the module it wraps (:func:`uncompiled`), and a state dict saved from one
    (every name prefixed ``_orig_mod.``) is read without the prefix.

    Raises:
        FileNotFoundError: a checkpoint path that is not a file.
        ValueError: a file that does not hold a state dict, a parameter missing, unknown names,
            shapes that differ, or parameters that are NaN or infinite.
    """
    if isinstance(checkpoint, nn.Module):
        state = uncompiled(checkpoint).state_dict()
    elif isinstance(checkpoint, (str, Path)):
        state = _read_checkpoint_file(Path(checkpoint))
    elif isinstance(checkpoint, Mapping):
        state = checkpoint
    else:
        raise TypeError(
            f"a checkpoint must be a state dict, a module or a file path, got "
            f"{type(checkpoint).__name__}"
        )
    model = uncompiled(model)
    expected = model.state_dict()
    if (
        state
        and set(state).isdisjoint(expected)
        and all(name.startswith(COMPILED_PREFIX) for name in state)
    ):  # saved from a torch.compile'd model: the names of the module it wraps
        state = {name[len(COMPILED_PREFIX) :]: tensor for name, tensor in state.items()}
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(trainable - set(state))
    if unexpected or missing:
        hint = ""
        if unexpected and all(name.startswith("module.") for name in unexpected):
            hint = (
                " The names start with 'module.' (a DistributedDataParallel checkpoint): "
                "strip that prefix."
            )
        elif any(".lora_" in name for name in unexpected):
            hint = (
                " The entries look like a PEFT adapter's state dict (adapter names left out): "
                "pass PeftModel.from_pretrained(base_model, adapter_dir) as the checkpoint, or "
                "load the adapter into the model with peft.set_peft_model_state_dict and pass "
                "the model's own state dict."
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
    parameters = {name for name, _ in model.named_parameters()}
    not_finite = [
        name
        for name in expected
        if name in parameters and loaded[name].is_floating_point() and not all_finite(loaded[name])
    ]
    if not_finite:
        source = f" {checkpoint}" if isinstance(checkpoint, (str, Path)) else ""
        raise ValueError(
            f"the checkpoint{source} holds NaN or infinite values in the parameters "
            f"{_abbreviate(not_finite)}: "
            "its training diverged or the file was damaged; attribute through a checkpoint "
            "saved before that happened"
        )
    return loaded


def _read_checkpoint_file(path: Path) -> Mapping[str, torch.Tensor]:
    """The state dict saved at ``path``, refused with what is wrong when it is not one."""
    if not path.is_file():
        raise FileNotFoundError(
            f"the checkpoint file {path} does not exist"
            + (" (it is a directory)" if path.is_dir() else "")
            + ": pass the path of a file saved with torch.save(model.state_dict(), path)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights-only errors of damaged or foreign files
        raise ValueError(
            f"the checkpoint file {path} cannot be read as a torch.save'd state dict "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): "
            "it is damaged, of another format, or holds objects other than tensors"
        ) from error
    if not isinstance(state, Mapping):
        raise ValueError(
            f"the checkpoint file {path} holds a {type(state).__name__}, not a state dict: "
            "save model.state_dict()"
        )
    return state


def _abbreviate(names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
