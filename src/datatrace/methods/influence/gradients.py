"""Per-example gradients of the training loss and of a measurement, in a curvature layout.

The training loss of an example is the loss whose ``−∂loss/∂f`` is the task's out-to-loss weight
``Q``, so its gradient is ``∇_θ loss = −Q·∇_θ f`` (exact when the loss is a function of the
output ``f``, as classification's cross-entropy ``softplus(−margin)`` is). Two measurements of a
target are offered: its loss (kronfluence's default; gradient ``−Q·∇f``) or its output
(gradient ``∇f``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from datatrace.data import Examples, batch_to
from datatrace.grads.per_example import PerExampleGradients
from datatrace.methods.influence.layers import Layout
from datatrace.tasks.base import Task

if TYPE_CHECKING:
    from datatrace.methods.influence.fisher import SampledLabels

# What a target's gradient is taken of.
MEASUREMENTS = ("loss", "output")


class LayoutGradients:
    """Per-example gradients of one task, flattened in a :class:`Layout`.

    Args:
        model: the module (never modified).
        task: the task whose output and out-to-loss weight define the gradients.
        layout: the blocks, and so the selected parameters.
        param_names: the selected parameters (every name the layout holds).
        device: where batches are moved and gradients computed.
        sampled_labels: for the sampled-label Fisher, what draws the labels of the curvature's
            passes (:class:`~datatrace.methods.influence.fisher.SampledLabels`); ``None``: the
            training labels (empirical Fisher).
        checkpoint: the checkpoint's index (it seeds the sampled labels).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        layout: Layout,
        param_names: list[str],
        device: torch.device,
        sampled_labels: SampledLabels | None = None,
        checkpoint: int = 0,
    ):
        self.model, self.task, self.layout, self.device = model, task, layout, device
        self.sampled_labels, self.checkpoint = sampled_labels, checkpoint
        self._gradients = PerExampleGradients(model, task, param_names)

    def curvature_batches(
        self, state: Mapping[str, torch.Tensor], examples: Examples, batch_size: int
    ) -> Iterator[Any]:
        """The prepared batches of ``examples`` as the curvature's passes read them: with the
        training labels, or with labels sampled under ``state``."""
        for start in range(0, examples.n, batch_size):
            batch = self.prepare(examples.read(start, min(start + batch_size, examples.n)))
            if self.sampled_labels is not None:
                batch = self.sampled_labels.relabel(state, batch, self.checkpoint, start)
            yield batch

    def prepare(self, batch: Any) -> Any:
        """``batch`` checked by the task and moved to the device."""
        return batch_to(self.task.check_batch(self.model, batch), self.device)

    def gradients(
        self, state: Mapping[str, torch.Tensor], batch: Any, measurement: str = "loss"
    ) -> torch.Tensor:
        """``(batch_size, p)`` gradients of the loss (``−Q·∇f``) or of the output (``∇f``) of
        each example of a prepared batch, under the parameters and buffers ``state``."""
        return self.gradients_and_out_to_loss(state, batch, measurement)[0]

    def gradients_and_out_to_loss(
        self, state: Mapping[str, torch.Tensor], batch: Any, measurement: str = "loss"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`gradients` and the out-to-loss weights ``Q`` ``(batch_size,)`` of the batch
        (``None`` for ``measurement="output"``, which does not compute them)."""
        flat = self.layout.flatten(self._gradients.gradients(state, batch))
        if measurement == "output":
            return flat, None
        out_to_loss = self._gradients.out_to_loss(state, batch).to(flat.dtype)
        return -out_to_loss[:, None] * flat, out_to_loss
