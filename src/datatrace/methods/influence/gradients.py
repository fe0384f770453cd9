"""Per-example gradients of the training loss and of a measurement, in a curvature layout.

The training loss of an example is the loss whose ``−∂loss/∂f`` is the task's out-to-loss weight
``Q``, so its gradient is ``∇_θ loss = −Q·∇_θ f`` (exact when the loss is a function of the
output ``f``, as classification's cross-entropy ``softplus(−margin)`` is). Two measurements of a
target are offered: its loss (kronfluence's default; gradient ``−Q·∇f``) or its output
(gradient ``∇f``).

Two ways to compute them (``gradients=``): ``"hooks"`` forms each Kronecker layer's
``G_i = Σ_t g_it a_itᵀ`` from one batched forward and backward with hooks (:mod:`.hooks`), and
differentiates only the other parameters with ``vmap``; ``"vmap"`` differentiates every
parameter with ``torch.func`` ``vmap(grad)``. Each layer is checked once against ``vmap``
(:func:`hooked_layers`) before its hooks are trusted.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from datatrace.data import Examples, batch_size_of, batch_to, map_tensors
from datatrace.grads.per_example import PerExampleGradients
from datatrace.methods.influence.hooks import LayerCall, LayerHooks, summed_loss
from datatrace.methods.influence.layers import Layout, layer_matrix
from datatrace.tasks.base import Task

if TYPE_CHECKING:
    from datatrace.methods.influence.fisher import SampledLabels

# What a target's gradient is taken of.
MEASUREMENTS = ("loss", "output")
# How the per-example gradients of the Kronecker layers are computed.
GRADIENTS = ("hooks", "vmap")
# Examples on which each layer's hooks are checked against vmap: a missed use of a weight
# shows on any example, and vmap on a handful costs little.
CHECK_EXAMPLES = 4
# Factors, eigenbases and gradients in an eigenbasis are in this precision.
FACTOR_DTYPE = torch.float64


class HookWarning(UserWarning):
    """Kronecker layers whose hooked gradients disagreed with per-example gradients: their
    gradients are computed with vmap instead (slower, same numbers)."""


class LayerGradients:
    """One Kronecker layer's per-example gradients of a batch: from the factors of its calls
    (hooks), or as matrices (vmap).

    Args:
        weight: the layer's weight (its dtype and device are those of a zero gradient).
        n: examples in the batch.
        out_dim, in_dim: the layer's block shape.
        calls: the calls' inputs and output gradients, or ``None``.
        matrices: ``(n, out, in)`` gradients, or ``None`` (then ``calls`` is used).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        n: int,
        out_dim: int,
        in_dim: int,
        calls: Sequence[LayerCall] | None = None,
        matrices: torch.Tensor | None = None,
    ):
        self.weight, self.n, self.out_dim, self.in_dim = weight, n, out_dim, in_dim
        self.calls = list(calls or [])
        self._matrices = matrices

    def matrices(self) -> torch.Tensor:
        """``(n, out, in)`` ``G_i = Σ_t g_it a_itᵀ`` (in the activations' dtype)."""
        if self._matrices is None:
            out = None
            for call in self.calls:
                product = call.output_gradients.transpose(1, 2) @ call.inputs
                out = product if out is None else out + product
            if out is None:  # no call reached the loss: a zero gradient
                out = self.weight.new_zeros(self.n, self.out_dim, self.in_dim)
            self._matrices = out
        return self._matrices

    def rotated(self, q_a: torch.Tensor, q_s: torch.Tensor) -> torch.Tensor:
        """``(n, out, in)`` ``Q_Sᵀ G_i Q_A`` in float64: from the rotated factors,
        ``Σ_t (Q_Sᵀ g_it)(Q_Aᵀ a_it)ᵀ``, or by rotating ``G_i``, whichever costs less."""
        out_dim, in_dim = self.out_dim, self.in_dim
        positions = sum(call.inputs.shape[1] for call in self.calls)
        by_factors = positions * (out_dim**2 + in_dim**2 + out_dim * in_dim)
        by_matrices = out_dim * in_dim * (out_dim + in_dim)
        if self._matrices is None:
            by_matrices += positions * out_dim * in_dim
        if not self.calls or by_matrices < by_factors:
            return q_s.T @ self.matrices().to(FACTOR_DTYPE) @ q_a
        out = torch.zeros(self.n, out_dim, in_dim, dtype=FACTOR_DTYPE, device=q_a.device)
        for call in self.calls:
            rotated_outputs = call.output_gradients.to(FACTOR_DTYPE) @ q_s
            rotated_inputs = call.inputs.to(FACTOR_DTYPE) @ q_a
            out += rotated_outputs.transpose(1, 2) @ rotated_inputs
        return out


