"""Per-layer projections of gradients from layer inputs and output gradients (LoGra, FactGraSS,
TensorSketch), never forming the gradients.

For a linear map with weight ``W`` (``out × in``) applied at positions ``t`` (tokens, conv
patches), the gradient of example ``i``'s output is ``G_i = Σ_t g_{i,t} a_{i,t}ᵀ`` (``g``: the
gradient w.r.t. the layer's output, ``a``: its input). With ``P = P_out ⊗ P_in`` its projection is
``vec(P_outᵀ G_i P_in) = Σ_t (P_outᵀ g_{i,t}) ⊗ (P_inᵀ a_{i,t})``: one batched forward and one
backward capture ``a`` and ``g`` with hooks, and only the projected factors are multiplied.

**The map.** Each projected parameter is seen as a matrix in its stored layout: rows = its first
axis, columns = the others flattened (a conv weight ``(out, in, kh, kw)`` is ``out × in·kh·kw``, an
embedding ``vocab × dim``, Hugging Face's ``Conv1D`` ``in × out``). Its map is ``F_out ⊗ F_in`` over
(rows, columns); the same parameter always gets the same map, whichever modules use it (a tied
embedding and LM head add their terms into one block). Variants:

- ``"dense"`` (LoGra): ``F`` i.i.d. Gaussian, variance ``1/k`` per side.
- ``"sparse"`` (FactGraSS): ``F`` keeps a uniformly random subset of ``k'`` coordinates scaled by
  ``√(dim/k')``, then a sparse JL (:class:`~datatrace.grads.projectors.SparseJLProjector`'s tables)
  maps the ``k'_out·k'_in`` products to the layer's ``k``. How many products are kept is a cost
  rule (at ``MULTI_POSITION_BLOWUP``): ``k'_out·k'_in ≈ MULTI_POSITION_BLOWUP·k``, or
  ``ONE_POSITION_BLOWUP·k`` for a block whose every call the pilot pass saw at one position (its
  map ``"one_position_masks"`` in ``layer_maps``), never fewer than ``SPARSE_BLOWUP·k``; where
  that is at least ``WHOLE_BLOCK_FRACTION`` of the block (``ONE_POSITION_WHOLE_FRACTION`` at one
  position), the whole block (no masks: its exact gradient, see "Pool").
- ``"sketch"`` (TensorSketch, Pham & Pagh 2013): ``nnz`` independent sketches of width
  ``w = k/nnz``, each scaled by ``1/√nnz`` (slice ``j`` of the features is sketch ``j``). Sketch
  ``j`` has CountSketch hashes ``h_out: [rows] → [w]``, ``h_in: [cols] → [w]`` and signs
  ``s_out``, ``s_in``; coordinate ``(i, l)`` goes to bucket ``(h_out(i) + h_in(l)) mod w`` with
  sign ``s_out(i)·s_in(l)``. Not a Kronecker product, but ``TS(u ⊗ v)`` is the circular
  convolution of the two CountSketches: each position costs two real FFTs, the positions are
  summed in the frequency domain, then one inverse FFT. Its inner products spread ``≈ 1/√k``,
  like an i.i.d. map of dimension ``k``, where the Kronecker maps multiply two estimates of
  dimension ``≈ √k``, each off by ``≈ k^-¼`` relative to its mean (large for non-negative
  activations). Several sketches (each coordinate in ``nnz`` buckets, as in the sparse JL) leave
  that spread as it is but preserve the geometry of many gradients better, which TRAK's inverse
  kernel needs: one sketch of width ``k`` gave clearly worse scores.

- ``"hybrid"``: ``"sketch"`` for the blocks whose every call the pilot pass (``fit_split``) saw
  at one position (a rank-one gradient ``g aᵀ``, on whose few large coordinates masks are noisy),
  ``"sparse"`` for the others; the choice is recorded in :meth:`~FactorizedProjector.config` as
  ``layer_maps``. Measured in docs/trak.md ("Where FactGraSS loses"): mixed, so not the default.

A side whose ``k`` equals its size is the identity (Kronecker variants). All variants have
``E[PPᵀ] = I`` (each factor has it, and the JL is independent of the masks; the sketch's signs
cancel every cross term). Factors are generated on the CPU in blocks of
``DENSE_GENERATION_ROWS`` rows (hash tables: ``(nnz, SPARSE_GENERATION_ROWS)``), block ``b`` of
side ``"out"`` (rows) or ``"in"`` (columns) of parameter ``name`` from
``derive_seed(seed, name, side, b)``, then moved: identical on every device.

**Bias.** A module's bias, when selected, is an extra input coordinate fixed at 1 (``[W | b]``
projected by ``F_out ⊗ F_in`` with ``F_in`` one row longer; for ``Conv1D`` and embeddings the input
is the row axis). It shares the layer's block, costs nothing extra and keeps the map one Kronecker
product. A weight used by several modules (tied) keeps its biases out of its block; they go to the
vmap path below.

**Splitting k.** Each block (a weight with its bias, ``p_l`` coordinates; the fallback below is
one more) gets ``k_l = clip(c·w_l, min(p_l, MIN_LAYER_DIM), p_l)``, with ``c`` chosen so the
``k_l`` sum to ``k``, and a weight ``w_l`` set by ``split``:

- ``"gradient"`` (default): ``w_l = e_l``, the block's gradient energy ``E‖g_l‖²``. Why: the
  blocks' maps are independent, each about as spread as an i.i.d. map of dimension ``k_l``, so
  the concatenated estimate ``Σ_l ⟨φ_l, φ'_l⟩`` of ``⟨g, g'⟩`` has variance about
  ``Σ_l ‖g_l‖²‖g'_l‖²/k_l`` (plus ``⟨g_l, g'_l⟩²/k_l``, small for the nearly orthogonal
  gradients of different examples). Over pairs of independent examples that is
  ``Σ_l e_l²/k_l``; minimised under ``Σ_l k_l = k`` (Lagrange: ``e_l²/k_l² = λ``) it gives
  ``k_l ∝ e_l`` and the value ``(Σ_l e_l)²/k = E‖g‖²·E‖g'‖²/k``: the variance of one i.i.d. map
  of the whole vector. Any other split is worse by the factor
  ``k·Σ_l (e_l²/k_l) / (Σ_l e_l)² ≥ 1`` (Cauchy–Schwarz). The energies are measured by a pilot
  pass (:meth:`FactorizedProjector.fit_split`; :class:`~datatrace.grads.featurize.GradientFeatures`
  runs it on the first ``min(n, PILOT_EXAMPLES)`` training examples under checkpoint 0, with
  checkpoint 0's seed): ``e_l`` is the mean of ``‖φ_l‖²`` under the ``"params"`` split's map,
  unbiased since ``E[PPᵀ] = I`` (exact for the blocks that map keeps whole). A block with zero
  energy gets the floor; if every energy is zero the ``"params"`` weights are used. The
  resulting ``k_l`` (before the variant's rounding) are part of :meth:`~FactorizedProjector.config`,
  so a store's provenance records them; a process that resumes or shares that store with the same
  settings adopts them instead of measuring again (one map for every shard), and
  ``FactorizedProjector(..., layer_dims=config["layer_dims"], layer_maps=config["layer_maps"])``
  rebuilds the map (``layer_maps`` for the variants that choose a map per block: ``"sparse"``
  and ``"hybrid"``).
- ``"params"``: ``w_l = p_l``, the same rule when gradients have comparable magnitudes per
  coordinate across layers; known before any gradient is seen, but when they do not (a head
  with much larger gradients than the body) it loses the factor above.

The floor keeps small blocks (heads, or a block the pilot saw no gradient in) from being
starved; a block capped at ``p_l`` is not projected (its unused share goes to the others). The
sketch takes ``k_l`` (rounded up to a multiple of ``nnz``) as it is: its variance is about that
of an i.i.d. map, for which the same rule holds. For the Kronecker variants ``k_l`` is then
split as ``k_out × k_in`` with both ``≈ √k_l``, except that a side no larger than that is kept
whole (exact) and the other side gets the rest: for a rank-one term ``g aᵀ`` (one position) the
projected inner product is the product of two JL estimates, with relative error about
``√(2/k_out) + √(2/k_in)``, smallest for a fixed product at ``k_out = k_in`` (splitting in
proportion to ``out/in`` instead was much noisier in TRAK scores). The total
:attr:`FactorizedPlan.output_dim` is what the rounding gives, close to but not exactly ``k``
(sparse and sketch: ``k_l`` rounded up to a multiple of ``nnz``). When the floors alone exceed
``k`` they are used as they are.

**Cost rule.** Per call of a layer with ``S`` positions, factorised costs
``S·(out·k_out + in·k_in + k_out·k_in)`` multiply-adds per example, materialising
``G_i = Σ_t g aᵀ`` then ``F_outᵀ G F_in`` costs ``S·out·in + out·in·k_in + out·k_in·k_out`` (cheaper
order of the two products; an identity side costs nothing, an embedding's row side ``k_out`` per
position). The dense variant takes the cheaper one, and never materialises more than
``MATERIALISE_BYTES`` per batch; both compute the same map, so the numbers agree up to rounding.
The sparse variant always factorises (its factors are gathers: the same cost either way). The
sketch costs ``S·(nnz·(out + in) + FFT_COST·k·log₂w)`` from hooks (an embedding's row side
``nnz``), and ``S·out·in + nnz·out·in`` materialised (the hashed map is index arithmetic); it takes
the cheaper,
within the same memory limit, and works through its positions in slices of at most
``SKETCH_WORK_BYTES`` of spectra.

**Everything else** (LayerNorm/BatchNorm affine, custom modules, grouped or "same"-padded convs, a
weight also registered in an unsupported module) goes through :class:`PerExampleGradients` (vmap)
restricted to those names, and is projected by one :class:`SparseJLProjector` (seed
``derive_seed(seed, "fallback")``) on its share of ``k`` (identity if the share covers it).

**Pool** (FactGraSS): a block whose masks would keep its whole gradient
(``WHOLE_BLOCK_FRACTION``, ``ONE_POSITION_WHOLE_FRACTION``) is not given a map of its own. Its
whole gradient ``Σ_t g aᵀ``, formed from the hooks, joins the fallback's sparse JL after the
fallback's parameters (in block order), and its share of ``k`` joins the fallback's
(``Block.pooled``, ``dim`` 0): the pool gets what the other blocks' shares leave of ``k`` (at
least ``MIN_LAYER_DIM``). Each such block with its own JL would carry the ``MIN_LAYER_DIM`` floor
and a rounding to ``nnz``, and the split's pilot energies would decide its dimension alone; in
the pool the floors go and the hashing spreads the pooled coordinates over the pool's ``k`` as
one sparse JL of their concatenation does. On a small model (every block pooled) the features
are whole-vector sparse JL of the exact gradient (the same distribution, other hashes); the
diffusion family's UNet of 35 blocks would otherwise spend 16 of ``k`` on each of its nine
time-embedding projections. Pooled blocks cost the same products as their own JL would.

**Safety check.** Hooks see only uses of a weight through its module's ``forward``. On the first
batch of each task, each block's features on ``check_examples`` examples are compared with the same
map applied to vmap per-example gradients; a block that differs by more than ``√eps`` of the
dtype relative to its norm (a weight also used functionally, examples that interact, inputs not
batched along dim 0) is computed from vmap gradients from then on, with the same map, and a
:class:`FactorizationWarning` names it. :meth:`FactorizedPlan.layout` shows where each block went.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from datatrace._arguments import positive_integer
from datatrace.data import batch_size_of, map_tensors
from datatrace.grads.factors import CountSketch, Factor, full_precision, without_autocast
from datatrace.grads.layer_plan import (
    FALLBACK,
    MIN_LAYER_DIM,
    Block,
    FactorizedPlan,
    factor_dims,
    hookable_norms,
    layer_kind,
    split_dim,
)
from datatrace.grads.norm_hooks import affine_gradients, check_shapes, normalisation_state
from datatrace.grads.per_example import PerExampleGradients, _Bound, _eval_mode, module_state
from datatrace.grads.projectors import (
    DENSE_GENERATION_ROWS,
    SPARSE_GENERATION_ROWS,
    IdentityProjector,
    Projector,
    SparseJLProjector,
    _generator,
    derive_seed,
    hashed_csr,
    outer_product_jl,
    slab_matrices,
    slab_rows,
)
from datatrace.tasks.base import Task, fuses_out_to_loss

VARIANTS = ("dense", "sparse", "sketch", "hybrid")
# The maps a block can get, per variant that chooses them in the pilot pass (recorded in
# config()["layer_maps"]): "hybrid" sketches the one-position blocks; FactGraSS ("sparse") sizes
# their masks by ONE_POSITION_BLOWUP ("one_position_masks") instead of MULTI_POSITION_BLOWUP.
LAYER_MAPS = {"hybrid": ("masks", "sketch"), "sparse": ("masks", "one_position_masks")}
SPLITS = ("gradient", "params")
# Training examples of the pilot pass that measures each block's gradient energy (the
# "gradient" split): enough for a few-percent estimate of each block's mean, a small cost next
# to featurizing the training set.
PILOT_EXAMPLES = 64
# How many masked products FactGraSS keeps before its sparse JL, in multiples of the block's k_l:
# more kept coordinates lower the masks' variance. A block used at S positions per example pays
# S × kept multiply-adds for the products (summed over positions) and nnz × kept scatter-adds
# for the JL, against S × size for the layer's own forward pass. So a multi-position block keeps
# MULTI_POSITION_BLOWUP·k_l, and a block seen at one position per call keeps
# ONE_POSITION_BLOWUP·k_l, where the JL's scatter dominates; never fewer than SPARSE_BLOWUP·k_l
# (what earlier versions kept for every block; every variant records it as "sparse_blowup").
# Where that is at least WHOLE_BLOCK_FRACTION of a multi-position block, or
# ONE_POSITION_WHOLE_FRACTION of a one-position block, the block keeps its whole gradient
# (identity factors: Σ_t g aᵀ formed from the hooks, then the sparse JL). Such a block is small
# next to its share of k: it costs at most 1/fraction times the masks it replaces, and all such
# blocks together hold at most MULTI_POSITION_BLOWUP·k/WHOLE_BLOCK_FRACTION coordinates, whatever
# the model's size. At S positions the whole gradient costs S·size multiply-adds (the layer's own
# weight gradient in training) and the JL nnz·size, so the multi-position fraction is looser; at
# one position the JL's scatter is most of the cost (the 422k CNN's 401k-coordinate linear layer
# whole: featurizing 13.6–15.0 s instead of 3.4–3.6 s). On small models, where most blocks are
# whole, masks were what FactGraSS lost to whole-vector sparse JL (GPT-2 fact tracing at
# k = 2048, one checkpoint: MRR 0.887 with the earlier cap of a quarter of each block, 0.931
# whole, sparse JL 0.930; the MiniLM text classifier's pooler, LDS 0.609 → 0.622, sparse JL
# 0.628; T5 fact tracing at k = 512, three checkpoints, 0.965 with 1/8 for multi-position
# blocks, 0.982 with 1/32, sparse JL 0.979; docs/trak.md).
# Measured for the blowups (docs/trak.md, "Where FactGraSS loses"; one run per setting, and
# runs of the same setting differ by about 0.005: 0.913 and 0.918, 0.484 and 0.485): GPT-2 fact
# tracing at k = 512, MRR 0.918 with 4, 0.933 with 16, 0.946 with 64 (whole-vector sparse JL
# 0.954); the MiniLM text classifier's one-position pooler and head at k = 2048, LDS 0.547 with 4,
# 0.585 with 8, 0.609 with 16 (0.628); the digits MLP at k = 512, 0.485 with 4, 0.500 with 16
# (0.502).
MULTI_POSITION_BLOWUP = 64
ONE_POSITION_BLOWUP = 16
SPARSE_BLOWUP = 4
WHOLE_BLOCK_FRACTION = 1 / 32
ONE_POSITION_WHOLE_FRACTION = 1 / 8
# The variants whose maps use these masks (FactGraSS, and the hybrid's masked blocks and pilot)
# record the constants of the cost rule in their config(): a store made under other values is
# refused, not mixed.
MASK_VARIANTS = ("sparse", "hybrid")


# Recorded by FactGraSS: its whole blocks join the fallback's sparse JL (module docstring, "Pool").
POOL_VERSION = 1


def mask_constants(variant: str) -> dict[str, float]:
    """The cost rule's constants, as ``variant`` (one of ``MASK_VARIANTS``) records them."""
    constants = {
        "multi_position_blowup": MULTI_POSITION_BLOWUP,
        "one_position_blowup": ONE_POSITION_BLOWUP,
        "whole_block_fraction": WHOLE_BLOCK_FRACTION,
        "one_position_whole_fraction": ONE_POSITION_WHOLE_FRACTION,
    }
    if variant == "sparse":
        constants["pool"] = POOL_VERSION
    return constants


