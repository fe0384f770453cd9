"""Per-example gradients of a task's output, with ``torch.func``."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from datatrace.data import batch_size_of, map_tensors
from datatrace.grads.checkpoints import uncompiled
from datatrace.tasks.base import Task


class VmapFallbackWarning(UserWarning):
    """``vmap`` could not batch a model's per-example gradients; they are computed one example
    at a time instead (the same numbers, slower)."""


# Characters of vmap's error quoted in the warning: enough for the advice of call_model's errors
# (e.g. to load a transformers model with attn_implementation='eager', which vmap can batch).
MAX_REASON_CHARS = 600
# Models whose per-example gradients vmap could not batch (and a loop could): every
# PerExampleGradients of them loops from then on, without trying vmap again.
_ONE_AT_A_TIME: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class _Bound(nn.Module):
    """Calls ``fn(model, batch)`` as a module, so that ``functional_call`` can swap the
    parameters of ``model`` for the whole task computation (not only ``model.forward``)."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self._fn(self.model, batch)


def module_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as ``functional_call`` takes it for ``model``: without the second names of tied
    parameters (a language model's ``lm_head.weight`` tied to its input embeddings), which
    ``functional_call`` fills from the first name; a state dict holds both, as separate tensors
    once loaded, and ``functional_call`` refuses two values for one tied parameter."""
    canonical = {name for name, _ in model.named_parameters()}
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - canonical
    return {name: tensor for name, tensor in state.items() if name not in aliases}


def task_for_checkpoint(
    model: nn.Module, task: Task, state: Mapping[str, torch.Tensor], checkpoint: int
) -> Task:
    """``task.for_checkpoint(model, checkpoint)`` with the parameters and buffers of ``state`` in
    place of the model's own (in eval mode, without gradients); the model is not modified."""
    if type(task).for_checkpoint is Task.for_checkpoint:
        return task
    bound = _Bound(model, task.for_checkpoint)
    params = {"model." + name: tensor for name, tensor in module_state(model, state).items()}
    with torch.no_grad(), _eval_mode(model):
        return functional_call(bound, params, (checkpoint,))


class PerExampleGradients:
    """Gradients of ``task.output`` for each example of a batch, one checkpoint at a time.

    Only the parameters named in ``param_names`` are differentiated; every other parameter and
    buffer enters as a constant, so no memory or compute is spent on its gradient.

    Args:
        model: the module; its own parameters are never modified.
        task: defines the output and out-to-loss weight.
        param_names: names (as in ``model.named_parameters()``) of the parameters to differentiate.
    """

    def __init__(self, model: nn.Module, task: Task, param_names: list[str]):
        model = uncompiled(model)
        self.model = model
        self.task = task
        self.param_names = list(param_names)
        self._output = _Bound(model, task.output)
        self._out_to_loss = _Bound(model, task.out_to_loss)

    @property
    def one_at_a_time(self) -> bool:
        """Whether vmap failed on this model where one example at a time worked (then every
        batch is computed one example at a time)."""
        return self.model in _ONE_AT_A_TIME

    def _split(self, state: Mapping[str, torch.Tensor]):
        state = module_state(self.model, state)
        selected = {name: state[name].detach() for name in self.param_names}
        frozen = {
            "model." + name: tensor.detach()
            for name, tensor in state.items()
            if name not in selected
        }
        return selected, frozen

    def gradients(self, state: Mapping[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:
        """Per-example gradients of the output.

        Args:
            state: every parameter and buffer of the model, by name (a state dict).
            batch: a batch of examples as the task reads it; every tensor has the examples
                along its first dimension.

        Returns:
            ``{name: (batch_size, *param.shape)}`` for each selected parameter.

        ``vmap`` has no batching rule for some modules (``nn.GRU`` and ``nn.RNN``, ``nn.LSTM`` in
        float64: an in-place write of a batched value into the unbatched initial state) and
        refuses data-dependent control flow. Where it fails and one example at a time works,
        it warns (:class:`VmapFallbackWarning`) and computes every later batch of this model
        one example at a time too; where one example fails as well, that error is raised (the
        model's own, not vmap's).
        """
        selected, frozen = self._split(state)

        def output_of_one(selected_params, example):
            one = map_tensors(lambda tensor: tensor.unsqueeze(0), example)
            params = {**frozen, **{"model." + k: v for k, v in selected_params.items()}}
            return functional_call(self._output, params, (one,)).sum()

        gradient_of_one = grad(output_of_one)
        with _eval_mode(self.model):
            if self.one_at_a_time:
                return self._one_at_a_time(selected, frozen, batch)
            try:
                return vmap(gradient_of_one, in_dims=(None, 0))(selected, batch)
            except torch.cuda.OutOfMemoryError:  # (torch.OutOfMemoryError since 2.5)
                raise
            except (RuntimeError, NotImplementedError) as error:
                result = self._one_at_a_time(selected, frozen, batch)
                _ONE_AT_A_TIME.add(self.model)
                reason = " ".join(str(error).split())
                warnings.warn(
                    f"per-example gradients by vmap failed for this model ({type(error).__name__}: "
                    f"{reason[:MAX_REASON_CHARS]}); computing them one example at a time from now "
                    "on (plain autograd): the same numbers, slower. vmap has no batching rule for "
                    "some modules (nn.GRU, nn.RNN; nn.LSTM in float64), refuses data-dependent "
                    "control flow, autograd.Functions without setup_context and in-place updates "
                    "of parameters in the forward pass (nn.Embedding with max_norm).",
                    VmapFallbackWarning,
                    stacklevel=2,
                )
                return result

    def _one_at_a_time(
        self, selected: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], batch: Any
    ) -> dict[str, torch.Tensor]:
        """What the vmap of :meth:`gradients` computes, by a loop of plain autograd over the
        examples (no ``torch.func`` transform, so whatever trains also runs here); a parameter
        the output does not reach gets a zero gradient, as ``torch.func.grad`` gives."""
        per_example = []
        for i in range(batch_size_of(batch)):
            one = map_tensors(lambda tensor, i=i: tensor[i : i + 1], batch)
            leaves = {
                name: tensor.detach().requires_grad_(True) for name, tensor in selected.items()
            }
            params = {**frozen, **{"model." + name: leaf for name, leaf in leaves.items()}}
            with torch.enable_grad():
                output = functional_call(self._output, params, (one,)).sum()
            if output.requires_grad:
                grads = torch.autograd.grad(output, list(leaves.values()), allow_unused=True)
            else:
                grads = [None] * len(leaves)
            per_example.append(
                {
                    name: torch.zeros_like(leaf) if g is None else g
                    for (name, leaf), g in zip(leaves.items(), grads)
                }
            )
        return {name: torch.stack([grads[name] for grads in per_example]) for name in selected}

    @torch.no_grad()
    def outputs(self, state: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """``task.output`` of each example, ``(batch_size,)``."""
        return self._evaluate(self._output, state, batch)

    @torch.no_grad()
    def out_to_loss(self, state: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """``task.out_to_loss`` of each example, ``(batch_size,)``."""
        return self._evaluate(self._out_to_loss, state, batch)

    def _evaluate(self, bound: nn.Module, state: Mapping[str, torch.Tensor], batch: Any):
        params = {
            "model." + name: tensor for name, tensor in module_state(self.model, state).items()
        }
        with _eval_mode(self.model):
            return functional_call(bound, params, (batch,))


class _eval_mode:
    """Puts a module in eval mode for the duration and restores each submodule's mode after:
    attribution differentiates the deterministic function (no dropout, batch-norm statistics
    from the checkpoint), which is also what ``vmap`` requires."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()

    def __exit__(self, *exc):
        for module, training in self.modes:
            module.training = training
