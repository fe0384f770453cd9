"""The fitted curvature in a datatrace store, stage by stage, so that a fit resumes.

Layout (inside the store's Zarr root)::

    influence/                     attrs["provenance"]: model, parameters, task, Fisher, data
      <c>/                         one group per checkpoint; attrs["identity"]: its fingerprint
        covariances/               stage 1: A_l ("activation_<l>"), S_l ("gradient_<l>")
        eigen/                     stage 2: "{activation,gradient}_{values,vectors}_<l>"
        corrected/                 stage 3 (EK-FAC): Λ_l ("eigenvalues_<l>")
        diagonal/                  the diagonal Fisher of every block ("diagonal_<b>")

``<l>`` numbers the Kronecker layers, ``<b>`` every block, in the layout's order (recorded in the
provenance). A stage's arrays are written first (each with a checksum per chunk, read back
checked) and its group's ``complete`` attribute last: a crash loses at most the stage in flight,
and a half-written stage is deleted and recomputed on the next fit. The damping is not stored
(it is applied when scoring), so one store serves every damping and both K-FAC and EK-FAC.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from datatrace.store import Store, StoreMismatchError
from datatrace.store.provenance import json_normalise
from datatrace.store.verify import create_array

SECTION = "influence"
STAGES = ("covariances", "eigen", "corrected", "diagonal")


class CurvatureStages:
    """The stages of one checkpoint's curvature in ``store``.

    Args:
        store: the datatrace store (its ``influence`` provenance already checked).
        checkpoint: the checkpoint's index.
        identity: what identifies the checkpoint (its fingerprint); a group of another
            checkpoint at this index is refused.

    Raises:
        StoreMismatchError: the store holds the curvature of another checkpoint at this index.
    """

    def __init__(self, store: Store, checkpoint: int, identity: dict[str, Any]):
        self.store = store
        self.path = f"{SECTION}/{checkpoint}"
        identity = json_normalise(identity)
        group = store.root.require_group(self.path)
        recorded = group.attrs.get("identity")
        if recorded is None:
            group.attrs["identity"] = identity
        elif recorded != identity:
            raise StoreMismatchError(
                f"the store at {store.where} holds the curvature of another checkpoint at index "
                f"{checkpoint} (stored {recorded}, now {identity}): pass the checkpoints it was "
                "fitted with, in the same order, or use a new store"
            )
        self.group = group

    def has(self, stage: str) -> bool:
        """Whether ``stage`` is completely written."""
        return stage in self.group and bool(self.group[stage].attrs.get("complete"))

    def write(self, stage: str, arrays: dict[str, torch.Tensor | np.ndarray]) -> None:
        """Write the arrays of ``stage`` (replacing a half-written one), then mark it complete."""
        if stage in self.group:
            del self.group[stage]
        group = self.group.create_group(stage, attributes={"complete": False})
        for name, values in arrays.items():
            values = values.numpy() if torch.is_tensor(values) else np.asarray(values)
            array = create_array(
                group, name, compress=False, shape=values.shape, dtype=values.dtype
            )
            array[...] = values
        group.attrs["complete"] = True

    def read(self, stage: str) -> dict[str, torch.Tensor]:
        """The arrays of a complete ``stage``, as float64 tensors, checked against their
        checksums."""
        group = self.group[stage]
        return {
            name: torch.from_numpy(np.asarray(self.store.checked(array)[...]))
            for name, array in group.arrays()
        }