# Largest batch of materialised per-example gradients ``(batch, out, in)`` the cost rule allows.
MATERIALISE_BYTES = 256 << 20
# Multiply-adds per point and per log2 of the length of the two real FFTs and the product of one
# position's sketches (a real FFT of length k takes about k·log2(k) of them).
FFT_COST = 2
# _term's path for products laid out one example per column, (rows, cols, batch), as the sparse
# JL's CSR product reads them (FactorizedProjector._by_columns)
COLUMNS = "factorized-columns"
# _term's path for a one-position call whose products went through the block's sparse JL
# already, a slab of rows at a time: its features (batch, dim), summed over the block's calls.
PROJECTED = "factorized-projected"
# _term's path for a pooled block's one-position call: the outer product's two sides (_Outer), whose
# products the fallback's sparse JL maps a slab at a time (SparseJLProjector.project_outer)
# when it is the block's only call; a second call of the block sums materialised products.
OUTER = "outer"
# Largest batch of per-position spectra ``(batch, positions, k/2 + 1)`` of one side held at once.
SKETCH_WORK_BYTES = 256 << 20
# Modules whose calls are hooked, and the stored axis (0 rows, 1 columns) their input lies on.
INPUT_AXIS = {"linear": 1, "conv1d": 1, "conv2d": 1, "embedding": 0, "hf_conv1d": 0}
# Dimensions of a batched input of each kind (at least, for linear maps and embeddings).
BATCHED_DIMS = {"linear": 2, "conv1d": 3, "conv2d": 4, "embedding": 1, "hf_conv1d": 2}


class FactorizationWarning(UserWarning):
    """Blocks whose factorised features disagreed with per-example gradients: they are computed
    from per-example gradients (vmap) instead, with the same projection."""


