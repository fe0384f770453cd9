"""Text classification: the margin of the true class of a sequence-classification model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from datatrace.data import batch_size_of
from datatrace.tasks._checks import (
    cast_columns,
    check_id_columns,
    check_label_range,
    class_labels,
    input_vocab_size,
    run_on_first_example,
)
from datatrace.tasks._inputs import (
    BIDIRECTIONAL_MASKS,
    call_model,
    check_columns,
    model_dtype,
    model_inputs,
    output_field,
)
from datatrace.tasks.base import Task
from datatrace.tasks.classification import (
    classification_margin,
    margin_curvature,
    margin_out_to_loss,
)


class TextClassification(Task):
    """Attribute a text classifier's margin on the true class.

    For any model called as ``model(**inputs)`` that returns class logits, such as a Hugging Face
    ``AutoModelForSequenceClassification`` (BERT, DistilBERT, MiniLM, ...). Batches are dicts of
    tensors: the tokenizer's output (``input_ids``, ``attention_mask``, ``token_type_ids`` or
    whatever the model takes) plus a column of integer labels. Every column except the label
    column and ``ignore`` is passed to the model, so no input name is assumed.

    ``output`` is the margin ``logit_y − logsumexp_{c≠y} logit_c``; ``out_to_loss`` is
    ``1 − p_y = sigmoid(−margin)``, so that ``∂(cross-entropy)/∂output = −out_to_loss``.

    Padding masks (``attention_mask``) are passed as additive 4-D masks, which both eager and SDPA
    attention accept under ``vmap``; see :func:`datatrace.tasks._inputs.model_inputs`.

    Args:
        label_key: the column holding the ``(batch_size,)`` integer labels.
        logits_key: the field of the model's output holding the logits.
        ignore: other columns that are not model inputs (e.g. an example id).
        bidirectional_masks: 2-D padding-mask columns to pass as 4-D additive masks (the
            encoder's ``attention_mask``); ``()`` passes every column unchanged.
    """

    def __init__(
        self,
        label_key: str = "labels",
        logits_key: str = "logits",
        ignore: Sequence[str] = (),
        bidirectional_masks: Sequence[str] = BIDIRECTIONAL_MASKS,
    ):
        self.label_key = label_key
        self.logits_key = logits_key
        self.ignore = tuple(ignore)
        self.bidirectional_masks = tuple(bidirectional_masks)

    def logits(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The model's ``(batch_size, n_classes)`` logits on ``batch``."""
        batch = check_columns(batch, [self.label_key], type(self).__name__)
        inputs = model_inputs(
            batch,
            (self.label_key, *self.ignore),
            model_dtype(model),
            self.bidirectional_masks,
        )
        return output_field(call_model(model, inputs), self.logits_key)

    def output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return classification_margin(self.logits(model, batch), batch[self.label_key])

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

    def check_batch(self, model: nn.Module, batch: Any) -> dict[str, Any]:
        """The batch checked (see :meth:`Task.check_batch`): the label column ``(batch_size,)``
        integers in ``0 … n_classes − 1`` (one forward pass of the first example gives
        ``n_classes``), id columns (``input_ids``, ...) non-negative integers, other floating
        columns in the model's dtype."""
        batch = check_columns(batch, [self.label_key], type(self).__name__)
        inputs = {k: v for k, v in batch.items() if k not in (self.label_key, *self.ignore)}
        n_rows = batch_size_of(inputs) if inputs else None
        checked = cast_columns(batch, model_dtype(model), keep=(self.label_key, *self.ignore))
        checked.update(check_id_columns(checked, vocab_size=input_vocab_size(model)))
        what = f"the labels (column {self.label_key!r})"
        labels = class_labels(batch[self.label_key], n_rows, what)
        checked[self.label_key] = labels
        logits = run_on_first_example(model, self.logits, checked, type(self).__name__)
        check_label_range(labels, logits.shape[-1], what)
        return checked

    def config(self) -> dict[str, Any]:
        return {
            "name": type(self).__name__,
            "label_key": self.label_key,
            "logits_key": self.logits_key,
            "ignore": list(self.ignore),
            "bidirectional_masks": list(self.bidirectional_masks),
        }
