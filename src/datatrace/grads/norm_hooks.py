"""Per-example gradients of normalisation layers' affine parameters, from forward hooks.

A normalisation layer computes ``y = x̂ ⊙ w + b`` where ``x̂`` is its input normalised (over the
last axes for LayerNorm and RMSNorm, per channel with the running statistics for BatchNorm in
eval mode, per group of channels for GroupNorm) and ``w``, ``b`` broadcast over the other axes.
With ``g = ∂f/∂y`` for one example, ``∂f/∂w = Σ g ⊙ x̂`` and ``∂f/∂b = Σ g``, summed over the axes
that ``w`` is broadcast over (positions, spatial axes). Both are as small as the parameters
themselves, so they are formed exactly (no factorisation is needed): what this saves is the
per-example (vmap) pass over the whole model that these few parameters would otherwise cost.

Only the layers whose ``x̂`` of one example depends on that example alone are hooked: BatchNorm
only with running statistics (``track_running_stats``; attribution runs in eval mode), and only
the built-in modules with their own ``forward``. Anything else stays on the vmap path.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

NORM_KINDS = ("layer_norm", "rms_norm", "batch_norm", "group_norm")


def norm_kind(module: nn.Module) -> str | None:
    """The kind of a normalisation module whose affine gradients the hooks can form, or ``None``."""
    cls = type(module)
    if isinstance(module, nn.LayerNorm) and cls.forward is nn.LayerNorm.forward:
        return "layer_norm"
    rms_norm = getattr(nn, "RMSNorm", None)
    if rms_norm is not None and isinstance(module, rms_norm) and cls.forward is rms_norm.forward:
        return "rms_norm"
    if (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and cls.forward is nn.modules.batchnorm._BatchNorm.forward
        and module.track_running_stats
        and module.running_mean is not None
    ):
        return "batch_norm"
    if isinstance(module, nn.GroupNorm) and cls.forward is nn.GroupNorm.forward:
        return "group_norm"
    return None


def normalisation_state(module: nn.Module, kind: str) -> Any:
    """What :func:`normalised_input` needs besides the input, read inside the forward (where a
    functional call has the checkpoint's buffers in place): BatchNorm's running statistics."""
    if kind == "batch_norm":
        return module.running_mean.detach(), module.running_var.detach()
    return None


def normalised_input(module: nn.Module, kind: str, x: torch.Tensor, state: Any) -> torch.Tensor:
    """``x̂``: the layer's input normalised as its forward does, before the affine map."""
    if kind == "layer_norm":
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if kind == "rms_norm":
        return F.rms_norm(x, module.normalized_shape, None, module.eps)
    if kind == "group_norm":
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    mean, var = state
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + module.eps)


def affine_gradients(
    module: nn.Module, kind: str, x: torch.Tensor, grad: torch.Tensor, state: Any
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-example gradients ``(batch, *weight.shape)`` of the weight and of the bias (``None``
    for a parameter the module does not have) of one call, from its input ``x``, the gradient
    ``grad`` of its output and :func:`normalisation_state`."""
    n = x.shape[0]
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if kind in ("layer_norm", "rms_norm"):
        # The parameters cover the last axes; the others (batch first) are summed over.
        shape = tuple(module.normalized_shape)

        def per_example(values: torch.Tensor) -> torch.Tensor:
            return values.reshape(n, -1, *shape).sum(1)

    else:
        # Per channel (axis 1); a GroupNorm's or BatchNorm's spatial axes are summed over.
        def per_example(values: torch.Tensor) -> torch.Tensor:
            return values.reshape(n, values.shape[1], -1).sum(-1)

    grad_weight = grad_bias = None
    if isinstance(weight, nn.Parameter):
        grad_weight = per_example(grad * normalised_input(module, kind, x, state))
    if isinstance(bias, nn.Parameter):
        grad_bias = per_example(grad)
    return grad_weight, grad_bias


def check_shapes(module: nn.Module, kind: str, x: torch.Tensor) -> bool:
    """Whether the input has the layout the per-example sums assume (batch first)."""
    if kind in ("layer_norm", "rms_norm"):
        shape = tuple(module.normalized_shape)
        return x.dim() > len(shape) and tuple(x.shape[-len(shape) :]) == shape
    channels = module.num_features if kind == "batch_norm" else module.num_channels
    return x.dim() >= 2 and x.shape[1] == channels and math.prod(x.shape) > 0
