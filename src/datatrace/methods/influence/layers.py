"""Which parameters get a Kronecker-factored curvature block, and the per-layer views of inputs
and gradients that the factors are built from.

A *Kronecker layer* is an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` (plain forward, one
group, zero padding) whose weight is selected: its weight gradient for one example is
``G = Σ_t g_t a_tᵀ`` over positions ``t`` (tokens, pixels of the unfolded convolution), with
``a_t`` the layer's input at ``t`` (a 1 appended when the bias is selected too: the bias is the
last column of ``G``) and ``g_t`` the gradient of the loss with respect to the layer's output at
``t``. Every other selected parameter (norm layers, embeddings, custom modules, a bias whose
weight is not selected) is a *fallback block* with a diagonal curvature.

A layout lists the blocks in a fixed order; a batch's gradients in the layout are a
``(batch_size, p)`` matrix: each Kronecker layer's ``G`` flattened row-major
(``out × (in + 1)``), then each fallback parameter flattened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from datatrace.grads.layer_plan import layer_kind

# The layer kinds that get a Kronecker block (layer_kind's names).
KRONECKER_KINDS = ("linear", "conv1d", "conv2d")


@dataclass(frozen=True)
class KroneckerLayer:
    """One Kronecker block: the module, its selected parameters and its factor sizes.

    Attributes:
        name: the module's name in ``model.named_modules()``.
        kind: ``"linear"``, ``"conv1d"`` or ``"conv2d"``.
        weight: the weight's parameter name.
        bias: the bias's parameter name, or ``None`` (no bias, or not selected).
        in_dim: rows of ``A``: input features (``C·kernel`` for a convolution), plus 1 with a bias.
        out_dim: rows of ``S``: output features (channels).
    """

    name: str
    kind: str
    weight: str
    bias: str | None
    in_dim: int
    out_dim: int

    @property
    def size(self) -> int:
        return self.in_dim * self.out_dim


@dataclass(frozen=True)
class Layout:
    """The curvature blocks of a parameter selection, in scoring order.

    Attributes:
        layers: the Kronecker layers.
        fallback: names of the parameters with a diagonal block, in the model's order.
        fallback_shapes: their shapes.
    """

    layers: tuple[KroneckerLayer, ...]
    fallback: tuple[str, ...]
    fallback_shapes: tuple[tuple[int, ...], ...]

    @property
    def block_sizes(self) -> list[int]:
        """Coordinates of each block: the layers', then the fallback parameters'."""
        sizes = [layer.size for layer in self.layers]
        return sizes + [int(torch.Size(shape).numel()) for shape in self.fallback_shapes]

    @property
    def dim(self) -> int:
        return sum(self.block_sizes)

    def config(self) -> dict:
        """What identifies the layout in a store's provenance."""
        return {
            "layers": [[layer.name, layer.in_dim, layer.out_dim] for layer in self.layers],
            "fallback": list(self.fallback),
        }

    def flatten(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-example gradients ``{name: (n, *shape)}`` as one ``(n, p)`` matrix in the layout."""
        parts = [layer_matrix(layer, grads).flatten(1) for layer in self.layers]
        parts += [grads[name].flatten(1) for name in self.fallback]
        return torch.cat(parts, dim=1)

    def split(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        """A ``(n, p)`` matrix in the layout cut into its blocks: ``(n, out, in)`` for each
        layer, then ``(n, size)`` for each fallback parameter."""
        pieces = list(torch.split(matrix, self.block_sizes, dim=1))
        for index, layer in enumerate(self.layers):
            pieces[index] = pieces[index].reshape(-1, layer.out_dim, layer.in_dim)
        return pieces


def kronecker_layout(model: nn.Module, param_names: Sequence[str]) -> Layout:
    """The layout of the selected parameters ``param_names`` of ``model``.

    Raises:
        ValueError: a name is not a parameter of the model.
    """
    named = dict(model.named_parameters())
    unknown = [name for name in param_names if name not in named]
    if unknown:
        raise ValueError(f"{unknown} are not parameters of the model")
    selected = set(param_names)
    layers, covered = [], set()
    for module_name, module in model.named_modules():
        kind = layer_kind(module)
        prefix = f"{module_name}." if module_name else ""
        weight = prefix + "weight"
        if kind not in KRONECKER_KINDS or weight not in selected or weight in covered:
            continue
        bias = prefix + "bias" if module.bias is not None and prefix + "bias" in selected else None
        out_dim = module.weight.shape[0]
        in_dim = module.weight[0].numel() + (bias is not None)
        layers.append(KroneckerLayer(module_name, kind, weight, bias, in_dim, out_dim))
        covered |= {weight} | ({bias} if bias else set())
    fallback = tuple(name for name in named if name in selected and name not in covered)
    return Layout(tuple(layers), fallback, tuple(tuple(named[n].shape) for n in fallback))


def layer_matrix(layer: KroneckerLayer, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The per-example weight gradients of ``layer`` as ``(n, out, in)`` matrices ``G``, the
    bias's gradient as the last column when the layer has one."""
    weight = grads[layer.weight]
    matrix = weight.reshape(weight.shape[0], layer.out_dim, -1)
    if layer.bias is not None:
        matrix = torch.cat([matrix, grads[layer.bias].unsqueeze(-1)], dim=-1)
    return matrix


def _padding(module: nn.Module, spatial: int) -> tuple[int, ...]:
    padding = module.padding
    if isinstance(padding, str):  # "valid" ("same" is not a Kronecker layer)
        return (0,) * spatial
    return tuple(padding)


def layer_inputs(layer: KroneckerLayer, module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The inputs ``a_t`` of every position, ``(n, positions, in)``, with the 1 of the bias.

    Args:
        inputs: what the module received: ``(n, ..., in_features)`` for a linear layer,
            ``(n, C, L)`` or ``(n, C, H, W)`` for a convolution.
    """
    if layer.kind == "linear":
        vectors = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    else:
        if layer.kind == "conv1d":
            inputs = inputs.unsqueeze(-2)
            kernel, dilation, stride = (
                (1, *module.kernel_size),
                (1, *module.dilation),
                (1, *module.stride),
            )
            padding = (0, *_padding(module, 1))
        else:
            kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
            padding = _padding(module, 2)
        patches = F.unfold(inputs, kernel, dilation=dilation, padding=padding, stride=stride)
        vectors = patches.transpose(1, 2)  # (n, positions, C · kernel), the weight's order
    if layer.bias is not None:
        vectors = torch.cat([vectors, torch.ones_like(vectors[..., :1])], dim=-1)
    return vectors


def layer_output_gradients(layer: KroneckerLayer, gradients: torch.Tensor) -> torch.Tensor:
    """The output gradients ``g_t`` of every position, ``(n, positions, out)``, from the
    gradient of the module's output (``(n, ..., out)`` or ``(n, out, *spatial)``)."""
    if layer.kind == "linear":
        return gradients.reshape(gradients.shape[0], -1, gradients.shape[-1])
    return gradients.flatten(2).transpose(1, 2)
