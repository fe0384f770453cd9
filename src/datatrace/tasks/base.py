"""The Task: what output of a model is attributed, and how the loss depends on it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class Task(ABC):
    """What a model computes on a batch that attribution explains.

    A task defines two quantities, both per example:

    - ``output(model, batch)``: the model output function ``f(z; θ)`` whose gradients are
      attributed, shape ``(batch_size,)``. It must be differentiable in the model's parameters
      and work on a batch of one example (per-example gradients are taken under ``torch.vmap``).
    - ``out_to_loss(model, batch)``: the weight ``Q(z) = −∂loss/∂f`` that turns a change of the
      output into a change of the training loss, shape ``(batch_size,)``.

    ``model`` is the user's module with the checkpoint's parameters in place; a task may call any
    of its methods. Tasks hold settings only (no state that changes during a run), so one task
    object can be shared by several estimators and processes.
    """

    @abstractmethod
    def output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The attributed output ``f`` of each example of ``batch``, shape ``(batch_size,)``."""

    @abstractmethod
    def out_to_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The out-to-loss weight ``Q`` of each example of ``batch``, shape ``(batch_size,)``."""

    def for_checkpoint(self, model: nn.Module, checkpoint: int) -> Task:
        """The task to use while featurizing under checkpoint number ``checkpoint``.

        Called once per checkpoint (in eval mode, without gradients) with that checkpoint's
        parameters in place in ``model``, before any example is featurized under it. A task whose
        output depends on quantities computed from the model itself (e.g. CLIP's pool of negative
        embeddings) returns a new task holding them; the task it is called on is left unchanged,
        so one task object still serves every checkpoint. The default returns ``self``.
        """
        return self

    def config(self) -> dict[str, Any]:
        """Settings that identify this task in a store's provenance (JSON-serialisable)."""
        return {"name": type(self).__name__}
