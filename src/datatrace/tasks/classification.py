"""Classification: the margin of the true class, for image, tabular and any logit model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from datatrace.tasks.base import Task


def classification_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The margin ``logit_y − logsumexp_{c≠y} logit_c`` of each row.

    Args:
        logits: ``(batch_size, n_classes)`` model outputs.
        labels: ``(batch_size,)`` integer class of each row.

    Returns:
        ``(batch_size,)`` margins; positive where the true class wins.
    """
    n_classes = logits.shape[-1]
    is_true = torch.arange(n_classes, device=logits.device) == labels.unsqueeze(-1)
    true_logit = logits.gather(-1, labels.unsqueeze(-1).long()).squeeze(-1)
    other = logits.masked_fill(is_true, float("-inf")).logsumexp(-1)
    return true_logit - other


def margin_out_to_loss(margins: torch.Tensor) -> torch.Tensor:
    """``Q = 1 − p_y = sigmoid(−margin)`` for the margin of a softmax classifier.

    Computed as a sigmoid rather than ``1 − softmax`` so that the tiny values of confidently fit
    examples (1e-7 and below) are not lost to cancellation in float32.
    """
    return torch.sigmoid(-margins)


class Classification(Task):
    """Attribute a classifier's margin on the true class.

    Batches are ``(inputs, labels)``: ``inputs`` is whatever the model's ``forward`` takes (a
    tensor, or a tuple of tensors passed as positional arguments), ``labels`` the
    ``(batch_size,)`` integer classes. ``output`` is ``logit_y − logsumexp_{c≠y} logit_c``;
    ``out_to_loss`` is ``1 − p_y``, so that ``∂(cross-entropy)/∂output = −out_to_loss``.
    """

    def _logits(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)

    def output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, labels = batch
        return classification_margin(self._logits(model, inputs), labels)

    def out_to_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return margin_out_to_loss(self.output(model, batch))
