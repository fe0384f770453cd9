"""Regression with the squared error: the prediction, weighted by its residual."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from datatrace.data import batch_size_of
from datatrace.tasks._checks import (
    WRAP_THE_MODEL,
    _position,
    as_tensor,
    call_on_inputs,
    cast_floating,
    input_pair,
    run_on_first_example,
)
from datatrace.tasks._inputs import model_dtype
from datatrace.tasks.base import Task


class Regression(Task):
    """Attribute a regression model's prediction, for a model trained with the squared error.

    Batches are ``(inputs, targets)``: ``inputs`` is whatever the model's ``forward`` takes (a
    tensor, or a tuple of tensors passed as positional arguments); the model returns ``(n,)`` or
    ``(n, 1)`` predictions, or ``(n, d)`` for ``d`` outputs, of which ``output`` names the one
    attributed. ``targets`` are ``(n,)`` (the attributed output's targets), or ``(n, d)`` like the
    model's predictions.

    ``output`` is the prediction ``ŷ``; ``out_to_loss`` is the residual ``Q = y − ŷ``
    (``−∂loss/∂ŷ`` for the loss ``½(ŷ − y)²``; the squared error's curvature in ``ŷ`` is 1, so
    nothing is left out of the Gauss–Newton kernel). For a linear model TRAK's scores with
    ``λ → 0`` are then the leave-one-out differences of the prediction up to the leverage factor
    ``1/(1 − h_i)``: ``xᵀ(XᵀX)⁻¹x_i·r_i`` (tested against refitting without each example).
    A training example the model fits exactly has ``Q = 0`` and attributions 0: removing it does
    not move a linear fit. A loss of another scale (``mean`` over ``d`` outputs, a factor 2)
    scales every ``Q`` alike, which the ranking of training examples and the LDS ignore.

    Args:
        output: for a model with ``d > 1`` outputs per example, the index of the attributed one
            (``None``: the model must have one output).
    """

    def __init__(self, output: int | None = None):
        if output is not None and (isinstance(output, bool) or not isinstance(output, int)):
            raise TypeError(f"output must be an integer index or None, got {output!r}")
        if output is not None and output < 0:
            raise ValueError(f"output must be a non-negative index, got {output}")
        self.output_index = output

    def config(self) -> dict[str, Any]:
        return {"name": type(self).__name__, "output": self.output_index}

    def column(self, values: torch.Tensor) -> torch.Tensor:
        """The attributed output of ``(n,)``, ``(n, 1)`` or ``(n, d)`` values, as ``(n,)``."""
        if values.dim() == 1:
            return values
        if values.shape[1] == 1:
            return values[:, 0]
        return values[:, 0 if self.output_index is None else self.output_index]

    def predictions(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """The attributed prediction ``ŷ`` of each example, ``(n,)``."""
        return self.column(call_on_inputs(model, inputs))

    def output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, _ = batch
        return self.predictions(model, inputs)

    def out_to_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = batch
        return self.column(targets) - self.predictions(model, inputs).detach()

    def output_and_out_to_loss(
        self, model: nn.Module, batch: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = batch
        predicted = self.predictions(model, inputs)
        return predicted, self.column(targets) - predicted.detach()

    def check_batch(self, model: nn.Module, batch: Any) -> tuple[Any, torch.Tensor]:
        """``(inputs, targets)`` checked (see :meth:`Task.check_batch`): floating inputs in the
        model's dtype; targets finite, in the model's dtype, ``(n,)`` or ``(n, d)`` where one
        forward pass of the first example gives ``d`` outputs (which also shows whether the
        inputs fit the model) and ``output`` is below ``d``.

        Raises:
            TypeError: the batch is not an ``(inputs, targets)`` pair; targets not numbers.
            ValueError: targets NaN or infinite, of another length than the inputs or another
                width than the predictions; a model with several outputs and no ``output``, or
                ``output`` out of range; a model output that is not ``(n,)`` or ``(n, d)``;
                inputs on which the model fails.
        """
        name = type(self).__name__
        inputs, targets = input_pair(batch, name, "targets")
        dtype = model_dtype(model)
        inputs = cast_floating(inputs, dtype, "the inputs")
        targets = as_tensor(targets, "the targets")
        if targets.dtype == torch.bool or targets.is_complex():
            raise TypeError(f"the targets must be real numbers, got {targets.dtype}")
        targets = targets.to(dtype)
        n = batch_size_of(inputs)
        if targets.dim() not in (1, 2) or targets.shape[0] != n:
            raise ValueError(
                f"the targets have shape {tuple(targets.shape)} for {n} examples: pass (n,) "
                "targets of the attributed output, or (n, d) targets like the model's predictions"
            )
        bad = ~torch.isfinite(targets)
        if bad.any():
            raise ValueError(
                f"the targets are NaN or infinite at {_position(bad)}: remove those examples or "
                "fill in their targets"
            )
        width = self._width(model, inputs)
        if width > 1 and self.output_index is None:
            raise ValueError(
                f"the model gives {width} outputs per example: choose the attributed one with "
                f"{name}(output=j), 0 <= j < {width}"
            )
        if self.output_index is not None and self.output_index >= width:
            raise ValueError(
                f"{name}(output={self.output_index}) but the model gives {width} output(s) per "
                f"example: choose 0 <= output < {width}"
            )
        if targets.dim() == 2 and targets.shape[1] not in (1, width):
            raise ValueError(
                f"the targets have {targets.shape[1]} columns but the model gives {width} "
                "output(s) per example: pass (n,) targets of the attributed output or one "
                "column per output"
            )
        return inputs, targets

    def _width(self, model: nn.Module, inputs: Any) -> int:
        predicted = run_on_first_example(model, call_on_inputs, inputs, type(self).__name__)
        if not torch.is_tensor(predicted) or predicted.dim() not in (1, 2):
            shape = tuple(predicted.shape) if torch.is_tensor(predicted) else None
            got = shape if shape is not None else f"a {type(predicted).__name__}"
            raise ValueError(
                f"the model's output on one example is {got}: {type(self).__name__} attributes "
                "(n,) or (n, d) predictions" + ("" if shape is not None else WRAP_THE_MODEL)
            )
        return 1 if predicted.dim() == 1 else predicted.shape[1]
