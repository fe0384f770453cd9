"""Checks of the arguments users give, shared by the estimators, the applications and the CLI's
configs: positions (integer indices or a boolean mask), positive integers, non-negative or
positive numbers, thread counts and device names. Each refuses a bad value with a ValueError
that names the setting and the value given."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def positions(values: Any, n: int, what: str) -> np.ndarray:
    """``values`` as ``(r,)`` int64 positions among ``n``: integers (or floats that are whole
    numbers) as given, flattened; a boolean mask of length ``n`` as the positions where it is
    True. Range, repeats and emptiness are the caller's to check.

    Raises:
        ValueError: a boolean mask of another length, or values that are not integers (2.5, or
            strings), naming ``what``.
    """
    array = np.asarray(values)
    if array.dtype == bool:
        if array.ndim != 1 or array.size != n:
            raise ValueError(
                f"{what} as a boolean mask must have one entry per example ({n}), got shape "
                f"{array.shape}"
            )
        return np.flatnonzero(array)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        whole = np.issubdtype(array.dtype, np.floating) and np.all(array == np.round(array))
        if not whole:
            raise ValueError(
                f"{what} must be integer positions (or a boolean mask of length {n}), got "
                f"{array.dtype} values such as {array.ravel()[:3].tolist()}"
            )
    return array.astype(np.int64).ravel()


def positive_integer(name: str, value: Any, alternative: str = "") -> int:
    """``value`` as an ``int`` if it is a positive integer (a Python or NumPy integer, not a
    bool, a float or a string).

    Raises:
        ValueError: naming the setting, the value given and ``alternative`` (e.g. ``" or
            'auto'"``: what else the setting takes).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer{alternative}, got {value!r}")
    return int(value)


def non_negative_integer(name: str, value: Any, note: str = "") -> int:
    """``value`` as an ``int`` if it is a non-negative integer (not a bool, a float or a
    string).

    Raises:
        ValueError: naming the setting, ``note`` (e.g. ``" (0: no interval)"``) and the value.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer{note}, got {value!r}")
    return int(value)


def real_number(
    name: str, value: Any, least: str = "non-negative", note: str = "", alternative: str = ""
) -> float:
    """``value`` as a ``float`` if it is a finite real number (not a bool or a string) that is
    ``least``: ``"non-negative"`` (≥ 0) or ``"positive"`` (> 0).

    Raises:
        ValueError: naming the setting, ``note`` (what the number means, e.g. ``" (relative to
            the mean diagonal of ΦᵀΦ)"``), ``alternative`` (what else it takes, e.g. ``" or
            'auto'"``) and the value given.
    """
    number = not isinstance(value, bool) and isinstance(value, numbers.Real)
    if not (number and math.isfinite(value) and (value > 0 if least == "positive" else value >= 0)):
        raise ValueError(f"{name} must be a {least} number{note}{alternative}, got {value!r}")
    return float(value)


def thread_count(value: Any) -> int:
    """A ``threads`` setting: a non-negative integer, 0 leaving torch's own setting.

    Raises:
        ValueError: anything else.
    """
    return non_negative_integer("threads", value, " (0: leave torch's setting)")


def named_device(device: Any) -> Any:
    """``torch.device(device)``, with a ValueError that names the setting for a bad name."""
    import torch

    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}"
        ) from error
