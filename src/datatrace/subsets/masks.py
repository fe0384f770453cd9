"""Subset masks and the seeds of the models trained on them, all pure functions of integers."""

from __future__ import annotations

import hashlib

import numpy as np

from datatrace._arguments import real_number
from datatrace.grads.projectors import derive_seed

# Seeds handed to the user's train() are reduced to 31 bits: every RNG API takes them (torch,
# numpy, random, JAX, int32 config fields), and a collision among 2³¹ values is harmless here.
TRAIN_SEED_BITS = 31
# How the seeds of a table's models are chosen: "per-row" gives every subset its own seeds (the
# classic LDS protocol, and the small-drop protocol across seeds); "fixed" gives every subset the
# seeds of row 0, so that with a deterministic train() two subsets' models differ only by the
# examples they leave out (the small-drop protocol's deterministic variant).
SEED_POLICIES = ("per-row", "fixed")
# The small-drop protocol's default: each subset leaves out 1% of the training set.
DEFAULT_DROP_FRACTION = 0.01


def check_alpha(alpha: object) -> float:
    """``alpha``, the fraction of training examples each random subset keeps, checked.

    Raises:
        ValueError: not a number in ``[0, 1]``.
    """
    value = real_number("alpha", alpha)
    if value > 1:
        raise ValueError(f"alpha is the fraction of training examples kept, in [0, 1]; got {alpha}")
    return value


def random_masks(
    n_train: int, n_masks: int, alpha: float = 0.5, seed: int = 0, start: int = 0
) -> np.ndarray:
    """Random subsets of the training set, each of exactly ``round(alpha * n_train)`` examples.

    Row ``r`` comes from a generator seeded with ``derive_seed(seed, "mask", start + r)``, so a
    row does not depend on ``n_masks``: ``random_masks(n, 10)`` is the first ten rows of
    ``random_masks(n, 20)``, and ``random_masks(n, 10, start=10)`` the next ten.

    Args:
        n_train: size of the training set.
        n_masks: number of subsets.
        alpha: fraction of the training set in each subset, in ``[0, 1]``.
        seed: seed of the stream of masks.
        start: index of the first row in the stream.

    Returns:
        ``(n_masks, n_train)`` bool; ``True`` where the training example is in the subset.
    """
    if n_train < 1:
        raise ValueError(f"n_train must be at least 1, got {n_train}")
    if n_masks < 0 or start < 0:
        raise ValueError(f"n_masks and start must be non-negative, got {n_masks} and {start}")
    check_alpha(alpha)
    size = subset_size(n_train, alpha)
    masks = np.zeros((n_masks, n_train), dtype=bool)
    for row in range(n_masks):
        generator = np.random.default_rng(derive_seed(seed, "mask", start + row))
        masks[row, generator.permutation(n_train)[:size]] = True
    return masks


def subset_size(n_train: int, alpha: float) -> int:
    """Training examples in each random subset: ``round(alpha * n_train)``."""
    return round(alpha * n_train)


def dropped_count(n_train: int, drop_fraction: float) -> int:
    """Training examples each small-drop subset leaves out: ``round(drop_fraction · n_train)``,
    at least 1 (a subset that drops nothing measures nothing)."""
    if not 0.0 < drop_fraction < 1.0:
        raise ValueError(
            f"drop_fraction is the fraction of training examples left out, in (0, 1); got "
            f"{drop_fraction}"
        )
    if n_train < 2:
        raise ValueError(f"dropping examples needs at least 2 training examples, got {n_train}")
    return min(max(1, round(drop_fraction * n_train)), n_train - 1)


def kept_fraction(n_train: int, drop_fraction: float) -> float:
    """The ``alpha`` of :func:`random_masks` whose subsets drop exactly
    ``dropped_count(n_train, drop_fraction)`` examples."""
    return (n_train - dropped_count(n_train, drop_fraction)) / n_train


def drop_masks(
    n_train: int,
    n_masks: int,
    drop_fraction: float = DEFAULT_DROP_FRACTION,
    seed: int = 0,
    start: int = 0,
) -> np.ndarray:
    """Subsets of the small-drop LDS protocol: each leaves out ``dropped_count(n_train,
    drop_fraction)`` random training examples.

    The same stream as :func:`random_masks` with ``alpha = kept_fraction(n_train,
    drop_fraction)`` (so a table of drop masks resumes and extends like any random table).

    Returns:
        ``(n_masks, n_train)`` bool; ``False`` where the example is dropped.
    """
    alpha = kept_fraction(n_train, drop_fraction)
    return random_masks(n_train, n_masks, alpha, seed, start)


def train_seed(seed: int, row: int, repeat: int) -> int:
    """The seed passed to ``train`` for repeat ``repeat`` of row ``row`` (31 bits)."""
    return derive_seed(seed, "train", row, repeat) & ((1 << TRAIN_SEED_BITS) - 1)


def train_seeds(seed: int, row: int, n_seeds: int, policy: str = "per-row") -> list[int]:
    """The seeds of the ``n_seeds`` models trained on row ``row``; with ``policy="fixed"``,
    those of row 0 whatever the row (see :data:`SEED_POLICIES`)."""
    check_seed_policy(policy)
    row = 0 if policy == "fixed" else row
    return [train_seed(seed, row, repeat) for repeat in range(n_seeds)]


def check_seed_policy(policy: str) -> str:
    """``policy`` if it is one of :data:`SEED_POLICIES`, else a ValueError."""
    if policy not in SEED_POLICIES:
        raise ValueError(f"seed_policy must be one of {SEED_POLICIES}, got {policy!r}")
    return policy


def masks_digest(masks: np.ndarray) -> str:
    """A short hash of boolean masks (shape and content)."""
    masks = np.asarray(masks, dtype=bool)
    hasher = hashlib.sha256(f"{masks.shape}".encode())
    hasher.update(np.packbits(masks, axis=-1).tobytes())
    return hasher.hexdigest()[:16]


def check_masks(masks: np.ndarray, n_train: int) -> np.ndarray:
    """``masks`` as a ``(R, n_train)`` bool array, or a ``ValueError`` saying what is wrong."""
    array = np.asarray(masks)
    if array.ndim != 2 or array.shape[1] != n_train:
        raise ValueError(
            f"masks must be a (n_masks, n_train={n_train}) array, got shape {array.shape}"
        )
    if array.dtype != bool:
        if not np.isin(array, (0, 1)).all():
            raise ValueError("masks must be boolean (or 0/1): True keeps the training example")
        array = array.astype(bool)
    return array
