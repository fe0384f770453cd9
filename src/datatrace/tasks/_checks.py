"""Checks of a batch before it is featurized, shared by the tasks' ``check_batch``.

Per-example gradients run under ``torch.vmap``, where code cannot look at a tensor's values, so a
label out of range surfaces there as an indexing error deep inside torch ("index 10 is out of
bounds for dimension 2"), and a float label is silently truncated. These checks run outside
``vmap`` on a whole batch and say what is wrong and what to do about it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from datatrace.data import map_tensors

# Columns of token ids (and other integer indices) that models look up in embedding tables.
ID_COLUMNS = ("input_ids", "decoder_input_ids", "token_type_ids", "position_ids")


class InputDtypeWarning(UserWarning):
    """Floating inputs whose dtype differs from the model's parameters were cast to it."""


def as_tensor(value: Any, what: str) -> torch.Tensor:
    """``value`` as a tensor (numpy arrays are converted), or a TypeError naming ``what``."""
    if torch.is_tensor(value):
        return value
    if isinstance(value, np.ndarray):
        return torch.as_tensor(value)
    raise TypeError(f"{what} must be a tensor (or a numpy array), got a {type(value).__name__}")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def cast_floating(value: Any, dtype: torch.dtype, what: str) -> Any:
    """Every floating tensor of ``value`` (nested in tuples, lists, dicts) in ``dtype``.

    A float64 array for a float32 model would otherwise fail inside the model with a dtype error.
    Each kind of cast is noted once (per process) with an :class:`InputDtypeWarning`: Python shows
    a warning with the same text from the same line once. Integer and boolean tensors (token ids,
    masks, class labels) are left as they are.
    """

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            return tensor
        warnings.warn(
            f"{what} are {_dtype_name(tensor.dtype)} but the model's parameters are "
            f"{_dtype_name(dtype)}: casting {what} to {_dtype_name(dtype)} for attribution "
            f"(pass {_dtype_name(dtype)} data to avoid the copy)",
            InputDtypeWarning,
            stacklevel=1,
        )
        return tensor.to(dtype)

    return map_tensors(cast, value)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _position(mask: torch.Tensor) -> str:
    """Where the first ``True`` of ``mask`` is: ``row i`` (1-D) or ``index (i, j, ...)``."""
    flat = int(torch.nonzero(mask.flatten())[0])
    index = [int(i) for i in np.unravel_index(flat, tuple(mask.shape))]
    if len(index) == 1:
        return f"row {index[0]}"
    return f"index ({', '.join(map(str, index))})"


def integer_values(values: Any, what: str, hint: str) -> torch.Tensor:
    """``values`` as integers: integer tensors as they are, booleans and floating whole numbers
    converted to int64 (no information is lost); other floats refused with ``hint``."""
    values = as_tensor(values, what)
    if values.dtype == torch.bool:
        return values.long()
    if values.is_complex():
        raise TypeError(f"{what} are complex numbers: {hint}")
    if values.is_floating_point():
        not_whole = ~(torch.isfinite(values) & (values == values.round()))
        if not_whole.any():
            raise ValueError(
                f"{what} are floating point and not whole numbers ("
                f"{values[not_whole][0].item():g} at {_position(not_whole)}): {hint}"
            )
        return values.long()
    return values


def _looks_one_hot(labels: torch.Tensor) -> bool:
    zero_or_one = (labels == 0) | (labels == 1)
    return bool(zero_or_one.all()) and bool((labels.sum(1) == 1).all())


