"""Calling a model on a batch of named columns (tokenizer output and the like) under ``vmap``.

Shared by the text, CLIP and language-model tasks. Batches are mappings of tensors with the
examples along dim 0; every column except the task's label columns is passed to the model as a
keyword argument, so whatever inputs a model takes (``token_type_ids`` or not, ``pixel_values``,
``decoder_input_ids``, ...) go through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

# PyTorch's message when code under vmap branches on a tensor's value (``if mask.all():``).
_VMAP_CONTROL_FLOW = "vmap: It looks like you're either"

# Columns that hold a 2-D padding mask of a bidirectional (non-causal) attention.
BIDIRECTIONAL_MASKS = ("attention_mask",)


def check_columns(batch: Any, required: Iterable[str], task: str) -> Mapping[str, torch.Tensor]:
    """The batch as a mapping, with a clear error when it is not one or lacks a column."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"{task} reads batches of named columns (a dict of tensors such as a tokenizer's "
            f"output with labels), got a {type(batch).__name__}: pass the data as a dict of "
            "tensors with one row per example"
        )
    missing = [name for name in required if name not in batch]
    if missing:
        raise KeyError(
            f"{task} needs the column(s) {missing} in every batch; the batch has "
            f"{sorted(batch)}. Add them, or tell the task the names your data uses"
        )
    return batch


def model_inputs(
    batch: Mapping[str, torch.Tensor],
    exclude: Iterable[str],
    dtype: torch.dtype,
    bidirectional_masks: Iterable[str] = BIDIRECTIONAL_MASKS,
) -> dict[str, torch.Tensor]:
    """Keyword arguments for the model: every column except ``exclude``.

    Two-dimensional padding masks of bidirectional attention (``bidirectional_masks``) are turned
    into additive ``(batch_size, 1, 1, seq_len)`` masks: ``transformers`` (5.x) checks whether a
    2-D mask has any padding (``if mask.all()``) to skip building the mask, a branch on a tensor's
    value that ``vmap`` cannot take. A 4-D mask is used as it is, by eager and SDPA attention
    alike, and computes the same attention.
    """
    excluded = set(exclude)
    inputs = {name: value for name, value in batch.items() if name not in excluded}
    for name in bidirectional_masks:
        mask = inputs.get(name)
        if mask is not None and mask.dim() == 2:
            inputs[name] = additive_mask(mask, dtype)
    return inputs


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(batch_size, seq_len)`` 0/1 padding mask → ``(batch_size, 1, 1, seq_len)`` additive mask
    (0 where attended, the most negative finite value of ``dtype`` where masked)."""
    blocked = (mask == 0).to(dtype)[:, None, None, :]
    return blocked * torch.finfo(dtype).min


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's first floating parameter (float32 if none)."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def call_model(model: nn.Module, inputs: Mapping[str, torch.Tensor], method: str = "") -> Any:
    """``model(**inputs)`` (or ``getattr(model, method)(**inputs)``), turning PyTorch's vmap
    control-flow error into one that says how to fix it."""
    function = getattr(model, method) if method else model
    try:
        return function(**inputs)
    except RuntimeError as error:
        if _VMAP_CONTROL_FLOW not in str(error):
            raise
        implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise RuntimeError(
            "the model branches on the value of a tensor, which per-example gradients (taken "
            f"under torch.func.vmap) cannot do. Its attention implementation is "
            f"{implementation!r}: transformers builds causal and padding masks for 'sdpa' with "
            "such branches. Load or build the model with attn_implementation='eager', e.g. "
            "AutoModel.from_pretrained(path, attn_implementation='eager') or "
            "Config(..., attn_implementation='eager')"
        ) from error


def output_field(output: Any, name: str) -> torch.Tensor:
    """A field of a model's output: a tensor output itself, an attribute or key ``name`` of a
    ``ModelOutput``/dict, or the first element of a tuple."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, Mapping) and name in output:
        return output[name]
    if hasattr(output, name):
        return getattr(output, name)
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    raise TypeError(
        f"cannot find {name!r} in the model's output of type {type(output).__name__}: the model "
        f"should return a tensor, or an object with a {name!r} field"
    )