@dataclass
class _Call:
    """One call of a hooked module: its input and output (and, after backward, the gradient)."""

    block: str  # the block's name; for a normalisation layer, its first hooked parameter
    kind: str
    module: nn.Module
    inputs: torch.Tensor
    output: torch.Tensor
    # a normalisation layer's: (weight name or None, bias name or None), normalisation_state
    norm_params: tuple[str | None, str | None] | None = None
    norm_state: Any = None
    version: int = 0  # the output's version counter when the hook saw it

    def names(self) -> tuple[str, ...]:
        """The block, or the normalisation layer's hooked parameters."""
        if self.norm_params is None:
            return (self.block,)
        return tuple(name for name in self.norm_params if name)


def _unfold(x: torch.Tensor, module: nn.Module, kind: str, transposed: bool = True) -> torch.Tensor:
    """The patches a conv multiplies, ``(batch, positions, in·kernel)`` in the weight's order
    (``(batch, in·kernel, positions)``, as unfolded, without ``transposed``)."""
    padding = (0,) * len(module.kernel_size) if module.padding == "valid" else module.padding
    if kind == "conv1d":
        x, kernel = x.unsqueeze(2), (1, module.kernel_size[0])
        dilation, padding, stride = (1, module.dilation[0]), (0, padding[0]), (1, module.stride[0])
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    patches = nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2) if transposed else patches


class SplitMismatchError(ValueError):
    """A fitted split of k serves another model or parameter selection than the one asked for."""


