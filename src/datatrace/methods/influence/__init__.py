"""Influence functions with Kronecker-factored (K-FAC, EK-FAC), diagonal or identity curvature.

- :mod:`.layers`: which parameters get a Kronecker block; per-layer inputs and output gradients.
- :mod:`.hooks`: the layers' inputs and output gradients from one batched pass with hooks.
- :mod:`.gradients`: per-example training-loss and measurement gradients in that layout (the
  layers' from the hooks, checked against vmap; the other parameters' from vmap).
- :mod:`.fisher`: the empirical or the sampled-label ("true") Fisher.
- :mod:`.factors`: the passes that fit the factors, eigenbases and corrected eigenvalues.
- :mod:`.stages`: the fitted stages in a datatrace store (resumable).
- :mod:`.curvature`: ``(H + λI)⁻¹`` block by block, with the damping.
- :mod:`.refine`: preconditioned CG refinement towards the exact damped inverse (as ASTRA).
- :mod:`.estimator`: :class:`InfluenceFunctions`, the estimator.
"""

from datatrace.methods.influence.curvature import DEFAULT_DAMPING, HESSIANS, Curvature
from datatrace.methods.influence.estimator import InfluenceFunctions
from datatrace.methods.influence.layers import KroneckerLayer, Layout, kronecker_layout

__all__ = [
    "DEFAULT_DAMPING",
    "HESSIANS",
    "Curvature",
    "InfluenceFunctions",
    "KroneckerLayer",
    "Layout",
    "kronecker_layout",
]
