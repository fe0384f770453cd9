"""Which Fisher the curvature estimates: the empirical one (the training labels) or the "true"
one (labels sampled from the model's own predictive distribution, kronfluence's default).

For a softmax classifier the true Fisher ``E_x E_{ŷ~p(·|x)}[∇loss(x, ŷ) ∇loss(x, ŷ)ᵀ]`` equals
the Gauss–Newton matrix of the cross-entropy; with one sampled label per example and pass it is
an unbiased Monte Carlo estimate of it. Sampling needs a predictive distribution, which a
datatrace task does not define in general: ``"sampled"`` is offered for
:class:`~datatrace.tasks.Classification` (batches ``(inputs, labels)``, logits from the model)
and :class:`~datatrace.tasks.Regression`, whose squared error ``½(ŷ − y)²`` is the negative
log-likelihood of ``y ~ N(ŷ, 1)``: targets ``ŷ + ε``, ``ε ~ N(0, 1)``, whose Fisher is the
Gauss–Newton matrix ``∇ŷ∇ŷᵀ`` (the attributed output's; the other outputs of a multi-output
model are drawn too but their loss is not the task's).
Only the curvature's passes use the sampled labels; the training gradients that are scored
always use the true ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from datatrace.grads.per_example import _eval_mode, module_state
from datatrace.tasks.base import Task
from datatrace.tasks.classification import Classification, ClassLogit
from datatrace.tasks.regression import Regression

FISHERS = ("empirical", "sampled")


class SampledLabels:
    """Labels drawn from a classifier's softmax, reproducibly: batch ``start`` of checkpoint
    ``checkpoint`` always draws the same labels for one ``seed`` (so a resumed fit, or a refit,
    estimates the same Fisher).

    Args:
        model: the classifier (never modified).
        seed: the seed of the draws.

    Raises:
        ValueError: ``task`` is not a :class:`~datatrace.tasks.Classification` fitting task or
            a :class:`~datatrace.tasks.Regression`.
    """

    def __init__(self, model: nn.Module, task: Task, seed: int):
        regression = isinstance(task, Regression)
        if not regression and (
            not isinstance(task, Classification) or isinstance(task, ClassLogit)
        ):
            raise ValueError(
                f"fisher='sampled' draws labels from a classifier's softmax (or targets around "
                f"a regressor's prediction) and needs the task Classification or Regression, got "
                f"{type(task).__name__}: use fisher='empirical' (every task)"
            )
        self.model, self.seed = model, seed
        self.regression = task if regression else None

    def relabel(
        self, state: Mapping[str, torch.Tensor], batch: Any, checkpoint: int, start: int
    ) -> tuple[Any, torch.Tensor]:
        """``(inputs, sampled labels)`` for a prepared ``(inputs, labels)`` batch whose first
        example is training example ``start``, under the parameters and buffers ``state``."""
        inputs, labels = batch
        arguments = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        with torch.no_grad(), _eval_mode(self.model):
            logits = torch.func.functional_call(
                self.model, module_state(self.model, state), arguments
            )
        seed = int(np.random.SeedSequence([self.seed, checkpoint, start]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(seed)
        if self.regression is not None:
            return inputs, self._regression_targets(logits.detach(), labels, generator)
        probabilities = torch.softmax(logits.detach().double().cpu(), dim=-1)
        sampled = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
        return inputs, sampled.to(dtype=labels.dtype, device=labels.device)

    def _regression_targets(
        self, predicted: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """``ŷ + ε``, ``ε ~ N(0, 1)``, in the targets' shape: of every output for ``(n, d)``
        targets, of the attributed one for ``(n,)`` or ``(n, 1)`` targets."""
        predicted = predicted.reshape(len(predicted), -1).double().cpu()
        if targets.dim() == 1 or targets.shape[1] == 1:
            predicted = self.regression.column(predicted)
        noise = torch.randn(predicted.shape, generator=generator, dtype=torch.float64)
        return (predicted + noise).reshape(targets.shape).to(targets.dtype).to(targets.device)
