"""The Task: what output of a model is attributed, and how the loss depends on it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
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

    def output_and_out_to_loss(
        self, model: nn.Module, batch: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, out_to_loss)`` of ``batch`` from one forward pass, where a task can share
        it; ``out_to_loss`` detached. Featurizing through layer hooks (the factorised
        projections) calls it with gradients enabled and differentiates ``output`` only, so
        that ``Q`` costs no second forward pass. Optional: a task overrides it together with
        ``output`` and ``out_to_loss`` (:func:`fuses_out_to_loss`), and it must return what
        those two return. The default calls both."""
        return self.output(model, batch), self.out_to_loss(model, batch).detach()

    def check_batch(self, model: nn.Module, batch: Any) -> Any:
        """Check a batch before it is featurized; return it as the task reads it.

        Per-example gradients run under ``torch.vmap``, where no code can look at a tensor's
        values: a label out of range would surface there as an indexing error deep inside torch.
        This hook runs outside ``vmap`` and turns bad input into an error that says what is wrong
        and how to fix it.

        Contract:

        - Called outside ``vmap`` on a whole batch (examples along dim 0, on whatever device the
          data is), with the user's module as ``model`` (its own parameters: checkpoints share
          its architecture, so shapes and dtypes are those of every checkpoint). The estimators
          call it on the first batch of the training set and of the targets before anything is
          computed or stored; featurization calls it on every batch before featurizing it.
        - Returns the batch to featurize instead of the given one: possibly converted (floating
          inputs cast to the model's parameter dtype, noted once by an
          :class:`~datatrace.tasks.InputDtypeWarning`; labels that are floating whole numbers as
          integers), never modified in place. Calling it again on its result returns it as is.
        - Raises ``ValueError`` (bad values or shapes) or ``TypeError`` (bad types) with a
          message that names the problem and the fix. Never modifies the model.
        - Cheap enough for every batch: shapes, dtypes and signs are checked without running the
          model; a task whose labels index the model's output (classes, vocabulary) also runs
          one forward pass of the batch's first example, in eval mode, without gradients, to
          check them against the output's size (and that the inputs fit the model). That forward
          pass runs the model's hooks like any other: a caller that hooks the model calls
          ``check_batch`` before registering its hooks, or outside the region they observe.

        The default returns ``batch`` unchanged.
        """
        return batch

    def for_checkpoint(self, model: nn.Module, checkpoint: int) -> Task:
        """The task to use while featurizing under checkpoint number ``checkpoint``.

        Called once per checkpoint (in eval mode, without gradients) with that checkpoint's
        parameters in place in ``model``, before any example is featurized under it. A task whose
        output depends on quantities computed from the model itself (e.g. CLIP's pool of negative
        embeddings) returns a new task holding them; the task it is called on is left unchanged,
        so one task object still serves every checkpoint. The default returns ``self``.
        """
        return self

    def curvature(self, out_to_loss: np.ndarray) -> np.ndarray | None:
        """The training loss's second derivative in the output, ``∂²loss/∂f²`` of each training
        example, from its ``Q``: the Gauss–Newton weights ``R`` of TRAK's kernel ``ΦᵀRΦ``
        (``kernel_weights="auto"``, docs/trak.md "The kernel's weights"). ``None`` (the default)
        where the task does not define one, or where it is 1 (a squared error): the kernel is
        then ``ΦᵀΦ``."""
        return None

    def config(self) -> dict[str, Any]:
        """Settings that identify this task in a store's provenance (JSON-serialisable)."""
        return {"name": type(self).__name__}


def _defining_class(cls: type, name: str) -> type:
    return next(base for base in cls.__mro__ if name in base.__dict__)


def fuses_out_to_loss(task: Task) -> bool:
    """Whether ``task.output_and_out_to_loss`` computes both from one forward pass: it is
    overridden in the class that defines ``output`` and ``out_to_loss`` or in a subclass of it
    (a subclass that redefines either of those without it falls back to two passes)."""
    fused = _defining_class(type(task), "output_and_out_to_loss")
    if fused is Task:
        return False
    return all(
        issubclass(fused, _defining_class(type(task), name)) for name in ("output", "out_to_loss")
    )
