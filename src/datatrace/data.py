"""Adapters that give ordered, sliceable batches of a user's data.

Attribution is about *which* example did what, so the order of examples is part of the result:
row ``i`` of every training-side array is training example ``i``. Every data source is therefore
read by index ranges, which also lets a resumed run recompute exactly the chunk it lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler
from torch.utils.data._utils.collate import default_collate

DataLike = Any
"""A torch ``Dataset``, a ``DataLoader`` without shuffling, a tuple of tensors or arrays
``(X, y, ...)`` with equal first dimensions, or a mapping of such columns (e.g. tokenizer output
with labels); in a tuple, a column may itself be a mapping or tuple of arrays (``({"ids": ...,
"mask": ...}, labels)`` for a model that takes a dict), and a tuple of Python lists is read as
columns too (``(X.tolist(), y.tolist())``)."""


def _column(name: int | str, value: Any) -> torch.Tensor:
    """One column of the data as a tensor with the examples along dim 0, or a clear error."""
    what = f"column {name!r}" if isinstance(name, str) else f"column {name} of the data"
    if not torch.is_tensor(value):
        array = np.asarray(value)
        if array.dtype.kind not in "biufc":
            raise TypeError(
                f"{what} holds {array.dtype} values, not numbers: pass tensors or numeric arrays "
                "(tokenize texts, encode labels as integer classes)"
            )
        value = torch.as_tensor(array)
    if value.dim() == 0:
        raise ValueError(
            f"{what} is a single number (a 0-d tensor): pass one row per example, e.g. shape (n,)"
        )
    return value


def _is_columns(value: Any) -> bool:
    """An array, or a non-empty tuple or mapping (nested) of arrays: one column of the data."""
    if _is_array(value):
        return True
    if isinstance(value, Mapping):
        return bool(value) and all(_is_columns(v) for v in value.values())
    return isinstance(value, tuple) and bool(value) and all(_is_columns(v) for v in value)


def _nested_column(name: int | str, value: Any) -> Any:
    """:func:`_column` of every array of a (nested) column, named by its path."""
    if isinstance(value, Mapping):
        return type(value)({k: _nested_column(f"{name}.{k}", v) for k, v in value.items()})
    if isinstance(value, tuple):
        return tuple(_nested_column(f"{name}.{i}", v) for i, v in enumerate(value))
    return _column(name, value)


class Examples:
    """A fixed, ordered collection of examples that can be read in index ranges.

    Args:
        data: see :data:`DataLike`.

    Attributes:
        n: number of examples.
    """

    def __init__(self, data: DataLike):
        self._read: Callable[[int, int], Any]
        if isinstance(data, Examples):
            self.n, self._read = data.n, data._read
        elif isinstance(data, DataLoader):
            self._init_loader(data)
        elif isinstance(data, Mapping):
            self._init_columns(dict(data))
        elif isinstance(data, (tuple, list)) and data and all(_is_array(c) for c in data):
            self._init_columns(list(data))
        elif isinstance(data, tuple) and data and all(_is_columns(c) for c in data):
            self._init_columns(list(data))  # e.g. ({"ids": ..., "mask": ...}, labels)
        elif isinstance(data, tuple) and data and all(isinstance(c, list) for c in data):
            self._init_columns(list(data))  # (X.tolist(), labels): Python lists as columns
        elif isinstance(data, Dataset) or (
            hasattr(data, "__getitem__") and hasattr(data, "__len__")
        ):
            self._init_dataset(data, default_collate)
        else:
            raise TypeError(
                f"cannot read examples from a {type(data).__name__}: pass a torch Dataset, a "
                "DataLoader with shuffle=False, a tuple of tensors (X, y) or a dict of tensors"
            )

    def _init_columns(self, columns: list | dict) -> None:
        names = list(columns) if isinstance(columns, dict) else list(range(len(columns)))
        values = list(columns.values()) if isinstance(columns, dict) else columns
        values = [_nested_column(name, value) for name, value in zip(names, values)]
        lengths: set[int] = set()
        map_tensors(lambda tensor: lengths.add(len(tensor)), values)
        if len(lengths) != 1:
            raise ValueError(
                f"the columns of the data have different lengths {sorted(lengths)}: every column "
                "must have one row per example"
            )
        self.n = lengths.pop()

        def rows(start: int, stop: int) -> list:
            return map_tensors(lambda tensor: tensor[start:stop], values)

        if isinstance(columns, dict):
            keys = list(columns)
            self._read = lambda start, stop: dict(zip(keys, rows(start, stop)))
        else:
            self._read = lambda start, stop: tuple(rows(start, stop))

    def _init_dataset(self, dataset: Sequence, collate: Callable) -> None:
        self.n = len(dataset)
        self._read = lambda start, stop: collate([dataset[i] for i in range(start, stop)])

    def _init_loader(self, loader: DataLoader) -> None:
        if not isinstance(loader.sampler, SequentialSampler) or loader.batch_sampler is None:
            raise ValueError(
                "the DataLoader does not read its dataset in order (shuffle=True or a custom "
                "sampler): attribution needs a fixed order of examples. Pass a DataLoader with "
                "shuffle=False, or the dataset itself"
            )
        self._init_dataset(loader.dataset, loader.collate_fn or default_collate)

    def read(self, start: int, stop: int) -> Any:
        """The batch of examples ``start`` to ``stop - 1``."""
        if not 0 <= start <= stop <= self.n:
            raise IndexError(f"examples {start}:{stop} are outside 0:{self.n}")
        return self._read(start, stop)

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[Any]:
        """Consecutive batches of at most ``batch_size`` examples covering ``start:stop``."""
        for lo in range(start, stop, batch_size):
            yield self.read(lo, min(lo + batch_size, stop))

    def __len__(self) -> int:
        return self.n


def _is_array(value: Any) -> bool:
    return torch.is_tensor(value) or isinstance(value, np.ndarray)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of a floating ``tensor`` is finite, exactly.

    The sum of a tensor holding NaN or ±inf is not finite, so a finite sum proves every value
    finite at the cost of one reduction (about a tenth of ``isfinite(...).all()``, which writes a
    mask the size of the tensor); only a sum that is not finite, which finite values can also
    give by overflowing, is settled element by element.
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def map_tensors(fn: Callable[[torch.Tensor], Any], batch: Any) -> Any:
    """Apply ``fn`` to every tensor of a batch nested in tuples, lists and dicts."""
    if torch.is_tensor(batch):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({key: map_tensors(fn, value) for key, value in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(map_tensors(fn, value) for value in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(fn, value) for value in batch)
    return batch


def batch_to(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    return map_tensors(lambda tensor: tensor.to(device), batch)


def batch_size_of(batch: Any) -> int:
    """Number of examples in a batch: the first dimension of its first tensor."""
    sizes: list[int] = []
    map_tensors(lambda tensor: sizes.append(tensor.shape[0]), batch)
    if not sizes:
        raise ValueError("the batch holds no tensor, so its number of examples is unknown")
    return sizes[0]
