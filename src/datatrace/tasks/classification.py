"""Classification: the margin of the true class, for image, tabular and any logit model."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from datatrace.data import batch_size_of
from datatrace.tasks._checks import (
    WRAP_THE_MODEL,
    call_on_inputs,
    cast_floating,
    check_label_range,
    class_labels,
    input_pair,
    run_on_first_example,
)
from datatrace.tasks._inputs import model_dtype
from datatrace.tasks.base import Task


def class_logits(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` as ``(..., n_classes)`` softmax logits: a binary classifier's single logit
    ``z`` (``(..., 1)``, trained with ``BCEWithLogitsLoss``: ``p(y=1) = σ(z)``) becomes the two
    logits ``(0, z)``, which give the same probabilities; any other output as it is."""
    if logits.shape[-1] == 1:
        return torch.cat([torch.zeros_like(logits), logits], -1)
    return logits


def classification_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The margin ``logit_y − logsumexp_{c≠y} logit_c`` of each row.

    Args:
        logits: ``(batch_size, n_classes)`` model outputs; ``(batch_size, 1)`` for a binary
            classifier's single logit ``z`` (:func:`class_logits`: the margin is ``z`` for
            label 1 and ``−z`` for label 0).
        labels: ``(batch_size,)`` integer class of each row.

    Returns:
        ``(batch_size,)`` margins; positive where the true class wins.
    """
    logits = class_logits(logits)
    n_classes = logits.shape[-1]
    is_true = torch.arange(n_classes, device=logits.device) == labels.unsqueeze(-1)
    true_logit = logits.gather(-1, labels.unsqueeze(-1).long()).squeeze(-1)
    other = logits.masked_fill(is_true, float("-inf")).logsumexp(-1)
    return true_logit - other


def margin_curvature(out_to_loss: np.ndarray) -> np.ndarray:
    """``Q(1 − Q)`` in float64 for ``Q = σ(−m)``: ``σ(m)σ(−m)``, the second derivative of the
    cross-entropy ``softplus(−m)`` in the margin (0 for ``Q`` of exactly 0 or 1)."""
    out_to_loss = np.asarray(out_to_loss, dtype=np.float64)
    return np.clip(out_to_loss * (1.0 - out_to_loss), 0.0, None)


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

    A model with one output ``z`` per example (``(batch_size, 1)``) is a binary classifier
    trained with ``BCEWithLogitsLoss`` (``p(y=1) = σ(z)``): labels are 0 or 1, the margin is
    ``z`` for label 1 and ``−z`` for label 0 and ``out_to_loss`` is ``σ(−margin)``, the
    two-class softmax of the logits ``(0, z)``.

    A model that returns a dict or a Hugging Face ``ModelOutput`` with a ``logits`` field (an
    image classifier called on ``pixel_values``, say) is read through that field. A tuple is not
    guessed at (``(features, logits)`` and ``(logits, aux)`` are both common): wrap the model so
    that it returns the logits.
    """

    def _logits(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        return call_on_inputs(model, inputs)

    def output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, labels = batch
        return classification_margin(self._logits(model, inputs), labels)

    def check_batch(self, model: nn.Module, batch: Any) -> tuple[Any, torch.Tensor]:
        """``(inputs, labels)`` checked (see :meth:`Task.check_batch`): floating inputs in the
        model's dtype; labels ``(batch_size,)`` integers in ``0 … n_classes − 1``, where
        ``n_classes`` is the number of logits of one forward pass of the first example (which
        also shows whether the inputs fit the model).

        Raises:
            TypeError: the batch is not an ``(inputs, labels)`` pair.
            ValueError: labels of shape ``(n, 1)`` or one-hot ``(n, C)``, floating labels that
                are not whole numbers, negative labels, labels ``≥ n_classes``; inputs on which
                the model fails.
        """
        inputs, labels = self._pair(batch)
        inputs = cast_floating(inputs, model_dtype(model), "the inputs")
        labels = class_labels(labels, batch_size_of(inputs))
        check_label_range(labels, self._n_classes(model, inputs))
        return inputs, labels

    def _pair(self, batch: Any) -> tuple[Any, Any]:
        hint = " (for a model called on named columns, use TextClassification)"
        return input_pair(batch, type(self).__name__, "labels", hint)

    def _n_classes(self, model: nn.Module, inputs: Any) -> int:
        logits = run_on_first_example(model, self._logits, inputs, type(self).__name__)
        if not torch.is_tensor(logits) or logits.dim() != 2:
            shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise ValueError(
                f"the model's output on one example is {shape}: {type(self).__name__} "
                "attributes a margin of (batch_size, n_classes) logits (or (batch_size, 1) for a "
                "binary classifier's single logit)"
                + ("" if torch.is_tensor(logits) else WRAP_THE_MODEL)
            )
        return class_logits(logits).shape[-1]

    def out_to_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return margin_out_to_loss(self.output(model, batch))

    def curvature(self, out_to_loss: np.ndarray) -> np.ndarray:
        """``Q(1 − Q) = σ(m)σ(−m)``, the cross-entropy's second derivative in the margin ``m``."""
        return margin_curvature(out_to_loss)

    def output_and_out_to_loss(
        self, model: nn.Module, batch: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        margins = self.output(model, batch)
        return margins, margin_out_to_loss(margins.detach())


def centred_class_logit(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``logit_c − mean_k logit_k`` of each row, for the class ``c`` of that row.

    Args:
        logits: ``(batch_size, n_classes)`` model outputs.
        classes: ``(batch_size,)`` integer class whose logit is taken.

    Returns:
        ``(batch_size,)`` centred logits (the softmax ignores a shift common to all classes;
        centring removes it, as :func:`datatrace.applications.unlearning.centre_logits` does).
    """
    logits = class_logits(logits)
    chosen = logits.gather(-1, classes.unsqueeze(-1).long()).squeeze(-1)
    return chosen - logits.mean(-1)


class ClassLogit(Classification):
    """A *target* task: attribute one class's centred logit ``logit_c − mean_k logit_k``.

    Batches are ``(inputs, classes)``: the second column names the class whose logit is the
    output, not the true label. Use it to score targets of an estimator fitted with
    :class:`Classification` (``TRAK.score(targets, task=ClassLogit())``): the training side keeps
    the margin and its ``Q``, and each target row gets the attribution of one logit. With
    :func:`per_class_targets` the rows are point-major (row ``p · n_classes + c`` is logit ``c``
    of point ``p``), the per-class form that
    :func:`datatrace.applications.unlearning.datamodel_matching`
    takes.

    ``out_to_loss`` is 1: a logit is not a loss-linked output, and targets' weights are not used
    by TRAK. Do not fit an estimator with this task.
    """

    def output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, classes = batch
        return centred_class_logit(self._logits(model, inputs), classes)

    def out_to_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        _, classes = batch
        return torch.ones(classes.shape[0], dtype=torch.float32, device=classes.device)

    def curvature(self, out_to_loss: np.ndarray) -> None:
        return None


def per_class_targets(inputs: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every point once per class, point-major: the targets of :class:`ClassLogit`.

    Args:
        inputs: ``(n_points, ...)`` inputs.
        n_classes: number of classes (logits) of the model.

    Returns:
        ``(inputs, classes)`` with ``n_points · n_classes`` rows; row ``p · n_classes + c`` is
        point ``p`` with class ``c``.
    """
    if n_classes < 1:
        raise ValueError(f"n_classes must be at least 1, got {n_classes}")
    repeated = inputs.repeat_interleave(n_classes, dim=0)
    classes = torch.arange(n_classes).repeat(inputs.shape[0])
    return repeated, classes