def class_labels(labels: Any, n_rows: int | None, what: str = "the labels") -> torch.Tensor:
    """One integer class per example, ``(n_rows,)`` int: checked for shape, dtype and sign.

    The upper end of the range (the number of classes) is checked by :func:`check_label_range`,
    which needs the model's output.

    Raises:
        ValueError: labels of shape ``(n, 1)`` (squeeze them), ``(n, C)`` (one-hot: take the
            argmax), of another length than the inputs, not whole numbers, or negative.
        TypeError: labels that are not a tensor.
    """
    labels = as_tensor(labels, what)
    shape = tuple(labels.shape)
    expected = f"one integer class per example, shape ({n_rows if n_rows is not None else 'n'},)"
    if labels.dim() == 2 and shape[1] == 1:
        raise ValueError(
            f"{what} have shape {shape}: expected {expected}. Squeeze the extra dimension: "
            "labels.squeeze(1) (numpy: labels.ravel())"
        )
    if labels.dim() == 2:
        if _looks_one_hot(labels):
            raise ValueError(
                f"{what} have shape {shape} and look one-hot: expected {expected}. Pass the "
                "class of each example instead: labels.argmax(1)"
            )
        raise ValueError(
            f"{what} have shape {shape}: expected {expected}. Soft labels or per-class scores "
            "are not supported; pass the class of each example (e.g. labels.argmax(1))"
        )
    if labels.dim() != 1:
        raise ValueError(f"{what} have shape {shape}: expected {expected}")
    if n_rows is not None and len(labels) != n_rows:
        raise ValueError(
            f"the batch has {n_rows} inputs but {len(labels)} labels: pass one label per example"
        )
    labels = integer_values(
        labels,
        what,
        "classification needs the integer class of each example. Soft labels or "
        "probabilities are not supported; pass hard classes (e.g. labels.argmax(1) of "
        "per-class probabilities)",
    )
    negative = labels < 0
    if negative.any():
        raise ValueError(
            f"{what} hold a negative value ({int(labels[negative][0])} at "
            f"{_position(negative)}): labels are class indices 0, 1, …, n_classes − 1"
        )
    return labels


def check_label_range(labels: torch.Tensor, n_classes: int, what: str = "the labels") -> None:
    """Refuse labels that are not below ``n_classes`` (the number of logits of the model)."""
    too_large = labels >= n_classes
    if too_large.any():
        raise ValueError(
            f"{what} hold {int(labels[too_large][0])} (at {_position(too_large)}), out of "
            f"range: the model outputs {n_classes} logits, so labels must be class indices "
            f"0 … {n_classes - 1}. Check the labels (classes numbered from 1? subtract 1) or "
            "the model's number of outputs"
        )


def check_id_columns(
    batch: Mapping[str, Any], columns: Iterable[str] = ID_COLUMNS
) -> dict[str, torch.Tensor]:
    """The id columns of ``batch`` that are present, as non-negative integer tensors.

    Raises:
        ValueError: ids that are not whole numbers, or negative (padding in ``input_ids`` takes
            the tokenizer's ``pad_token_id``; only ``labels`` take ``ignore_index``).
    """
    checked = {}
    for name in columns:
        if name not in batch:
            continue
        ids = integer_values(
            batch[name], f"the column {name!r}", "token ids are integers (torch.long)"
        )
        negative = ids < 0
        if negative.any():
            raise ValueError(
                f"the column {name!r} holds a negative id ({int(ids[negative][0])} at "
                f"{_position(negative)}): ids index an embedding table and are ≥ 0. Pad "
                "input_ids with the tokenizer's pad_token_id; only labels take ignore_index"
            )
        checked[name] = ids
    return checked


def cast_columns(
    batch: Mapping[str, Any], dtype: torch.dtype, keep: Iterable[str] = ()
) -> dict[str, Any]:
    """The columns of ``batch`` with floating tensors in ``dtype`` (see :func:`cast_floating`),
    except the columns in ``keep``, which are returned as they are."""
    kept = set(keep)
    return {
        name: value if name in kept else cast_floating(value, dtype, f"the column {name!r}")
        for name, value in batch.items()
    }


def run_on_first_example(
    model: nn.Module, forward: Callable[[nn.Module, Any], Any], batch: Any, task: str
) -> Any:
    """``forward(model, first example of batch)``, on the model's device, in eval mode, without
    gradients: the probing forward pass of ``check_batch``. An error of the model there means
    that the inputs do not fit it, and is reported as such (chained to the model's error)."""
    first = map_tensors(lambda tensor: tensor[:1].to(model_device(model)), batch)
    try:
        with evaluation(model):
            return forward(model, first)
    except (RuntimeError, IndexError, TypeError) as error:
        raise ValueError(
            f"{task} ran the model on the first example of the batch to check the batch, and the "
            f"model failed: {error}. Check that the inputs have the shape and dtype that the "
            "model's forward takes"
        ) from error


@contextmanager
def evaluation(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for a probing forward pass; each submodule's mode is restored
    after (a forward in training mode would update batch-norm statistics)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