def rotation_by_factors_is_cheaper(out_dim: int, in_dim: int, positions: int) -> bool:
    """Whether rotating a layer's factors, ``T·(out² + in²)`` per example, costs no more than
    rotating its ``out × in`` gradient, ``out·in·(out + in)``: true for one position."""
    return positions * (out_dim**2 + in_dim**2) <= out_dim * in_dim * (out_dim + in_dim)


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
        hooked: indices of the layout's layers whose gradients come from hooks (the checked
            ones, :func:`hooked_layers`); every other parameter is differentiated with vmap.
        bases: per layer, ``(Q_A, Q_S)`` to return its gradients in that eigenbasis,
            ``Q_Sᵀ G Q_A``, or ``None`` for ``G`` itself (:meth:`gradients`).
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
        hooked: Sequence[int] = (),
        bases: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    ):
        self.model, self.task, self.layout, self.device = model, task, layout, device
        self.sampled_labels, self.checkpoint = sampled_labels, checkpoint
        self.hooked = sorted(hooked)
        self.bases = [
            None if basis is None else tuple(factor.to(device) for factor in basis)
            for basis in (bases if bases is not None else [None] * len(layout.layers))
        ]
        self._gradients = PerExampleGradients(model, task, param_names)
        self._hooks = LayerHooks(model, layout) if self.hooked else None
        self._vmap: dict[tuple[str, ...], PerExampleGradients] = {}

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
        each example of a prepared batch, under the parameters and buffers ``state``; each
        layer with a basis in ``bases`` in that basis."""
        return self.gradients_and_out_to_loss(state, batch, measurement)[0]

    def gradients_and_out_to_loss(
        self, state: Mapping[str, torch.Tensor], batch: Any, measurement: str = "loss"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`gradients` and the out-to-loss weights ``Q`` ``(batch_size,)`` of the batch
        (``None`` for ``measurement="output"``, which does not compute them)."""
        layers, fallback, out_to_loss = self.blocks(state, batch, measurement)
        parts = []
        for gradients, basis in zip(layers, self.bases):
            if basis is None:
                parts.append(gradients.matrices().flatten(1))
            else:
                parts.append(gradients.rotated(*basis).flatten(1))
        parts += fallback
        if any(basis is not None for basis in self.bases):
            parts = [part.to(FACTOR_DTYPE) for part in parts]
        return torch.cat(parts, dim=1), out_to_loss

    def blocks(
        self, state: Mapping[str, torch.Tensor], batch: Any, measurement: str = "loss"
    ) -> tuple[list[LayerGradients], list[torch.Tensor], torch.Tensor | None]:
        """The gradients of a prepared batch block by block: per Kronecker layer its
        :class:`LayerGradients`, per fallback parameter ``(batch_size, size)``, and ``Q``
        (``None`` for ``measurement="output"``)."""
        n = batch_size_of(batch)
        calls, out_to_loss, unbatched = None, None, set()
        if self._hooks is not None:
            loss = summed_loss(self.task, measurement)
            calls, out_to_loss, unbatched = self._hooks.run(state, batch, loss, self.hooked)
        from_hooks = {index for index in self.hooked if index not in unbatched}
        names = [
            name
            for index, layer in enumerate(self.layout.layers)
            if index not in from_hooks
            for name in (layer.weight, layer.bias)
            if name is not None
        ] + list(self.layout.fallback)
        if measurement == "loss" and out_to_loss is None:
            out_to_loss = self._gradients.out_to_loss(state, batch)
        grads = self._vmapped(names).gradients(state, batch) if names else {}
        if measurement == "loss":
            grads = {name: _times(-out_to_loss, grad) for name, grad in grads.items()}
        layers = []
        for index, layer in enumerate(self.layout.layers):
            weight = state[layer.weight]
            if index in from_hooks:
                gradients = LayerGradients(weight, n, layer.out_dim, layer.in_dim, calls[index])
            else:
                matrices = layer_matrix(layer, grads)
                gradients = LayerGradients(
                    weight, n, layer.out_dim, layer.in_dim, matrices=matrices
                )
            layers.append(gradients)
        fallback = [grads[name].flatten(1) for name in self.layout.fallback]
        return layers, fallback, out_to_loss

    def _vmapped(self, names: list[str]) -> PerExampleGradients:
        key = tuple(names)
        if key not in self._vmap:
            self._vmap[key] = PerExampleGradients(self.model, self.task, names)
        return self._vmap[key]


