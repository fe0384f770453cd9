"""The inputs and output gradients of every Kronecker layer, from one batched forward and
backward with hooks: what the factors are built from, and the per-example gradients without
``vmap``.

For a Kronecker layer (:mod:`.layers`) the gradient of example ``i`` is
``G_i = Σ_t g_it a_itᵀ``, summed over the positions of every call of its weight. A forward hook on
each module that holds the weight records the call's input ``a`` and output; one backward pass of
the batch's summed loss to those outputs gives ``g``. In eval mode examples do not interact, so
the gradient at example ``i``'s positions is that of its own loss.

A weight may be held by several modules of its kind (tied) or called several times: every call
adds its positions. The bias column of ``G`` is the layer's own bias: a call of a module that
applies another bias (or none) gets 0 in the bias coordinate of ``a`` instead of 1.

The hooks see module calls only. A weight also used elsewhere (a functional call in a custom
forward), examples that interact in the forward pass, or inputs not batched along the first
dimension give other gradients than ``vmap``'s; :func:`~.gradients.hooked_layers` checks each
layer against ``vmap`` on a few examples before any is trusted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
from torch import nn

from datatrace.data import batch_size_of
from datatrace.grads.factorized import BATCHED_DIMS
from datatrace.grads.layer_plan import layer_kind
from datatrace.grads.per_example import _Bound, _eval_mode, module_state
from datatrace.methods.influence.layers import (
    KroneckerLayer,
    Layout,
    layer_inputs,
    layer_output_gradients,
)
from datatrace.tasks.base import Task, fuses_out_to_loss

# ``loss(model, batch) -> (summed loss, anything)``: what the backward pass differentiates.
LossFunction = Callable[[nn.Module, Any], tuple[torch.Tensor, Any]]


@dataclass
class LayerCall:
    """One call of a module holding a Kronecker layer's weight, after the backward pass.

    Attributes:
        inputs: ``(n, T, in)`` the inputs ``a_t`` of the call's ``T`` positions (with the bias
            coordinate when the layer has a bias).
        output_gradients: ``(n, T, out)`` the loss's gradients ``g_t`` at its outputs.
    """

    inputs: torch.Tensor
    output_gradients: torch.Tensor


def summed_loss(task: Task, measurement: str) -> LossFunction:
    """The summed loss of a batch whose gradient at example ``i`` is ``−Q_i ∇f_i``
    (``measurement="loss"``: ``−Σ Q_i f_i`` with ``Q`` held constant, and ``Q`` returned) or
    ``∇f_i`` (``"output"``: ``Σ f_i``, and ``None``)."""

    def loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]:
        if measurement == "output":
            return task.output(model, batch).sum(), None
        if fuses_out_to_loss(task):
            output, out_to_loss = task.output_and_out_to_loss(model, batch)
        else:  # e.g. a target task that redefines both of a fusing task's methods
            output = task.output(model, batch)
            with torch.no_grad():
                out_to_loss = task.out_to_loss(model, batch)
        out_to_loss = out_to_loss.detach()
        return -(out_to_loss.to(output.dtype) * output).sum(), out_to_loss

    return loss


class LayerHooks:
    """Hooks on the modules of a layout's Kronecker layers.

    Args:
        model: the module (never modified; hooks are removed after each pass).
        layout: the blocks.

    Attributes:
        unhookable: ``{layer index: why}`` for the layers whose weight is also held by a module
            of another kind (their calls cannot all be factored).
    """

    def __init__(self, model: nn.Module, layout: Layout):
        self.model, self.layout = model, layout
        modules = dict(model.named_modules())
        self.holders: list[list[tuple[nn.Module, bool]]] = []
        self.unhookable: dict[int, str] = {}
        for index, layer in enumerate(layout.layers):
            owner = modules[layer.name]
            holders = [m for m in model.modules() if getattr(m, "weight", None) is owner.weight]
            others = [m for m in holders if layer_kind(m) != layer.kind]
            if others:
                self.unhookable[index] = f"its weight is also used by a {type(others[0]).__name__}"
            # A holder applies the layer's bias column if it applies the layer's own bias. Only
            # holders of the layer's kind are hooked: another kind's calls (an embedding tied to
            # a linear head) are no inputs of this layer's map, and its gradients go to vmap.
            self.holders.append(
                [
                    (m, layer.bias is not None and m.bias is owner.bias)
                    for m in holders
                    if layer_kind(m) == layer.kind
                ]
            )
        # modules whose output a later in-place operation changed: their outputs are copied
        self._copied: set[int] = set()

    def run(
        self,
        state: Mapping[str, torch.Tensor],
        batch: Any,
        loss: LossFunction,
        layers: Sequence[int],
    ) -> tuple[list[list[LayerCall]], Any, set[int]]:
        """One forward and backward pass of ``loss`` over a prepared batch.

        Args:
            state: every parameter and buffer of the checkpoint, by name.
            batch: the examples.
            loss: what is differentiated (:func:`summed_loss`).
            layers: indices of the layers to hook.

        Returns:
            ``(calls, extra, unbatched)``: per layer of the layout the calls that reached the
            loss (empty for a layer not hooked), what ``loss`` returned besides the sum, and the
            indices of the layers with a call whose input was not batched along the first
            dimension (their calls are kept, but do not map to examples).
        """
        n = batch_size_of(batch)
        seen: list[_Seen] = []
        unbatched: set[int] = set()

        def hook_for(index: int, applies_bias: bool):
            kind = self.layout.layers[index].kind

            def hook(module, inputs, output):
                x = inputs[0] if inputs else None
                if not torch.is_tensor(x) or x.dim() < BATCHED_DIMS[kind]:
                    unbatched.add(index)
                    return None
                if x.shape[0] != n:
                    unbatched.add(index)
                seen.append(_Seen(index, module, applies_bias, x, output, output._version))
                # the rest of the forward gets a copy, so that the recorded output stays intact
                return output.clone() if id(module) in self._copied else None

            return hook

        state = module_state(self.model, state)
        params = {"model." + name: tensor.detach() for name, tensor in state.items()}
        for index in layers:
            # the outputs must require a gradient; the weights' own gradients are never computed
            params["model." + self.layout.layers[index].weight].requires_grad_(True)
        handles = [
            module.register_forward_hook(hook_for(index, applies_bias))
            for index in layers
            for module, applies_bias in self.holders[index]
        ]
        try:
            with _eval_mode(self.model), torch.enable_grad():
                total, extra = torch.func.functional_call(
                    _Bound(self.model, loss), params, (batch,)
                )
        finally:
            for handle in handles:
                handle.remove()
        changed = [call for call in seen if call.output._version != call.version]
        if any(id(call.module) not in self._copied for call in changed):
            # a later in-place operation (ReLU(inplace=True)) changed a hooked output, whose
            # gradient would then be the changed tensor's: run again with those outputs copied
            self._copied |= {id(call.module) for call in changed}
            return self.run(state, batch, loss, layers)
        unbatched |= {call.index for call in changed}  # changed even so: leave them to vmap
        live = [call for call in seen if call.output.requires_grad]
        gradients = [None] * len(live)
        if live and total.requires_grad:
            outputs = [call.output for call in live]
            gradients = torch.autograd.grad(total, outputs, allow_unused=True)
        calls: list[list[LayerCall]] = [[] for _ in self.layout.layers]
        for call, gradient in zip(live, gradients):
            if gradient is None:  # this call does not reach the loss
                continue
            layer = self.layout.layers[call.index]
            calls[call.index].append(
                LayerCall(
                    _call_inputs(layer, call.module, call.applies_bias, call.inputs.detach()),
                    layer_output_gradients(layer, gradient.detach()),
                )
            )
        return calls, extra, unbatched


class _Seen(NamedTuple):
    """A call as the forward hook saw it."""

    index: int  # the layer's
    module: nn.Module
    applies_bias: bool
    inputs: torch.Tensor
    output: torch.Tensor
    version: int  # the output's version counter then


def _call_inputs(
    layer: KroneckerLayer, module: nn.Module, applies_bias: bool, inputs: torch.Tensor
) -> torch.Tensor:
    """``a_t`` of one call, ``(n, T, in)``; the bias coordinate 1 only if the calling module
    applies the layer's bias."""
    if layer.bias is None or applies_bias:
        return layer_inputs(layer, module, inputs)
    vectors = layer_inputs(replace(layer, bias=None), module, inputs)
    return torch.cat([vectors, torch.zeros_like(vectors[..., :1])], dim=-1)
