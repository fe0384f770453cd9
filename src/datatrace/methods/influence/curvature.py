"""The damped inverse curvature ``(H + λI)⁻¹`` of one checkpoint, block by block, and the
fitting of the stages it needs.

Per Kronecker layer, with ``G`` its ``(out, in)`` gradient matrix:

- ``"ekfac"``: ``H = (Q_A ⊗ Q_S) diag(Λ) (Q_A ⊗ Q_S)ᵀ`` with EK-FAC's corrected eigenvalues
  ``Λ``, applied as ``Q_S [(Q_Sᵀ G Q_A) / (Λ + λ)] Q_Aᵀ`` (or, to a gradient given in the
  eigenbasis, as the division alone);
- ``"kfac"``: the same with ``Λ = λ_S λ_Aᵀ``, i.e. ``H = A ⊗ S``;
- ``"diagonal"``: ``G / (D + λ)`` with ``D`` the diagonal of the empirical Fisher;
- ``"identity"``: ``G`` unchanged (``H = I`` and no damping: gradient dot products).

Fallback parameters (not in a Kronecker layer) always get the diagonal ``g / (D + λ)``, except
under ``"identity"``. Coordinates where ``Λ + λ = 0`` (no training example has a gradient
there, and no damping) are mapped to 0, the pseudo-inverse.

**Damping** ``λ`` is per block: ``damping · mean(Λ)`` (relative, the default: 0.1, the
heuristic of kronfluence; ``Λ`` is the block's eigenvalues, or its diagonal), or one absolute
value for every block (``damping_absolute``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from datatrace.data import Examples
from datatrace.methods.influence.factors import (
    FACTOR_DTYPE,
    corrected_eigenvalues_and_diagonal,
    eigendecomposition,
    kronecker_factors,
)
from datatrace.methods.influence.gradients import LayoutGradients
from datatrace.methods.influence.layers import Layout
from datatrace.methods.influence.stages import CurvatureStages

HESSIANS = ("ekfac", "kfac", "diagonal", "identity")
# Relative damping by default: λ = DEFAULT_DAMPING · mean eigenvalue of each block.
DEFAULT_DAMPING = 0.1


def stages_needed(hessian: str, layout: Layout) -> list[str]:
    """The stages a Hessian approximation reads, in the order they are fitted."""
    if hessian == "identity":
        return []
    if hessian == "diagonal":
        return ["diagonal"]
    needed = ["covariances", "eigen"] + (["corrected"] if hessian == "ekfac" else [])
    return needed + (["diagonal"] if layout.fallback else [])


def fit_stages(
    hessian: str,
    stages: CurvatureStages,
    model: torch.nn.Module,
    gradients: LayoutGradients,
    state: Mapping[str, torch.Tensor],
    train: Examples,
    batch_size: int,
    progress: bool,
) -> dict[str, dict[str, torch.Tensor]]:
    """Fit (or read back) every stage ``hessian`` needs; each is written as soon as it is done.

    Returns:
        ``{stage: {array name: values}}``.
    """
    layout = gradients.layout
    needed = stages_needed(hessian, layout)
    layers = range(len(layout.layers))
    if "covariances" in needed and not stages.has("covariances"):
        factors = (
            kronecker_factors(model, gradients, state, train, batch_size, progress)
            if layout.layers
            else []
        )
        arrays = {}
        for index, (activation, gradient) in enumerate(factors):
            arrays[f"activation_{index}"], arrays[f"gradient_{index}"] = activation, gradient
        stages.write("covariances", arrays)
    if "eigen" in needed and not stages.has("eigen"):
        covariances = stages.read("covariances")
        arrays = {}
        for index in layers:
            for side in ("activation", "gradient"):
                values, vectors = eigendecomposition(covariances[f"{side}_{index}"])
                arrays[f"{side}_values_{index}"] = values
                arrays[f"{side}_vectors_{index}"] = vectors
        stages.write("eigen", arrays)
    missing = [stage for stage in ("corrected", "diagonal") if stage in needed]
    missing = [stage for stage in missing if not stages.has(stage)]
    if missing:
        bases = None
        if "corrected" in missing:
            eigen = stages.read("eigen")
            bases = [
                (eigen[f"activation_vectors_{index}"], eigen[f"gradient_vectors_{index}"])
                for index in layers
            ]
        corrected, diagonal = corrected_eigenvalues_and_diagonal(
            gradients, state, train, batch_size, bases, progress
        )
        if corrected is not None:
            stages.write("corrected", {f"eigenvalues_{i}": v for i, v in enumerate(corrected)})
        if not stages.has("diagonal"):  # computed in the same pass: kept for the other Hessians
            stages.write("diagonal", {f"diagonal_{i}": v for i, v in enumerate(diagonal)})
    return {stage: stages.read(stage) for stage in needed}


class Curvature:
    """``(H + λI)⁻¹`` of one checkpoint, applied to gradients in a layout.

    Args:
        layout: the blocks.
        hessian: one of :data:`HESSIANS`.
        fitted: the stages :func:`fit_stages` returned.
        damping: relative damping (``λ = damping · mean eigenvalue`` of each block).
        damping_absolute: if given, ``λ`` of every block (overrides ``damping``).
        rotated: indices of the layers whose gradients are given to :meth:`precondition` in
            their eigenbasis, ``Q_Sᵀ G Q_A`` (the hooks form it from rotated factors, and the
            inverse is then a division); ignored under ``"diagonal"`` and ``"identity"``.

    Attributes:
        damping: ``(n_blocks,)`` the absolute ``λ`` of each block (0 under ``"identity"``).
        rotated: the layers of ``rotated`` that have an eigenbasis (K-FAC, EK-FAC).
        eigenvalues: per block, the eigenvalues (or diagonal) it is preconditioned with,
            ``(out, in)`` for a layer and ``(size,)`` for a fallback parameter; empty for
            ``"identity"``.
    """

    def __init__(
        self,
        layout: Layout,
        hessian: str,
        fitted: dict[str, dict[str, torch.Tensor]],
        damping: float,
        damping_absolute: float | None,
        rotated: Sequence[int] = (),
    ):
        self.layout, self.hessian = layout, hessian
        self.bases: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.eigenvalues: list[torch.Tensor] = []
        self.rotated: frozenset[int] = frozenset()
        if hessian == "identity":
            self.damping = np.zeros(len(layout.block_sizes))
            return
        for index in range(len(layout.layers)):
            if hessian == "diagonal":
                self.bases.append(None)
                self.eigenvalues.append(fitted["diagonal"][f"diagonal_{index}"])
                continue
            eigen = fitted["eigen"]
            self.bases.append(
                (eigen[f"activation_vectors_{index}"], eigen[f"gradient_vectors_{index}"])
            )
            if hessian == "ekfac":
                values = fitted["corrected"][f"eigenvalues_{index}"]
            else:
                # eigh of a PSD factor can give tiny negative eigenvalues from rounding
                activation = eigen[f"activation_values_{index}"].clamp_min(0)
                gradient = eigen[f"gradient_values_{index}"].clamp_min(0)
                values = torch.outer(gradient, activation)
            self.eigenvalues.append(values)
        for index in range(len(layout.layers), len(layout.block_sizes)):
            self.eigenvalues.append(fitted["diagonal"][f"diagonal_{index}"])
        self.rotated = frozenset(i for i in rotated if self.bases[i] is not None)
        self.damping = np.array(
            [
                float(damping_absolute)
                if damping_absolute is not None
                else float(damping) * float(values.mean())
                for values in self.eigenvalues
            ]
        )

    @property
    def gradient_bases(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per layer, the basis ``(Q_A, Q_S)`` its gradients are given in, or ``None`` (the
        layout's): what :class:`~.gradients.LayoutGradients` takes as ``bases``."""
        return [
            self.bases[index] if index in self.rotated else None
            for index in range(len(self.layout.layers))
        ]

    def precondition(self, gradients: torch.Tensor) -> torch.Tensor:
        """``(H + λI)⁻¹ g`` of each row of ``(n, p)`` gradients, in float64, in the layout's
        coordinates except the layers in ``rotated`` (given and returned in their eigenbasis:
        the same inner products with gradients in those coordinates)."""
        gradients = gradients.to(FACTOR_DTYPE)
        if self.hessian == "identity":
            return gradients
        blocks = self.layout.split(gradients)
        out = []
        for index, block in enumerate(blocks):
            inverse = _inverse(self.eigenvalues[index].to(block.device) + self.damping[index])
            basis = self.bases[index] if index < len(self.bases) else None
            if basis is None or index in self.rotated:
                out.append((block * inverse).flatten(1))
                continue
            q_a, q_s = (factor.to(block.device) for factor in basis)
            rotated = q_s.T @ block @ q_a
            out.append((q_s @ (rotated * inverse) @ q_a.T).flatten(1))
        return torch.cat(out, dim=1)


def _inverse(values: torch.Tensor) -> torch.Tensor:
    """``1 / values`` where positive, 0 elsewhere (the pseudo-inverse of a diagonal)."""
    positive = values > 0
    return torch.where(positive, 1 / torch.where(positive, values, 1), 0)