class FactorizedProjector(Projector):
    """Per-layer Kronecker-factored projection computed from layer inputs and output gradients.

    Features come from ``(model, task, state, batch)`` through :meth:`features`, not from
    per-example gradients: :class:`~datatrace.grads.featurize.GradientFeatures` calls it in place
    of ``gradients()`` then ``project()``. The map and the rules are in the module's docstring.

    With ``split="gradient"`` and no ``layer_dims`` the split is fitted by :meth:`fit_split`
    (``GradientFeatures`` does it before the first features, or adopts the split a store
    recorded) and kept in ``layer_dims_``; :meth:`plan` and :meth:`features` need it.

    Args:
        proj_dim: the total ``k`` to split across layers (the result is close to it).
        variant: ``"dense"`` (LoGra: Gaussian factors), ``"sparse"`` (FactGraSS: masks, then
            a sparse JL), ``"sketch"`` (TensorSketch of each block) or ``"hybrid"``
            (TensorSketch for the blocks the pilot pass sees at one position per call,
            FactGraSS for the others; needs ``split="gradient"``).
        nnz: nonzeros per coordinate of the sparse JLs (FactGraSS and the fallback).
        check_examples: examples of the first batch of each task on which the features of every
            block are checked against vmap per-example gradients (0: no check).
        max_cache_bytes: factors kept in memory between batches up to this size in all.
        split: how ``k`` is split across blocks: ``"gradient"`` (in proportion to each block's
            gradient energy, measured by a pilot pass) or ``"params"`` (to its size).
        layer_dims: a fitted ``"gradient"`` split, ``{block name: k_l}`` (the fallback as
            ``"(other)"``), as ``config()["layer_dims"]`` records it; ``None`` to fit one.
        layer_maps: with ``"hybrid"`` and ``layer_dims``, the fitted ``{block name: "masks" |
            "sketch"}`` that ``config()["layer_maps"]`` records.
    """

    def __init__(
        self,
        proj_dim: int,
        variant: str = "dense",
        nnz: int = 4,
        check_examples: int = 2,
        max_cache_bytes: int = 1 << 30,
        split: str = "gradient",
        layer_dims: Mapping[str, int] | None = None,
        layer_maps: Mapping[str, str] | None = None,
    ):
        super().__init__(max_cache_bytes)
        proj_dim = positive_integer("proj_dim", proj_dim)
        if nnz < 1 or check_examples < 0:
            raise ValueError(
                f"nnz must be positive and check_examples non-negative, got {nnz} and "
                f"{check_examples}"
            )
        if variant not in VARIANTS:
            raise ValueError(
                f"unknown variant {variant!r}: use 'dense' (LoGra), 'sparse' (FactGraSS) or "
                "'sketch' (TensorSketch)"
            )
        if split not in SPLITS:
            raise ValueError(
                f"unknown split {split!r}: use 'gradient' (k_l in proportion to each layer's "
                "gradient energy) or 'params' (to its number of parameters)"
            )
        if layer_dims is not None and (
            split != "gradient" or not all(int(k) >= 1 for k in layer_dims.values())
        ):
            raise ValueError(
                "layer_dims is a fitted split='gradient' ({block name: k_l}, each k_l >= 1), "
                f"got {layer_dims!r} with split={split!r}"
            )
        if variant == "hybrid" and split != "gradient":
            raise ValueError(
                "variant='hybrid' chooses each block's map in the pilot pass of "
                "split='gradient'; use variant='sparse' or 'sketch' with split='params'"
            )
        chooses_maps = variant in LAYER_MAPS and split == "gradient"
        if (layer_maps is not None) != (chooses_maps and layer_dims is not None) or (
            layer_maps is not None and not set(layer_maps.values()) <= set(LAYER_MAPS[variant])
        ):
            allowed = " | ".join(f"'{m}'" for m in LAYER_MAPS.get(variant, ("...",)))
            raise ValueError(
                f"layer_maps ({{block name: {allowed}}}) goes with variant='hybrid' or 'sparse' "
                f"and their fitted layer_dims (split='gradient'), got {layer_maps!r} with "
                f"variant={variant!r}"
            )
        self.proj_dim = proj_dim
        self.variant = variant
        self.layer_maps_ = (
            None if layer_maps is None else {str(n): str(m) for n, m in layer_maps.items()}
        )
        # positions per call of each block seen in the pilot pass (variants choosing maps)
        self._positions: dict[str, int] | None = None
        self.nnz = nnz
        self.check_examples = check_examples
        self.split = split
        self.layer_dims_ = (
            None if layer_dims is None else {str(n): int(k) for n, k in layer_dims.items()}
        )
        self._plans: list[tuple[nn.Module, tuple[str, ...], FactorizedPlan]] = []
        self._pilot: tuple[nn.Module, tuple[str, ...], FactorizedPlan] | None = None
        self._cache_seed: int | None = None
        self._cache_bytes = 0

    def config(self) -> dict[str, Any]:
        config = {
            "name": "factorized",
            "proj_dim": self.proj_dim,
            "variant": self.variant,
            "nnz": self.nnz,
            "min_layer_dim": MIN_LAYER_DIM,
            "sparse_blowup": SPARSE_BLOWUP,
            "split": self.split,
        }
        if self.variant in MASK_VARIANTS:
            config.update(mask_constants(self.variant))
        if self.split == "gradient":
            config["layer_dims"] = None if self.layer_dims_ is None else dict(self.layer_dims_)
        if self.variant in LAYER_MAPS and self.split == "gradient":
            config["layer_maps"] = None if self.layer_maps_ is None else dict(self.layer_maps_)
        return config

    @property
    def split_fitted(self) -> bool:
        """Whether the split is known: ``"params"``, or a fitted (or given) ``"gradient"``."""
        return self.split == "params" or self.layer_dims_ is not None

    def adopt_split(self, config: Mapping[str, Any] | None) -> bool:
        """Take the fitted split of ``config`` (a recorded :meth:`config`) if this projector's
        is not fitted yet and every other setting is the same; return whether it was taken."""
        if self.split_fitted or not isinstance(config, Mapping):
            return False
        fitted = {"layer_dims": None} | ({"layer_maps": None} if "layer_maps" in config else {})
        if config.get("layer_dims") is None or {**config, **fitted} != self.config():
            return False
        if self.variant in LAYER_MAPS and config.get("layer_maps") is None:
            return False
        self.layer_dims_ = {str(name): int(k) for name, k in config["layer_dims"].items()}
        if self.variant in LAYER_MAPS:
            self.layer_maps_ = {str(name): str(m) for name, m in config["layer_maps"].items()}
        self._plans = []
        return True

    def reset_split(self) -> None:
        """Forget a fitted ``"gradient"`` split (one adopted for other parameters)."""
        if self.split == "gradient":
            self.layer_dims_ = None
            self.layer_maps_ = None
            self._plans = []
            self._pilot = None

    def fit_split(
        self,
        model: nn.Module,
        task: Task,
        param_names: Sequence[str],
        state: Mapping[str, torch.Tensor],
        batches: Iterable[Any],
        seed: int,
    ) -> FactorizedProjector:
        """Fit the ``"gradient"`` split from a pilot pass (module docstring, "Splitting k").

        Each block's energy ``e_l`` is the mean over the examples of ``batches`` of ``‖φ_l‖²``,
        with ``φ`` the features under the ``"params"`` split; then
        ``layer_dims_ = split_dim(proj_dim, p_l, weights=e_l)`` by block name.

        Args:
            model, task, param_names, state, seed: as in :meth:`features`.
            batches: the pilot examples, in batches along the first dimension.

        Returns:
            ``self``.

        Raises:
            ValueError: the split is ``"params"`` or already fitted, or the pilot's gradients
                are not finite.
        """
        if self.split_fitted:
            raise ValueError(
                f"this projector's split ({self.split!r}) is already set: fit_split measures a "
                "new one for split='gradient' only, once"
            )
        names = list(param_names)
        # The pilot measures every block through one-position masks (which blocks are at one
        # position is not known yet): the smallest masks' noisier energies starve them of k.
        pilot = self._build_plan(model, names, "params", pilot=True)
        parts = pilot.parts()
        edges = [0, *itertools.accumulate(dim for _, _, dim in parts)]
        totals = torch.zeros(len(parts), dtype=torch.float64)
        count = 0
        self._positions = {} if self.variant in LAYER_MAPS else None
        for batch in batches:
            features = self._features(pilot, model, task, state, batch, seed)[0].double()
            count += len(features)
            totals += torch.stack(
                [features[:, lo:hi].pow(2).sum() for lo, hi in itertools.pairwise(edges)]
            ).cpu()
        energies = (totals / max(count, 1)).tolist()
        bad = [name for (name, _, _), energy in zip(parts, energies) if not math.isfinite(energy)]
        if bad:
            raise ValueError(
                f"the gradients of the pilot pass are NaN or infinite in {bad}: the model's "
                "output is not finite on the first training examples; fix it and run again"
            )
        split = split_dim(self.proj_dim, [size for _, size, _ in parts], weights=energies)
        self.layer_dims_ = {name: k for (name, _, _), k in zip(parts, split)}
        if self.variant in LAYER_MAPS:
            # One position per call: a rank-one gradient, which masks estimate badly
            # (docs/trak.md, "Where FactGraSS loses"): the sketch reads every coordinate, and
            # FactGraSS sizes their masks by what their products cost. A block the hooks never
            # reached in the pilot (moved to vmap) keeps the multi-position masks.
            one_position = LAYER_MAPS[self.variant][1]
            self.layer_maps_ = {
                block.name: one_position if self._positions.get(block.name) == 1 else "masks"
                for block in pilot.blocks
            }
        self._positions = None
        self._plans = []
        # What the pilot's first batch showed about the hooks (which blocks they serve) holds
        # for the fitted plan too: its check is not repeated.
        self._pilot = (model, tuple(names), pilot)
        return self

    def output_dim(self, sizes: Sequence[int]) -> int:
        raise TypeError(
            "the factorized projection's dimension depends on the model's layers, not only on "
            "the parameter sizes: use plan(model, param_names).output_dim"
        )

    def project(self, grads: Sequence[torch.Tensor], seed: int) -> torch.Tensor:
        raise TypeError(
            "the factorized projection computes features from the model and the batch: use "
            "features(model, task, param_names, state, batch, seed)"
        )

    # -- the plan -----------------------------------------------------------------------------

    def plan(self, model: nn.Module, param_names: Sequence[str]) -> FactorizedPlan:
        """The blocks, fallback and dimensions for ``model``'s parameters ``param_names``.

        Raises:
            RuntimeError: the ``"gradient"`` split is not fitted yet.
            ValueError: the fitted split names other blocks than these parameters form.
        """
        names = tuple(param_names)
        for known_model, known_names, plan in self._plans:
            if known_model is model and known_names == names:
                return plan
        if not self.split_fitted:
            raise RuntimeError(
                "this projector's split='gradient' is not fitted yet: featurize the training "
                "set with it (GradientFeatures.featurize_train or featurize_all, or TRAK.fit), "
                "call fit_split(...) on pilot examples, or pass split='params'"
            )
        plan = self._build_plan(model, list(names), self.split)
        if self._pilot is not None and self._pilot[0] is model and self._pilot[1] == names:
            plan.moved.update(self._pilot[2].moved)
            plan.checked.extend(self._pilot[2].checked)
        self._plans = [*self._plans[-3:], (model, names, plan)]
        return plan

    def layout(self) -> list[dict[str, Any]]:
        """:meth:`FactorizedPlan.layout` of the plan used last."""
        if not self._plans:
            raise RuntimeError("this projector has not been used yet: featurize with it first")
        return self._plans[-1][2].layout()

    def _build_plan(
        self, model: nn.Module, param_names: list[str], split: str, pilot: bool = False
    ) -> FactorizedPlan:
        """The plan with the ``"params"`` split, or with the fitted ``layer_dims_``."""
        named = dict(model.named_parameters())
        selected = set(param_names)
        name_of = {id(param): name for name, param in named.items()}
        holders: dict[int, list[nn.Module]] = defaultdict(list)
        for module in model.modules():
            for param in module._parameters.values():
                if param is not None:
                    holders[id(param)].append(module)
        blocks, modules, taken = [], [], set()
        for name in param_names:
            users = holders[id(named[name])]
            kinds = [layer_kind(module) for module in users]
            if not users or None in kinds or any(m.weight is not named[name] for m in users):
                continue
            params, bias_axis = [name], None
            bias = getattr(users[0], "bias", None)
            if (
                len(users) == 1
                and isinstance(bias, nn.Parameter)
                and name_of[id(bias)] in selected
                and holders[id(bias)] == users
            ):
                params.append(name_of[id(bias)])
                bias_axis = INPUT_AXIS[kinds[0]]
            shape = named[name].shape
            rows, cols = shape[0], math.prod(shape[1:])
            blocks.append(
                Block(
                    name,
                    tuple(params),
                    tuple(dict.fromkeys(kinds)),
                    rows + (bias_axis == 0),
                    cols + (bias_axis == 1),
                    bias_axis,
                )
            )
            modules += [(module, kind, name) for module, kind in zip(users, kinds)]
            taken.update(params)
        fallback = [name for name in param_names if name not in taken]
        norms = hookable_norms(model, fallback, named, holders, name_of)
        sizes = {block.name: block.size for block in blocks}
        if fallback:
            sizes[FALLBACK] = sum(named[name].numel() for name in fallback)
        if split == "params":
            shares = dict(zip(sizes, split_dim(self.proj_dim, list(sizes.values()))))
        elif set(self.layer_dims_) == set(sizes):
            shares = self.layer_dims_
        else:
            raise SplitMismatchError(
                f"the fitted split names the blocks {sorted(self.layer_dims_)}, but these "
                f"parameters form {sorted(sizes)}: a split fitted for one model and parameter "
                "selection serves only those (make a new projector for another)"
            )
        for block in blocks:
            self._size_block(block, shares[block.name], pilot)
        pool_size, pool_share = sizes.get(FALLBACK, 0), shares.get(FALLBACK, 0)
        if self.variant == "sparse" and not pilot:
            # FactGraSS's whole blocks join the fallback's sparse JL (module docstring, "Pool"),
            # which gets what the other blocks leave of k: the pooled blocks' floors go
            for block in blocks:
                if block.sparse_jl and block.k_rows * block.k_cols == block.size:
                    block.pooled, block.dim = True, 0
                    pool_size += block.size
            if any(block.pooled for block in blocks):
                own = sum(shares[block.name] for block in blocks if not block.pooled)
                pool_share = max(self.proj_dim - own, MIN_LAYER_DIM)
        projector, fallback_dim = None, 0
        if pool_size:
            share = -(-pool_share // self.nnz) * self.nnz
            if share >= pool_size:
                projector, fallback_dim = IdentityProjector(), pool_size
            else:
                projector = SparseJLProjector(share, self.nnz, self.max_cache_bytes)
                fallback_dim = share
        return FactorizedPlan(blocks, modules, fallback, projector, fallback_dim, pool_size, norms)

    def _size_block(self, block: Block, share: int, pilot: bool = False) -> None:
        if share >= block.size:
            block.k_rows, block.k_cols, block.dim = block.rows, block.cols, block.size
            return
        if self.variant == "dense":
            block.k_rows, block.k_cols = factor_dims(share, block.rows, block.cols)
            block.dim = block.k_rows * block.k_cols
            return
        dim = -(-share // self.nnz) * self.nnz
        if dim >= block.size:
            block.k_rows, block.k_cols, block.dim = block.rows, block.cols, block.size
            return
        if self.variant == "sketch" or (
            self.variant == "hybrid" and (self.layer_maps_ or {}).get(block.name) == "sketch"
        ):
            block.k_rows = block.k_cols = dim // self.nnz
            block.dim, block.sketch = dim, True
            return
        block_map = (self.layer_maps_ or {}).get(block.name)
        if (pilot and self.variant in LAYER_MAPS) or block_map == "one_position_masks":
            kept, whole = ONE_POSITION_BLOWUP * dim, ONE_POSITION_WHOLE_FRACTION
        else:
            kept, whole = MULTI_POSITION_BLOWUP * dim, WHOLE_BLOCK_FRACTION
        if kept >= block.size * whole:
            kept = block.size
        kept = min(block.size, max(kept, SPARSE_BLOWUP * dim))
        block.k_rows, block.k_cols = factor_dims(kept, block.rows, block.cols)
        block.dim, block.sparse_jl = dim, True

    # -- the matrices -------------------------------------------------------------------------

    def _cached(self, key: tuple, seed: int, make):
        if seed != self._cache_seed:
            self._cache, self._cache_seed, self._cache_bytes = {}, seed, 0
        if key in self._cache:
            return self._cache[key]
        value, nbytes = make()
        if self._cache_bytes + nbytes <= self.max_cache_bytes:
            self._cache[key] = value
            self._cache_bytes += nbytes
        return value

    def factor(self, block: Block, axis: int, seed: int, like: torch.Tensor):
        """The factor of ``block`` over its rows (``axis=0``, side ``"out"``) or columns
        (``axis=1``, side ``"in"``), on the device of ``like`` (and in its dtype): a
        :class:`~datatrace.grads.factors.Factor`, or the side's
        :class:`~datatrace.grads.factors.CountSketch` for the sketch."""
        dim, k = (block.rows, block.k_rows) if axis == 0 else (block.cols, block.k_cols)
        if k == dim and not block.sketch:
            return Factor(dim, k)
        side = "out" if axis == 0 else "in"
        key = (block.name, side, dim, k, self.variant, str(like.device), like.dtype)

        def make():
            if block.sketch:
                generators = [
                    _generator(seed, block.name, side, b)
                    for b in range(-(-dim // SPARSE_GENERATION_ROWS))
                ]
                shape = (self.nnz, SPARSE_GENERATION_ROWS)
                tables = [
                    (
                        torch.randint(0, k, shape, generator=g),
                        torch.randint(0, 2, shape, generator=g),
                    )
                    for g in generators
                ]
                buckets = torch.cat([table[0] for table in tables], 1)[:, :dim].to(like.device)
                signs = torch.cat([table[1] for table in tables], 1)[:, :dim].mul_(2).sub_(1)
                signs = signs.to(like.device, torch.int8)
                # int64 buckets (also offset by slice) and int8 signs
                return CountSketch(dim, k, buckets, signs), 17 * self.nnz * dim
            n_blocks = -(-dim // DENSE_GENERATION_ROWS)
            generators = [_generator(seed, block.name, side, b) for b in range(n_blocks)]
            if self.variant == "dense":
                shape = (DENSE_GENERATION_ROWS, k)
                rows = torch.cat([torch.randn(shape, generator=g) for g in generators])[:dim]
                matrix = rows.div_(math.sqrt(k)).to(like.device, like.dtype)
                return Factor(dim, k, matrix=matrix), matrix.numel() * matrix.element_size()
            keys = torch.cat([torch.rand(DENSE_GENERATION_ROWS, generator=g) for g in generators])
            index = torch.argsort(keys[:dim])[:k].sort().values.to(like.device)
            return Factor(dim, k, index=index, scale=math.sqrt(dim / k)), 8 * k

        return self._cached(key, seed, make)

    def _jl_tables(self, block: Block, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's sparse JL hash tables ``(buckets, signs)``, each ``(nnz, k'_out·k'_in)``,
        on the CPU (not cached: :meth:`_jl` and :meth:`_jl_matrix` cache what they build)."""
        size = block.k_rows * block.k_cols
        return SparseJLProjector(block.dim, self.nnz)._tables(
            derive_seed(seed, block.name, "jl"), 0, size
        )

    def _jl(self, block: Block, seed: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        size = block.k_rows * block.k_cols
        key = (block.name, "jl", size, block.dim, str(like.device), like.dtype)

        def make():
            tables = self._jl_tables(block, seed)
            buckets, signs = tables[0].to(like.device), tables[1].to(like.device, like.dtype)
            return (buckets, signs), 8 * buckets.numel() + signs.numel() * signs.element_size()

        return self._cached(key, seed, make)

    def _jl_matrix(self, block: Block, seed: int, like: torch.Tensor) -> torch.Tensor:
        """The block's sparse JL as a ``(dim, k'_out·k'_in)`` CSR matrix (row: an output
        coordinate, its entries the signed products hashed there): applied as one sparse-dense
        product, a quarter to a third faster on the CPU than ``nnz`` scatter-adds of the
        products, with the same sums."""
        size = block.k_rows * block.k_cols
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        key = (block.name, "jl-csr", size, block.dim, str(like.device), dtype)

        def make():
            buckets, signs = self._jl_tables(block, seed)
            matrix = hashed_csr(buckets, signs.to(dtype), block.dim).to(like.device)
            return matrix, (8 + dtype.itemsize) * self.nnz * size + 8 * (block.dim + 1)

        return self._cached(key, seed, make)

    def block_matrix(self, block: Block, seed: int) -> torch.Tensor:
        """The whole ``(rows·cols, dim)`` map of one block (float64 CPU), for tests and small
        layers: features are ``vec(G) @ block_matrix`` with ``G`` row-major, bias included."""
        like = torch.zeros((), dtype=torch.float64)
        if block.pooled:
            return torch.eye(block.size, dtype=like.dtype)
        if block.sketch:
            identity = torch.eye(block.size, dtype=like.dtype).unflatten(
                1, (block.rows, block.cols)
            )
            return self.apply_map(block, identity, seed)
        rows = self.factor(block, 0, seed, like).dense(like)
        cols = self.factor(block, 1, seed, like).dense(like)
        matrix = torch.kron(rows, cols)
        if not block.sparse_jl:
            return matrix
        buckets, signs = self._jl(block, seed, like)
        jl = torch.zeros(matrix.shape[1], block.dim, dtype=like.dtype)
        for j in range(self.nnz):
            jl[torch.arange(matrix.shape[1]), buckets[j]] += signs[j]
        return matrix @ jl

    def apply_map(self, block: Block, matrices: torch.Tensor, seed: int) -> torch.Tensor:
        """The block's map applied to materialised gradients ``(batch, rows, cols)`` (bias
        included): ``(batch, dim)``; a pooled block's whole gradients ``(batch, rows·cols)``."""
        if block.pooled:
            return matrices.reshape(len(matrices), -1)
        if block.sketch:
            out = matrices.new_zeros(len(matrices), block.dim)
            for buckets, signs in self._hashed_coordinates(block, seed, matrices):
                out.index_add_(1, buckets, (matrices * signs).flatten(1))
            return out.div_(math.sqrt(self.nnz))
        rows = self.factor(block, 0, seed, matrices)
        cols = self.factor(block, 1, seed, matrices)
        columns_first, rows_first = _product_costs(block)
        if columns_first <= rows_first:
            reduced = rows.along(cols.along(matrices, 2), 1)
        else:
            reduced = cols.along(rows.along(matrices, 1), 2)
        return self._finish(block, reduced.reshape(len(matrices), -1), seed)

    def _hashed_coordinates(self, block: Block, seed: int, like: torch.Tensor):
        """For each of the sketch's slices: the bucket (among all ``dim``) of every coordinate
        ``(i, j)``, flattened row-major, and its sign as a ``(rows, cols)`` matrix."""
        rows = self.factor(block, 0, seed, like)
        cols = self.factor(block, 1, seed, like)
        row_signs, col_signs = rows.signs.to(like.dtype), cols.signs.to(like.dtype)
        for index in range(self.nnz):
            buckets = rows.buckets[index].unsqueeze(1) + cols.buckets[index]
            buckets = buckets.remainder_(rows.width).add_(index * rows.width)
            yield buckets.reshape(-1), row_signs[index].unsqueeze(1) * col_signs[index]

    def _finish(self, block: Block, products: torch.Tensor, seed: int) -> torch.Tensor:
        if block.sketch:  # the summed spectra of each slice
            spectra = products.unflatten(1, (self.nnz, -1))
            sketches = torch.fft.irfft(spectra, n=block.k_rows).flatten(1)
            return sketches.div_(math.sqrt(self.nnz))
        if not block.sparse_jl or block.pooled:
            return products
        return self._sparse_jl(block, products.T, seed)

    def _finish_columns(self, block: Block, columns: torch.Tensor, seed: int) -> torch.Tensor:
        """:meth:`_finish` of products laid out one example per column ``(size, batch)``:
        ``(batch, width)``, a pooled block's a transposed view of ``columns``."""
        return columns.T if block.pooled else self._sparse_jl(block, columns, seed)

    def _sparse_jl_of_products(
        self, block: Block, rows: torch.Tensor, cols: torch.Tensor, seed: int
    ) -> torch.Tensor:
        """The block's sparse JL of one-position products ``rows[i] ⊙ cols[j]`` (``(k'_out,
        batch)`` and ``(k'_in, batch)``, one example per column), formed and mapped a slab of
        rows at a time (:func:`~datatrace.grads.projectors.outer_product_jl`): ``(batch,
        dim)``, equal to :meth:`_sparse_jl` of all products up to the order of the sums."""
        per_slab = slab_rows(cols.shape[0])
        size = block.k_rows * block.k_cols
        dtype = rows.dtype if rows.dtype in (torch.float32, torch.float64) else torch.float32
        key = (block.name, "jl-slabs", size, block.dim, per_slab, str(rows.device), dtype)

        def make():
            buckets, signs = self._jl_tables(block, seed)
            matrices = slab_matrices(buckets, signs.to(dtype), block.dim, block.k_cols, per_slab)
            nbytes = (8 + dtype.itemsize) * self.nnz * size + 8 * (block.dim + 1) * len(matrices)
            return [matrix.to(rows.device) for matrix in matrices], nbytes

        return outer_product_jl(rows, cols, self._cached(key, seed, make), per_slab)

    def _sparse_jl(self, block: Block, columns: torch.Tensor, seed: int) -> torch.Tensor:
        """The block's sparse JL of products laid out one example per column
        ``(k'_out·k'_in, batch)``: ``(batch, dim)``. The CSR product reads ``columns`` fastest
        when contiguous (a transposed view costs about as much again)."""
        matrix = self._jl_matrix(block, seed, columns)
        return (matrix @ columns.to(matrix.dtype)).T

    # -- the features -------------------------------------------------------------------------

    def features(
        self,
        model: nn.Module,
        task: Task,
        param_names: Sequence[str],
        state: Mapping[str, torch.Tensor],
        batch: Any,
        seed: int,
    ) -> torch.Tensor:
        """Projected per-example gradients of ``task.output`` under ``state``.

        Args:
            model: the module (its own parameters are never modified).
            task: defines the output.
            param_names: the parameters to differentiate, as in ``model.named_parameters()``.
            state: every parameter and buffer of the model, by name.
            batch: examples along the first dimension of every tensor.
            seed: determines the map together with the plan.

        Returns:
            ``(batch_size, plan.output_dim)`` features, in the activations' dtype.
        """
        plan = self.plan(model, param_names)
        return self._features(plan, model, task, state, batch, seed)[0]

    def features_and_out_to_loss(
        self,
        model: nn.Module,
        task: Task,
        param_names: Sequence[str],
        state: Mapping[str, torch.Tensor],
        batch: Any,
        seed: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`features` and, where the task computes both from one forward pass
        (:func:`~datatrace.tasks.base.fuses_out_to_loss`), the out-to-loss weights ``Q``
        ``(batch_size,)`` of that same forward pass (detached); else ``None``, and the caller
        computes ``Q`` as usual."""
        plan = self.plan(model, param_names)
        return self._features(plan, model, task, state, batch, seed, fuses_out_to_loss(task))

    def _features(self, plan, model, task, state, batch, seed, out_to_loss=False):
        if self.check_examples and not any(known is task for known in plan.checked):
            self._check(plan, model, task, state, batch, seed)
        hooked = [block for block in plan.blocks if block.name not in plan.moved]
        norms = plan.hooked_norms()
        features, bad, grads, weights = self._hooked_features(
            plan, model, task, state, batch, seed, hooked, norms, out_to_loss
        )
        self._move(plan, bad)
        by_vmap = [block for block in plan.blocks if block.name in plan.moved]
        names = [name for block in by_vmap for name in block.params] + plan.vmap_names()
        parts = []
        if names:
            grads.update(PerExampleGradients(model, task, names).gradients(state, batch))
        with without_autocast():
            grads = {name: full_precision(grad) for name, grad in grads.items()}
            for block in by_vmap:
                features[block.name] = self.apply_map(block, _matrices(block, grads), seed)
            pool = [grads[name] for name in plan.fallback_names]
            outers, fallback_seed = {}, derive_seed(seed, "fallback")
            projector = plan.fallback_projector
            for block in plan.pooled:
                value = features[block.name]
                if isinstance(value, _Outer):
                    if isinstance(projector, SparseJLProjector):
                        # its products mapped a slab at a time; a placeholder keeps the indices
                        outers[len(pool)] = value
                        value = value.rows.new_zeros(value.rows.shape[1], 0)
                    else:
                        value = value.as_features()
                pool.append(value)
            if pool:
                fallback = projector.project(pool, fallback_seed)
                for index, outer in outers.items():
                    fallback = fallback + projector.project_outer(
                        outer.rows, outer.cols, fallback_seed, index
                    ).to(fallback.dtype)
                parts.append(fallback)
            parts = [features[block.name] for block in plan.blocks if not block.pooled] + parts
            features = torch.cat([part.to(parts[0].dtype) for part in parts], dim=1)
        return features, None if weights is None else full_precision(weights)

    def _check(self, plan, model, task, state, batch, seed) -> None:
        # In full precision: what is checked is where the hooks apply, not rounding.
        with without_autocast():
            self._check_hooks(plan, model, task, state, batch, seed)

    def _check_hooks(self, plan, model, task, state, batch, seed) -> None:
        plan.checked.append(task)
        blocks = [block for block in plan.blocks if block.name not in plan.moved]
        norms = plan.hooked_norms()
        if not blocks and not norms:
            return
        count = min(self.check_examples, batch_size_of(batch))
        few = map_tensors(lambda tensor: tensor[:count], batch)
        hooked, differing, norm_grads, _ = self._hooked_features(
            plan, model, task, state, few, seed, blocks, norms
        )
        norm_names = [name for norm in norms for name in norm[2:] if name]
        names = [name for block in blocks for name in block.params] + norm_names
        grads = PerExampleGradients(model, task, names).gradients(state, few)
        maps = [self.apply_map(block, _matrices(block, grads), seed) for block in blocks]
        compared = [
            (block.name, _materialised(hooked.get(block.name)), m) for block, m in zip(blocks, maps)
        ]
        compared += [(name, norm_grads.get(name), grads[name]) for name in norm_names]
        for name, value, reference in compared:
            if name in differing:
                continue
            error = torch.linalg.vector_norm(value - reference).item()
            scale = torch.linalg.vector_norm(reference).item()
            if not error <= math.sqrt(torch.finfo(reference.dtype).eps) * scale:
                differing[name] = (
                    f"relative difference {error / scale:.2g}"
                    if scale > 0
                    else f"features of norm {error:.2g} where per-example gradients are zero"
                )
        self._move(plan, differing)

    def _move(self, plan: FactorizedPlan, reasons: dict[str, str]) -> None:
        if not reasons:
            return
        plan.moved.update(reasons)
        listed = "; ".join(f"{name} ({why})" for name, why in reasons.items())
        warnings.warn(
            f"factorised gradient features disagree with per-example gradients for {listed}. "
            "Their weights are used outside their module's forward (e.g. through a functional "
            "call), examples interact in the forward pass, or the inputs are not batched along "
            "the first dimension. These blocks are computed from per-example gradients (vmap) "
            "from now on, with the same projection: slower, same numbers.",
            FactorizationWarning,
            stacklevel=3,
        )

    def _hooked_features(
        self, plan, model, task, state, batch, seed, blocks, norms=(), out_to_loss=False
    ):
        """Features of ``blocks`` and per-example gradients of the affine parameters of
        ``norms`` from one batched forward and backward with hooks, the blocks and parameters
        whose calls the hooks could not map to examples (with why), and ``Q`` of the batch from
        the same forward (``task.output_and_out_to_loss``) if ``out_to_loss``, else ``None``."""
        n = batch_size_of(batch)
        wanted = {block.name for block in blocks}
        calls: list[_Call] = []
        bad: dict[str, str] = {}

        expanded: list[nn.Module] = []

        def hook_for(kind: str, name: str):
            def hook(module, inputs, output):
                if (
                    kind == "embedding"
                    and inputs
                    and inputs[0].shape[:1] == (1,)
                    and n > 1
                    and id(module) not in plan.unexpanded
                ):
                    # Ids shared by the batch (GPT-2's position ids), broadcast onto it later:
                    # the output expanded to the batch has a gradient per example.
                    expanded.append(module)
                    ids = inputs[0].expand(n, *inputs[0].shape[1:])
                    output = output.expand(n, *output.shape[1:]).clone()
                    calls.append(_Call(name, kind, module, ids, output, version=output._version))
                    return output
                if not inputs or inputs[0].dim() < BATCHED_DIMS[kind] or not _rows_of(inputs[0], n):
                    bad[name] = "inputs not batched along the first dimension"
                    return None
                calls.append(_Call(name, kind, module, inputs[0], output, version=output._version))
                return _guarded(output, module, plan)

            return hook

        def norm_hook_for(kind: str, norm_params: tuple[str | None, str | None]):
            def hook(module, inputs, output):
                call = _Call("", kind, module, None, output, norm_params)
                x = inputs[0] if inputs else None
                if x is None or not _rows_of(x, n) or not check_shapes(module, kind, x):
                    bad.update(dict.fromkeys(call.names(), "inputs not batched along dim 0"))
                    return None
                call.block, call.inputs = call.names()[0], x
                call.norm_state = normalisation_state(module, kind)
                call.version = output._version
                calls.append(call)
                return _guarded(output, module, plan)

            return hook

        if not blocks and not norms:
            return {}, bad, {}, None
        params = {"model." + name: t.detach() for name, t in module_state(model, state).items()}
        for block in blocks:
            params["model." + block.name].requires_grad_(True)
        handles = [
            module.register_forward_hook(hook_for(kind, name))
            for module, kind, name in plan.modules
            if name in wanted
        ]
        for module, kind, weight, bias in norms:
            for name in (weight, bias):
                if name:
                    params["model." + name].requires_grad_(True)
            handles.append(module.register_forward_hook(norm_hook_for(kind, (weight, bias))))
        fn = task.output_and_out_to_loss if out_to_loss else task.output
        try:
            with _eval_mode(model), torch.enable_grad():
                result = functional_call(_Bound(model, fn), params, (batch,))
        except Exception:
            if not expanded:
                raise
            # the model could not take a shared-ids embedding's output expanded to the batch
            plan.unexpanded.update(id(module) for module in expanded)
            return self._hooked_features(
                plan, model, task, state, batch, seed, blocks, norms, out_to_loss
            )
        finally:
            for handle in handles:
                handle.remove()
        changed = [call for call in calls if call.output._version != call.version]
        for call in changed:
            if id(call.module) in plan.copied_outputs:  # changed although copied: not by hooks
                bad.update(dict.fromkeys(call.names(), "its output changes after the hook"))
        changed = [call for call in changed if id(call.module) not in plan.copied_outputs]
        if changed:
            # A later in-place operation (e.g. ReLU(inplace=True)) changed a hooked output, so its
            # gradient would be the changed tensor's: run again with those outputs copied.
            plan.copied_outputs.update(id(call.module) for call in changed)
            return self._hooked_features(
                plan, model, task, state, batch, seed, blocks, norms, out_to_loss
            )
        output, weights = result if out_to_loss else (result, None)
        total = output.sum()
        weights = None if weights is None else weights.detach()
        calls = [
            call
            for call in calls
            if call.output.requires_grad and not any(name in bad for name in call.names())
        ]
        if calls and total.requires_grad:
            grads = torch.autograd.grad(total, [call.output for call in calls], allow_unused=True)
        else:  # no hooked call reaches the output: its gradients are zero
            grads = [None] * len(calls)
        by_block = {block.name: block for block in blocks}
        sums: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        paths: dict[str, set[str]] = defaultdict(set)
        like = full_precision(total.detach())
        norm_grads: dict[str, torch.Tensor] = {}
        # Under autocast the forward and backward ran in 16 bits; the projections do not.
        with torch.no_grad(), without_autocast():
            for call, grad in zip(calls, grads):
                if grad is None:
                    continue
                grad, call.inputs = full_precision(grad.detach()), full_precision(call.inputs)
                if call.norm_params is not None:
                    _add_norm_gradients(call, grad, norm_grads, n)
                    continue
                block = by_block[call.block]
                path, term = self._term(block, call, grad, n, seed)
                paths[block.name].add("factorized" if path in (COLUMNS, PROJECTED, OUTER) else path)
                parts = sums[block.name]
                if path == OUTER:
                    parts.setdefault(OUTER, []).append(term)
                    continue
                # the first call's term as it is; a second call of the block (tied weights) adds
                parts[path] = parts[path] + term if path in parts else term
            features = {}
            for block in blocks:
                if block.name in bad:
                    continue
                parts = sums[block.name]
                outers = parts.pop(OUTER, [])
                if len(outers) == 1 and not parts:  # mapped by the fallback a slab at a time
                    features[block.name] = outers[0]
                    block.path = "+".join(sorted(paths[block.name])) or block.path
                    continue
                for outer in outers:  # several calls: their products summed
                    products = outer.products()
                    parts[COLUMNS] = parts[COLUMNS] + products if COLUMNS in parts else products
                terms = []
                if "factorized" in parts:
                    terms.append(self._finish(block, parts["factorized"].reshape(n, -1), seed))
                if COLUMNS in parts:
                    terms.append(self._finish_columns(block, parts[COLUMNS].reshape(-1, n), seed))
                if PROJECTED in parts:
                    terms.append(parts[PROJECTED])
                if "materialized" in parts:
                    terms.append(self.apply_map(block, parts["materialized"], seed))
                # A single term as it is: a pooled block's columns stay a transposed view,
                # which the fallback's CSR product reads without a copy.
                out = sum(terms[1:], terms[0]) if terms else like.new_zeros(n, block.width)
                features[block.name] = out.to(like.dtype)
                block.path = "+".join(sorted(paths[block.name])) or block.path
            named = dict(model.named_parameters())
            for _, _, *names in norms:
                for name in names:
                    if name and name not in bad and name not in norm_grads:
                        # no call reached the output: a zero gradient
                        norm_grads[name] = like.new_zeros(n, *named[name].shape)
        return features, bad, norm_grads, weights

    def _term(self, block: Block, call: _Call, grad: torch.Tensor, n: int, seed: int):
        """``("factorized", Σ_t (F_outᵀ u_t)(F_inᵀ v_t)ᵀ)`` or ``("materialized", Σ_t u_t v_tᵀ)``
        for one call, ``u``/``v`` the vectors along the block's rows/columns."""
        inputs, kind, module = call.inputs.detach(), call.kind, call.module
        if kind in ("conv1d", "conv2d"):  # rows of one example are its positions (_rows_of)
            output_side = grad.flatten(2).transpose(1, 2).reshape(n, -1, grad.shape[1])
        else:
            output_side = grad.reshape(n, -1, grad.shape[-1])
        positions = output_side.shape[1]
        if self._positions is not None:
            self._positions[block.name] = max(self._positions.get(block.name, 0), positions)
        input_axis = INPUT_AXIS[kind]
        augmented = block.bias_axis is not None
        if kind == "embedding":
            inputs = inputs.reshape(n, -1)
        elif kind in ("linear", "hf_conv1d"):
            inputs = inputs.reshape(n, -1, inputs.shape[-1])
        if self._materialise(block, kind, positions, n, grad.element_size()):
            input_side = self._dense_input(inputs, module, kind, block, augmented, grad)
            input_side = input_side.reshape(n, -1, input_side.shape[-1])
            u, v = (output_side, input_side) if input_axis == 1 else (input_side, output_side)
            return "materialized", torch.einsum("nsr,nsc->nrc", u, v)
        if block.sketch:
            return "factorized", self._spectrum(block, call, inputs, output_side, seed, grad)
        input_factor = self.factor(block, input_axis, seed, grad)
        output_factor = self.factor(block, 1 - input_axis, seed, grad)
        if kind in ("conv1d", "conv2d") and input_factor.identity and output_factor.identity:
            if self._by_columns(block, grad):
                return COLUMNS, _whole_conv_gradient(call, grad, n, augmented, columns=True)
            return "factorized", _whole_conv_gradient(call, grad, n, augmented)
        projected_output = output_factor.vectors(output_side, False)
        if kind == "embedding" and input_factor.identity:
            # every row kept: scatter each position's output gradient into its id's row
            if module.padding_idx is not None:
                keep = (inputs != module.padding_idx).unsqueeze(-1)
                projected_output = projected_output * keep
            out = projected_output.new_zeros(n * block.rows, projected_output.shape[-1])
            rows = inputs + torch.arange(n, device=inputs.device).unsqueeze(1) * block.rows
            out.index_add_(0, rows.reshape(-1), projected_output.reshape(-1, out.shape[1]))
            return "factorized", out.reshape(n, block.rows, -1)
        if kind == "embedding":
            projected_input = input_factor.dense(grad)[inputs]
            if module.padding_idx is not None:
                projected_input = projected_input * (inputs != module.padding_idx).unsqueeze(-1)
        elif kind in ("conv1d", "conv2d") and input_factor.index is not None:
            projected_input = _masked_patches(input_factor, inputs, module, kind, augmented)
        elif kind in ("conv1d", "conv2d") and not input_factor.identity:
            projected_input = self._conv_input(input_factor, inputs, module, kind, augmented, grad)
        else:
            raw = _unfold(inputs, module, kind) if kind in ("conv1d", "conv2d") else inputs
            raw = raw.reshape(n, -1, raw.shape[-1])
            one_position_columns = raw.shape[1] == 1 and self._by_columns(block, grad)
            if input_factor.identity and augmented and not one_position_columns:
                # the bias coordinate's term is the summed output side, appended to the
                # products: no column of ones on every position's input (a copy of the patches;
                # at one position laid out by columns, the general path below appends the 1)
                bias = projected_output.sum(1)
                if input_axis == 1:
                    products = torch.einsum("nsr,nsc->nrc", projected_output, raw)
                    return "factorized", torch.cat([products, bias.unsqueeze(2)], 2)
                products = torch.einsum("nsr,nsc->nrc", raw, projected_output)
                return "factorized", torch.cat([products, bias.unsqueeze(1)], 1)
            projected_input = input_factor.vectors(raw, augmented)
        projected_input = projected_input.reshape(n, -1, projected_input.shape[-1])
        u, v = (
            (projected_output, projected_input)
            if input_axis == 1
            else (projected_input, projected_output)
        )
        if u.shape[1] == 1 and self._by_columns(block, grad):
            rows, cols = u[:, 0].T.contiguous(), v[:, 0].T.contiguous()
            if block.pooled:  # _by_columns: pooled, or mapped by its own sparse JL
                return OUTER, _Outer(rows, cols)
            return PROJECTED, self._sparse_jl_of_products(block, rows, cols, seed)
        return "factorized", torch.einsum("nsr,nsc->nrc", u, v)

    @staticmethod
    def _by_columns(block: Block, like: torch.Tensor) -> bool:
        """Whether a call's products are laid out one example per column, ``(rows, cols,
        batch)`` (a one-position call's outer products, a whole conv gradient): on the CPU, for
        the blocks a sparse JL maps (their own, or the fallback's when pooled) as a CSR
        product, which reads that layout. Formed ``(batch, rows, cols)`` and then copied to it,
        one-position products take three times as long (256 × 104 × 103 products and a
        672-row map: 2.3 ms against 7.1 ms, one thread)."""
        return like.device.type == "cpu" and (block.pooled or block.sparse_jl)

    def _spectrum(self, block, call, inputs, output_side, seed, like) -> torch.Tensor:
        """``Σ_t FFT(CS_out(u_t)) ⊙ FFT(CS_in(v_t))`` of each slice for one call:
        ``(batch, nnz, width // 2 + 1)``."""
        kind, module = call.kind, call.module
        input_axis = INPUT_AXIS[kind]
        augmented = block.bias_axis is not None
        input_sketch = self.factor(block, input_axis, seed, like)
        output_sketch = self.factor(block, 1 - input_axis, seed, like)
        n, positions = output_side.shape[:2]
        if kind in ("conv1d", "conv2d"):
            inputs = _unfold(inputs, module, kind)
            inputs = inputs.reshape(n, -1, inputs.shape[-1])
        spectrum_bytes = 2 * like.element_size() * self.nnz * (block.k_rows // 2 + 1)
        step = max(1, SKETCH_WORK_BYTES // (n * spectrum_bytes))
        total = 0
        for lo in range(0, positions, step):
            part = slice(lo, lo + step)
            if kind == "embedding":
                projected_input = input_sketch.one_hot(inputs[:, part], like)
                if module.padding_idx is not None:
                    keep = inputs[:, part] != module.padding_idx
                    projected_input = projected_input * keep[..., None, None]
            else:
                projected_input = input_sketch.vectors(inputs[:, part], augmented)
            projected_output = output_sketch.vectors(output_side[:, part], False)
            spectra = torch.fft.rfft(projected_input) * torch.fft.rfft(projected_output)
            total = total + spectra.sum(1)
        return total

    def _materialise(self, block: Block, kind: str, positions: int, n: int, itemsize: int):
        """The cost rule (module docstring), in multiply-adds per example: not for FactGraSS."""
        masks = self.variant == "sparse" or (self.variant == "hybrid" and not block.sketch)
        if masks or n * block.size * itemsize > MATERIALISE_BYTES:
            return False
        if block.sketch:
            row_cost = self.nnz * (1 if kind == "embedding" else block.rows)
            fft_cost = FFT_COST * block.dim * math.log2(max(block.k_rows, 2))
            factorised = positions * (row_cost + self.nnz * block.cols + fft_cost)
            forming = positions * (block.cols if kind == "embedding" else block.size)
            return forming + self.nnz * block.size <= factorised
        rows, cols, k_rows, k_cols = block.rows, block.cols, block.k_rows, block.k_cols
        row_cost = 0 if k_rows == rows else (k_rows if kind == "embedding" else rows * k_rows)
        col_cost = 0 if k_cols == cols else cols * k_cols
        factorised = positions * (row_cost + col_cost + k_rows * k_cols)
        forming = positions * (cols if kind == "embedding" else rows * cols)
        return forming + min(_product_costs(block)) <= factorised

    @staticmethod
    def _dense_input(inputs, module, kind, block, augmented, like):
        if kind == "embedding":
            dense = nn.functional.one_hot(inputs, block.rows).to(like.dtype)
            if module.padding_idx is not None:
                dense[..., module.padding_idx] = 0
            return dense
        if kind in ("conv1d", "conv2d"):
            inputs = _unfold(inputs, module, kind)
        return torch.cat([inputs, torch.ones_like(inputs[..., :1])], -1) if augmented else inputs

    @staticmethod
    def _conv_input(factor: Factor, inputs, module, kind, augmented, like):
        """``F_inᵀ`` of every patch as a convolution with ``k_in`` filters: no unfolded copy."""
        matrix = factor.dense(like)
        width = matrix.shape[0] - augmented
        filters = matrix[:width].T.reshape(factor.k, *module.weight.shape[1:])
        conv = nn.functional.conv1d if kind == "conv1d" else nn.functional.conv2d
        out = conv(inputs, filters, None, module.stride, module.padding, module.dilation)
        out = out.flatten(2).transpose(1, 2)
        return out + matrix[-1] if augmented else out


def _whole_conv_gradient(
    call: _Call, grad: torch.Tensor, n: int, augmented: bool, columns: bool = False
) -> torch.Tensor:
    """A conv's per-example weight gradient ``(n, out, in·kernel [+ 1])``, ``Σ_t g_t ⊗ patch_t``
    over its positions and the rows of each example (:func:`_rows_of`), with the bias column
    ``Σ_t g_t``; with ``columns``, laid out ``(out, in·kernel [+ 1], n)`` for a sparse JL's CSR
    product (one copy where the bias column's concatenation and a transposed copy are two: 10
    against 15 ms with the product, 256 × 64 × 289, one thread). Computed as the weight
    gradient of one grouped convolution with a group per row (the rows stacked as channels of
    one sample): the convolution backward kernels, without unfolding the patches (3.6× faster
    than unfolded patches times the output gradients on a 32 → 64-channel 3 × 3 conv at
    14 × 14, batch 256, one thread)."""
    module, inputs = call.module, call.inputs.detach()
    rows, channels = inputs.shape[:2]
    out = grad.shape[1]
    spatial = inputs.dim() - 2
    padding = (0,) * spatial if module.padding == "valid" else tuple(module.padding)
    shape = (rows * out, channels, *module.kernel_size)
    _, weights, _ = torch.ops.aten.convolution_backward(
        grad.reshape(1, rows * out, *grad.shape[2:]),
        inputs.reshape(1, rows * channels, *inputs.shape[2:]),
        inputs.new_empty(shape),  # only its shape is read
        None,
        list(module.stride),
        list(padding),
        list(module.dilation),
        False,
        [0] * spatial,
        rows,
        [False, True, False],
    )
    products = weights.reshape(n, -1, out, channels * math.prod(module.kernel_size))
    # one row per example (no view of the batch as more rows): the sum over one row is a copy
    products = products[:, 0] if products.shape[1] == 1 else products.sum(1)
    bias = grad.flatten(2).sum(2).reshape(n, -1, out).sum(1) if augmented else None
    if columns:
        width = products.shape[2]
        laid_out = products.new_empty(out, width + augmented, n)
        laid_out[:, :width].copy_(products.permute(1, 2, 0))
        if augmented:
            laid_out[:, width].copy_(bias.T)
        return laid_out
    return products if bias is None else torch.cat([products, bias.unsqueeze(2)], 2)


class _Outer:
    """A pooled one-position block's features left as the two sides of its outer products,
    ``rows`` ``(R, batch)`` and ``cols`` ``(C, batch)``, for the fallback's sparse JL to map a
    slab at a time (:meth:`SparseJLProjector.project_outer`)."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor):
        self.rows, self.cols = rows, cols

    def products(self) -> torch.Tensor:
        """The products ``(R, C, batch)``, one example per column."""
        return self.rows.unsqueeze(1) * self.cols.unsqueeze(0)

    def as_features(self) -> torch.Tensor:
        """The block's whole gradient of every example, ``(batch, R·C)`` row-major."""
        return self.products().reshape(-1, self.rows.shape[1]).T


def _materialised(value):
    return value.as_features() if isinstance(value, _Outer) else value


def _guarded(output: torch.Tensor, module: nn.Module, plan: FactorizedPlan):
    """What a forward hook returns: a copy of the output of a module whose output a later
    in-place operation was seen to change (so the hooked tensor keeps its value and its
    gradient), else ``None`` (the output as it is: no copy of every activation)."""
    return output.clone() if id(module) in plan.copied_outputs else None


def _masked_patches(factor: Factor, inputs, module, kind, augmented) -> torch.Tensor:
    """A mask's ``F_inᵀ`` of every patch, ``(batch, positions, k_in)``: the kept patch
    coordinates ``(channel, offsets)`` gathered from the padded input at every output position
    (a gather of ``k_in`` values per position, where a convolution with one-hot filters would
    multiply ``in·kernel`` of them), times the mask's scale; the bias coordinate is the scale."""
    spatial = 1 if kind == "conv1d" else 2
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    padding = (0,) * spatial if module.padding == "valid" else module.padding
    padded = nn.functional.pad(inputs, [p for size in reversed(padding) for p in (size, size)])
    width = math.prod(kernel) * inputs.shape[1]
    index = factor.index
    coordinates = index.clamp(max=width - 1)
    # coordinate = channel·prod(kernel) + offsets in the kernel, row-major like the weight
    offsets, channel = [], coordinates // math.prod(kernel)
    rest = coordinates % math.prod(kernel)
    for axis in range(spatial):
        inner = math.prod(kernel[axis + 1 :])
        offsets.append(rest // inner)
        rest = rest % inner
    outputs = [
        (inputs.shape[2 + axis] + 2 * padding[axis] - dilation[axis] * (kernel[axis] - 1) - 1)
        // stride[axis]
        + 1
        for axis in range(spatial)
    ]
    k = len(index)
    selectors = [channel.reshape(k, *([1] * spatial))]
    for axis in range(spatial):
        steps = torch.arange(outputs[axis], device=inputs.device) * stride[axis]
        position = offsets[axis].unsqueeze(1) * dilation[axis] + steps  # (k, outputs[axis])
        shape = [k] + [1] * spatial
        shape[1 + axis] = outputs[axis]
        selectors.append(position.reshape(shape))
    gathered = padded[(slice(None), *selectors)]  # (batch, k, *outputs)
    out = gathered.flatten(2).transpose(1, 2) * factor.scale
    if augmented:
        out[..., index == width] = factor.scale
    return out


def _rows_of(x: torch.Tensor, n: int) -> bool:
    """Whether ``x`` holds whole rows per example: ``n`` rows, or ``m·n`` rows taken as ``m``
    consecutive rows per example (a model that folds draws, or positions, into the batch
    example-major: ``(n, m, ...)`` reshaped to ``(n·m, ...)``); the first batch's safety check
    catches a model whose rows are laid out otherwise."""
    return x.dim() > 0 and x.shape[0] > 0 and x.shape[0] % n == 0


def _add_norm_gradients(call: _Call, grad: torch.Tensor, norm_grads: dict, n: int) -> None:
    """Add one normalisation call's per-example affine gradients into ``norm_grads`` (its rows
    summed per example, :func:`_rows_of`)."""
    values = affine_gradients(call.module, call.kind, call.inputs.detach(), grad, call.norm_state)
    for name, value in zip(call.norm_params, values):
        if value is not None and len(value) != n:
            value = value.reshape(n, -1, *value.shape[1:]).sum(1)
        if name and value is not None:
            norm_grads[name] = norm_grads[name] + value if name in norm_grads else value


def _product_costs(block: Block) -> tuple[int, int]:
    """Multiply-adds of ``F_outᵀ G F_in`` for one ``rows × cols`` matrix ``G``, reducing the
    columns first or the rows first (an identity factor costs nothing)."""

    def reduce(size: int, k: int, other: int) -> int:
        return 0 if k == size else size * k * other

    rows, cols, k_rows, k_cols = block.rows, block.cols, block.k_rows, block.k_cols
    return (
        reduce(cols, k_cols, rows) + reduce(rows, k_rows, k_cols),
        reduce(rows, k_rows, cols) + reduce(cols, k_cols, k_rows),
    )


def _matrices(block: Block, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-example gradients of a block as ``(batch, rows, cols)`` matrices, bias included."""
    weight = grads[block.params[0]]
    matrices = weight.reshape(weight.shape[0], weight.shape[1], -1)
    if block.bias_axis is None:
        return matrices
    bias = grads[block.params[1]]
    return torch.cat([matrices, bias.unsqueeze(1 + (block.bias_axis == 1))], 1 + block.bias_axis)
