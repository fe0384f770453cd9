"""Checking the masks and outputs of models trained on subsets (inputs of datamodels and LDS)."""

from __future__ import annotations

from typing import Any

import numpy as np


def subset_data(masks: Any, outputs: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Masks and per-target outputs of subset-trained models, checked.

    Args:
        masks: ``(R, n_train)`` bool or 0/1 array, one row per trained subset; or an object with
            ``.masks`` and ``.outputs`` attributes (e.g. ``SubsetExperiment(...).results()``),
            in which case ``outputs`` must be ``None``.
        outputs: ``(R, n_targets)`` outputs of the model trained on each subset, or
            ``(R, n_seeds, n_targets)`` for several training seeds per subset (averaged over
            seeds), or ``(R,)`` for one target.

    Returns:
        ``(masks (R, n_train) bool, outputs (R, n_targets) float64)``.

    Raises:
        ValueError: shapes that do not match, masks that are not 0/1, outputs that are not
            finite numbers.
    """
    if outputs is not None and hasattr(masks, "masks") and hasattr(masks, "outputs"):
        raise ValueError(
            "pass either an object with .masks and .outputs, or masks and outputs arrays, not both"
        )
    if outputs is None:
        if not (hasattr(masks, "masks") and hasattr(masks, "outputs")):
            raise ValueError(
                "outputs are missing: pass (masks, outputs) arrays, or one object with .masks "
                "and .outputs (such as SubsetExperiment(...).results())"
            )
        masks, outputs = masks.masks, masks.outputs
    mask_array = np.asarray(masks)
    if mask_array.ndim != 2:
        raise ValueError(
            f"masks must be a (n_subsets, n_train) array, got shape {mask_array.shape}"
        )
    if mask_array.dtype != bool:
        if not np.issubdtype(mask_array.dtype, np.number) or not np.isin(mask_array, (0, 1)).all():
            raise ValueError(
                "masks must be boolean or 0/1 (1 where the training example is in the subset); "
                f"got values such as {np.unique(mask_array)[:5].tolist()}"
            )
        mask_array = mask_array.astype(bool)
    output_array = np.asarray(outputs)
    if not np.issubdtype(output_array.dtype, np.number) or np.iscomplexobj(output_array):
        raise ValueError(f"outputs must be real numbers, got dtype {output_array.dtype}")
    output_array = output_array.astype(np.float64)
    if output_array.ndim == 1:
        output_array = output_array[:, None]
    if output_array.ndim == 3:
        output_array = output_array.mean(axis=1)
    if output_array.ndim != 2 or output_array.shape[0] != mask_array.shape[0]:
        raise ValueError(
            f"outputs must be (n_subsets={mask_array.shape[0]}, n_targets) or (n_subsets, "
            f"n_seeds, n_targets), got shape {np.shape(outputs)}"
        )
    if not np.isfinite(output_array).all():
        bad = np.flatnonzero(~np.isfinite(output_array).all(axis=1))
        raise ValueError(
            f"outputs of {bad.size} subset(s) are not finite (rows {bad[:5].tolist()}...): drop "
            "the rows of models that did not finish"
        )
    return mask_array, output_array
