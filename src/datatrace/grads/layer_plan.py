"""Which layers the per-layer projections serve, and how ``k`` is split across them: the plan
of :class:`~datatrace.grads.factorized.FactorizedProjector` (rules in that module's docstring).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from datatrace.grads.norm_hooks import norm_kind
from datatrace.grads.projectors import Projector
from datatrace.tasks.base import Task

# The name of the fallback's share in a split (no parameter has it).
FALLBACK = "(other)"
# Smallest share of k a block gets (unless it has fewer coordinates): see "Splitting k".
MIN_LAYER_DIM = 16


def layer_kind(module: nn.Module) -> str | None:
    """The kind of a module whose weight gradient the hooks can factor, or ``None``."""
    cls = type(module)
    if isinstance(module, nn.Linear) and cls.forward is nn.Linear.forward:
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and cls.forward in (
        nn.Conv1d.forward,
        nn.Conv2d.forward,
    ):
        plain = module.groups == 1 and module.padding_mode == "zeros" and module.padding != "same"
        return ("conv1d" if isinstance(module, nn.Conv1d) else "conv2d") if plain else None
    if isinstance(module, nn.Embedding) and cls.forward is nn.Embedding.forward:
        plain = module.max_norm is None and not module.scale_grad_by_freq
        return "embedding" if plain else None
    if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers"):
        return "hf_conv1d"  # detected by name so that transformers stays optional
    return None


def split_dim(
    total: int,
    sizes: Sequence[int],
    floor: int = MIN_LAYER_DIM,
    weights: Sequence[float] | None = None,
) -> list[int]:
    """``k_l = clip(c·w_l, min(p_l, floor), p_l)`` with ``c`` such that they sum to ``total``
    (before rounding); all ``p_l`` if they fit, the floors if those alone exceed ``total``.

    Args:
        total: the ``k`` to split.
        sizes: ``p_l``, the coordinates of each block.
        floor: the smallest share of a block with more coordinates.
        weights: ``w_l >= 0``, what the shares are proportional to; ``sizes`` if ``None`` or
            all zero.

    Returns:
        One ``k_l`` per block.
    """
    floors = [min(size, floor) for size in sizes]
    if sum(sizes) <= total:
        return list(sizes)
    if sum(floors) >= total:
        return floors
    if weights is None or not any(weights):
        weights = sizes

    def shares(c: float) -> list[float]:
        return [min(size, max(low, c * w)) for size, low, w in zip(sizes, floors, weights)]

    # at high every block of positive weight is whole: the shares reach total, or all they can
    low, high = 0.0, max(size / w for size, w in zip(sizes, weights) if w > 0)
    for _ in range(80):
        middle = (low + high) / 2
        low, high = (middle, high) if sum(shares(middle)) < total else (low, middle)
    return [max(low_k, round(share)) for share, low_k in zip(shares(high), floors)]


def factor_dims(k: int, rows: int, cols: int) -> tuple[int, int]:
    """``(k_out, k_in)`` with ``k_out·k_in ≈ k``: both ``√k``, except that a side smaller than
    that is kept whole and the other side gets the rest."""
    if k >= rows * cols:
        return rows, cols
    k_rows = min(rows, max(1, round(math.sqrt(k))))
    k_cols = min(cols, max(1, round(k / k_rows)))
    return min(rows, max(1, round(k / k_cols))), k_cols


@dataclass
class Block:
    """One projected block: a weight (and its module's bias), seen as a ``rows × cols`` matrix."""

    name: str  # the weight's name
    params: tuple[str, ...]  # the weight, then its bias if the block holds one
    kinds: tuple[str, ...]  # kinds of the modules that use the weight
    rows: int  # including the bias coordinate when bias_axis == 0
    cols: int  # including the bias coordinate when bias_axis == 1
    bias_axis: int | None
    k_rows: int = 0  # factor sizes (sparse variant: the masks'; sketch: its width)
    k_cols: int = 0
    dim: int = 0  # features of the block
    sparse_jl: bool = False  # a sparse JL maps the k_rows·k_cols products to dim
    sketch: bool = False  # TensorSketch: nnz sketches of width k_rows = k_cols, dim = nnz·width
    # FactGraSS: the whole gradient goes into the pool's sparse JL (FactorizedPlan); dim is 0
    pooled: bool = False
    path: str = "hooks"  # how its features were last computed

    @property
    def size(self) -> int:
        return self.rows * self.cols

    @property
    def width(self) -> int:
        """Columns of the block's part of the features before the pool: its whole gradient
        when pooled, else its ``dim`` features."""
        return self.size if self.pooled else self.dim


@dataclass
class FactorizedPlan:
    """How a model's selected parameters are projected: blocks, fallback, dimensions."""

    blocks: list[Block]
    modules: list[tuple[nn.Module, str, str]]  # (module, kind, block name) of every hooked module
    fallback_names: list[str]
    fallback_projector: Projector | None
    fallback_dim: int
    fallback_size: int = 0  # coordinates of the fallback's parameters and pooled blocks
    # (module, kind, weight name or None, bias name or None) of the normalisation layers whose
    # selected affine parameters (part of the fallback) come from hooks (norm_hooks)
    norms: list[tuple[nn.Module, str, str | None, str | None]] = field(default_factory=list)
    # block or fallback parameter name -> why it left the hooks
    moved: dict[str, str] = field(default_factory=dict)
    checked: list[Task] = field(default_factory=list)  # tasks whose first batch was checked
    # ids of hooked modules whose output a later in-place operation changes: hooks copy it
    copied_outputs: set[int] = field(default_factory=set)
    # ids of embeddings called with ids shared by the batch whose output the model could not
    # take expanded to the batch: left to the safety check (and vmap)
    unexpanded: set[int] = field(default_factory=set)

    def hooked_norms(self) -> list[tuple[nn.Module, str, str | None, str | None]]:
        """The :attr:`norms` still on the hooks (none of their parameters moved to vmap)."""
        return [
            norm for norm in self.norms if not any(name in self.moved for name in norm[2:] if name)
        ]

    def vmap_names(self) -> list[str]:
        """Fallback parameters whose per-example gradients come from vmap."""
        hooked = {name for norm in self.hooked_norms() for name in norm[2:] if name}
        return [name for name in self.fallback_names if name not in hooked]

    @property
    def pooled(self) -> list[Block]:
        """The blocks whose whole gradients the fallback's sparse JL maps with the fallback's
        parameters (after them, in this order)."""
        return [block for block in self.blocks if block.pooled]

    @property
    def output_dim(self) -> int:
        """Total number of features: the blocks' in order, then the fallback's (with the
        pooled blocks)."""
        return sum(block.dim for block in self.blocks) + self.fallback_dim

    def parts(self) -> list[tuple[str, int, int]]:
        """``(name, coordinates, features)`` of each block not pooled, then of the fallback
        (``"(other)"``, with the pooled blocks' coordinates), in the order of the features."""
        parts = [(block.name, block.size, block.dim) for block in self.blocks if not block.pooled]
        if self.fallback_names or self.pooled:
            parts.append((FALLBACK, self.fallback_size, self.fallback_dim))
        return parts

    def layout(self) -> list[dict[str, Any]]:
        """One row per block, then one for the fallback: ``name``, ``kind``, ``path``
        (``"factorized"``, ``"materialized"``, ``"vmap"``, or ``"hooks"`` before any batch;
        the fallback's: ``"hooks"`` when every parameter is a normalisation layer's affine
        parameter formed from hooks, ``"vmap"`` or ``"hooks+vmap"``), ``k`` (its features),
        ``params``, for blocks ``shape`` and ``factors``, for the fallback ``vmap_params``."""
        rows = [
            {
                "name": block.name,
                "kind": "+".join(block.kinds),
                "path": "vmap" if block.name in self.moved else block.path,
                "k": block.dim,
                "pooled": block.pooled,
                "params": list(block.params),
                "shape": (block.rows, block.cols),
                "factors": (block.k_rows, block.k_cols),
            }
            for block in self.blocks
        ]
        if self.fallback_names or self.pooled:
            by_vmap = self.vmap_names()
            if not by_vmap:
                path = "hooks"
            else:
                path = "vmap" if len(by_vmap) == len(self.fallback_names) else "hooks+vmap"
            rows.append(
                {
                    "name": "(other)",
                    "kind": "other",
                    "path": path,
                    "k": self.fallback_dim,
                    "params": list(self.fallback_names),
                    "vmap_params": by_vmap,
                    "pooled_blocks": [block.name for block in self.pooled],
                }
            )
        return rows


def hookable_norms(model, fallback, named, holders, name_of):
    """The normalisation layers (:func:`~datatrace.grads.norm_hooks.norm_kind`) whose selected
    affine parameters in ``fallback`` are theirs alone: ``(module, kind, weight, bias)`` with
    the names of those parameters (``None`` for one not selected)."""
    wanted = set(fallback)
    norms = []
    for module in model.modules():
        kind = norm_kind(module)
        if kind is None:
            continue
        names = []
        for attribute in ("weight", "bias"):
            param = getattr(module, attribute, None)
            name = name_of.get(id(param)) if isinstance(param, nn.Parameter) else None
            alone = name is not None and holders[id(named[name])] == [module]
            names.append(name if alone and name in wanted else None)
        if any(names):
            norms.append((module, kind, *names))
    return norms
