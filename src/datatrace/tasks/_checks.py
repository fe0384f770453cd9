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
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch
from torch import nn

from datatrace.data import map_tensors
from datatrace.tasks._inputs import output_field

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


# Index in the data of the first example of the batch being checked, where the caller knows it
# (featurization, the estimators): messages then name examples of the data, not rows of a batch.
FIRST_EXAMPLE: ContextVar[int | None] = ContextVar("first_example", default=None)


@contextmanager
def examples_from(first: int) -> Iterator[None]:
    """Within this block, the batches checked start at example ``first`` of the data."""
    token = FIRST_EXAMPLE.set(first)
    try:
        yield
    finally:
        FIRST_EXAMPLE.reset(token)


def _position(mask: torch.Tensor) -> str:
    """Where the first ``True`` of ``mask`` is: ``example i`` (1-D) or ``example i at position
    (j, ...)``, counted in the data when the caller said where the batch starts
    (:func:`examples_from`); otherwise ``row i of the batch`` or ``index (i, j, ...) of the
    batch``."""
    flat = int(torch.nonzero(mask.flatten())[0])
    index = [int(i) for i in np.unravel_index(flat, tuple(mask.shape))]
    first = FIRST_EXAMPLE.get()
    if first is None:
        if len(index) == 1:
            return f"row {index[0]} of the batch"
        return f"index ({', '.join(map(str, index))}) of the batch"
    example = f"example {first + index[0]}"
    if len(index) == 1:
        return example
    return f"{example} at position ({', '.join(map(str, index[1:]))})"


def _shape(shape: tuple[int, ...], per_example: bool) -> str:
    """``shape`` as text; with ``per_example``, the first dimension as ``n``."""
    if not per_example or not shape:
        return str(tuple(shape))
    rest = "".join(f", {size}" for size in shape[1:])
    return f"(n{rest})" if shape[1:] else "(n,)"


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
                f"{_number(values[not_whole][0])} at {_position(not_whole)}): {hint}"
            )
        return values.long()
    return values


def _number(value: torch.Tensor) -> str:
    """A 0-d floating tensor written in full, as short as its dtype allows: ``:g`` would write
    3.0000000000000004 (0.1 · 3 · 10) as "3", which reads as a whole number."""
    if value.dtype == torch.bfloat16:  # numpy has no bfloat16
        value = value.float()
    return str(value.cpu().numpy())


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
    # Where the caller checks a part of the data (examples_from), the batch's length is not the
    # data's: the shapes are given per example, ``(n, ...)``.
    per_example = FIRST_EXAMPLE.get() is not None
    shape = _shape(labels.shape, per_example)
    rows = "n" if per_example or n_rows is None else n_rows
    expected = f"one integer class per example, shape ({rows},)"
    if labels.dim() == 2 and labels.shape[1] == 1:
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


def input_vocab_size(model: nn.Module) -> int | None:
    """The number of rows of the model's input embedding table (``get_input_embeddings()`` of a
    Hugging Face model), or ``None`` for a model that does not expose one."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if not callable(get_embeddings):
        return None
    try:
        embeddings = get_embeddings()
    except (NotImplementedError, AttributeError):
        return None
    return embeddings.num_embeddings if isinstance(embeddings, nn.Embedding) else None


def check_id_columns(
    batch: Mapping[str, Any], columns: Iterable[str] = ID_COLUMNS, vocab_size: int | None = None
) -> dict[str, torch.Tensor]:
    """The id columns of ``batch`` that are present, as non-negative integer tensors.

    ``vocab_size`` (see :func:`input_vocab_size`) bounds ``input_ids`` in every row: the probing
    forward pass sees only the first example, and an id out of range in another one would
    surface under ``vmap`` as torch's "index out of range in self".

    Raises:
        ValueError: ids that are not whole numbers, or negative (padding in ``input_ids`` takes
            the tokenizer's ``pad_token_id``; only ``labels`` take ``ignore_index``), or
            ``input_ids`` not below ``vocab_size``.
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
        if name == "input_ids" and vocab_size is not None:
            too_large = ids >= vocab_size
            if too_large.any():
                raise ValueError(
                    f"the column {name!r} holds the token id {int(ids[too_large][0])} (at "
                    f"{_position(too_large)}), out of range: the model's input embedding has "
                    f"{vocab_size} rows (ids 0 … {vocab_size - 1}). Tokenize with the model's "
                    "own tokenizer (tokens added to it: model.resize_token_embeddings(...))"
                )
        checked[name] = ids
    return checked


def cast_columns(
    batch: Mapping[str, Any], dtype: torch.dtype, keep: Iterable[str] = ()
) -> dict[str, Any]:
    """The columns of ``batch`` with floating tensors in ``dtype`` (see :func:`cast_floating`),
    except the columns in ``keep`` and the id columns (:data:`ID_COLUMNS`: ids are checked and
    made integers by :func:`check_id_columns`, and a cast would round what it checks), which
    are returned as they are."""
    kept = {*keep, *ID_COLUMNS}
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


def call_on_inputs(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``, or ``model(*inputs)`` for a tuple or list of inputs: the inputs of
    the ``(inputs, y)`` batches of ``Classification`` and ``Regression``. An output that is a
    dict or a Hugging Face ``ModelOutput`` with a ``logits`` field is read through it; a tuple
    is returned as it is (which of its elements is meant cannot be told)."""
    output = model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
    if not torch.is_tensor(output) and (
        (isinstance(output, Mapping) and "logits" in output) or hasattr(output, "logits")
    ):
        return output_field(output, "logits")
    return output


# Said where a model's output is neither a tensor nor has a ``logits`` field.
WRAP_THE_MODEL = (
    "; wrap the model so that it returns that tensor (a dict or ModelOutput with a 'logits' "
    "field is read through it)"
)


def input_pair(batch: Any, task: str, second: str, hint: str = "") -> tuple[Any, Any]:
    """``(inputs, y)`` of a batch that must be such a pair, or a TypeError naming what it is
    and how to pass the data (``second`` names ``y``; ``hint``: advice for a dict)."""
    if isinstance(batch, Mapping):
        raise TypeError(
            f"{task} reads batches (inputs, {second}), got a dict with the columns "
            f"{sorted(batch)}: pass the data as a tuple (X, y){hint}"
        )
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = (
            f"a {type(batch).__name__} of {len(batch)} columns"
            if isinstance(batch, (tuple, list))
            else f"a {type(batch).__name__}"
        )
        raise TypeError(
            f"{task} reads batches (inputs, {second}), got {got}: pass the data as (X, y), or "
            "((x1, x2), y) for a model called with several inputs"
        )
    return batch[0], batch[1]