def _times(out_to_loss: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Each example's gradient ``(n, *shape)`` times its weight ``(n,)``."""
    weights = out_to_loss.to(grad.dtype)
    return weights.reshape(-1, *([1] * (grad.dim() - 1))) * grad


def hooked_layers(
    model: nn.Module,
    task: Task,
    layout: Layout,
    param_names: list[str],
    state: Mapping[str, torch.Tensor],
    batch: Any,
) -> tuple[list[int], dict[str, str], dict[int, int]]:
    """Which Kronecker layers' hooked gradients equal vmap's, on the first
    :data:`CHECK_EXAMPLES` examples of a prepared batch.

    A layer passes when the hooks' gradients of the output differ from vmap's by at most
    ``√eps`` of their norm (float32: 3·10⁻⁴; a missed use of the weight is off by far more).

    Returns:
        ``(passed, failed, positions)``: indices of the layers that passed, ``{name: why}`` for
        the others, and per passed layer its positions per example in the batch.
    """
    if not layout.layers:
        return [], {}, {}
    few = map_tensors(lambda tensor: tensor[:CHECK_EXAMPLES], batch)
    hooks = LayerHooks(model, layout)
    failed = {layout.layers[index].name: why for index, why in hooks.unhookable.items()}
    candidates = [i for i in range(len(layout.layers)) if i not in hooks.unhookable]
    calls, _, unbatched = hooks.run(state, few, summed_loss(task, "output"), candidates)
    names = [n for layer in layout.layers for n in (layer.weight, layer.bias) if n is not None]
    reference = PerExampleGradients(model, task, names).gradients(state, few)
    passed, positions = [], {}
    for index in candidates:
        layer = layout.layers[index]
        if index in unbatched:
            failed[layer.name] = "inputs not batched along the first dimension"
            continue
        expected = layer_matrix(layer, reference)
        hooked = LayerGradients(
            expected, expected.shape[0], layer.out_dim, layer.in_dim, calls[index]
        )
        error = torch.linalg.vector_norm(hooked.matrices() - expected).item()
        scale = torch.linalg.vector_norm(expected).item()
        if error <= math.sqrt(torch.finfo(expected.dtype).eps) * scale:
            passed.append(index)
            positions[index] = sum(call.inputs.shape[1] for call in calls[index])
        else:
            failed[layer.name] = (
                f"relative difference {error / scale:.2g}"
                if scale
                else (f"gradients of norm {error:.2g} where vmap's are zero")
            )
    if failed:
        listed = "; ".join(f"{name} ({why})" for name, why in failed.items())
        warnings.warn(
            f"the hooked gradients of {listed} disagree with per-example gradients: their "
            "weights are used outside their module's forward (e.g. through a functional call), "
            "examples interact in the forward pass, or the inputs are not batched along the "
            "first dimension. These layers' gradients are computed with vmap: slower, same "
            "numbers.",
            HookWarning,
            stacklevel=4,
        )
    return passed, failed, positions
