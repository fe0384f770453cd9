"""The passes over the training set that fit the curvature: Kronecker factors, their
eigendecomposition, and EK-FAC's corrected eigenvalues with the diagonal Fisher.

All three estimate the Fisher ``F = (1/n) Σ_i ∇loss_i ∇loss_iᵀ`` of the training loss, with the
training labels (the empirical Fisher, the default) or with labels sampled from the model
(:mod:`.fisher`, classification only).

**Kronecker factors** of a layer (``G = Σ_t g_t a_tᵀ`` per example, :mod:`.layers`)::

    A = (1 / (n·T)) Σ_i Σ_t a_it a_itᵀ        (in × in, the 1 of the bias included)
    S = (1 / n)     Σ_i Σ_t g_it g_itᵀ        (out × out)

with ``g_it = ∂loss_i/∂y_it``, summed over the ``T`` positions of an example (tokens, pixels of
an unfolded convolution) and averaged over positions for ``A``, as kronfluence does. Then
``E[vec(G) vec(G)ᵀ] ≈ A ⊗ S`` when inputs and output gradients are independent and positions
uncorrelated; with one position it is exact when ``a`` and ``g`` are independent.

**Eigendecomposition**: ``A = Q_A diag(λ_A) Q_Aᵀ``, ``S = Q_S diag(λ_S) Q_Sᵀ`` (float64).

**Corrected eigenvalues** (EK-FAC, George et al. 2018): keep the eigenbasis ``Q_A ⊗ Q_S`` and
refit the diagonal there from per-example gradients, ``Λ = (1/n) Σ_i (Q_Sᵀ G_i Q_A)²``
(elementwise), the Fisher's exact diagonal in that basis; for a hooked layer the rotated gradient
is ``Σ_t (Q_Sᵀ g_it)(Q_Aᵀ a_it)ᵀ``, from the rotated factors where that costs less
(:class:`~.gradients.LayerGradients`). The same pass gives the diagonal Fisher
``(1/n) Σ_i ∇loss_i²`` of every block.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from datatrace.data import Examples, batch_size_of
from datatrace.methods.influence.gradients import FACTOR_DTYPE, LayoutGradients
from datatrace.methods.influence.hooks import LayerHooks, summed_loss
from datatrace.progress import progress_bar


def kronecker_factors(
    model: nn.Module,
    gradients: LayoutGradients,
    state: Mapping[str, torch.Tensor],
    examples: Examples,
    batch_size: int,
    progress: bool = True,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The factors ``(A, S)`` of every Kronecker layer of the layout, from one pass.

    Each batch runs forward and backward once with hooks on the layers (:mod:`.hooks`): the
    inputs' outer products add to ``A``, the output gradients' to ``S``. The model is in eval
    mode, so examples do not interact and the output gradient of example ``i`` is that of its
    own loss.

    Args:
        model: the module (never modified; hooks are removed after each batch).
        gradients: the layout and task (and the device).
        state: every parameter and buffer of the checkpoint, by name.
        examples: the training set.
        batch_size: examples per forward pass.

    Returns:
        Per layer, ``A`` ``(in, in)`` and ``S`` ``(out, out)`` in float64 on the CPU.
    """
    layout, device = gradients.layout, gradients.device
    sums = [
        [
            torch.zeros(layer.in_dim, layer.in_dim, dtype=FACTOR_DTYPE, device=device),
            torch.zeros(layer.out_dim, layer.out_dim, dtype=FACTOR_DTYPE, device=device),
        ]
        for layer in layout.layers
    ]
    positions = [0] * len(layout.layers)
    hooks = LayerHooks(model, layout)
    loss = summed_loss(gradients.task, "loss")
    every_layer = range(len(layout.layers))
    with progress_bar(examples.n, "Kronecker factors", progress) as advance:
        # prepared (checked, relabelled) before the hooks see any forward pass
        for batch in gradients.curvature_batches(state, examples, batch_size):
            calls, _, _ = hooks.run(state, batch, loss, every_layer)
            for index, layer_calls in enumerate(calls):
                for call in layer_calls:
                    a = call.inputs.to(FACTOR_DTYPE)
                    g = call.output_gradients.to(FACTOR_DTYPE)
                    sums[index][0] += torch.einsum("npi,npj->ij", a, a)
                    sums[index][1] += torch.einsum("npi,npj->ij", g, g)
                    positions[index] += a.shape[0] * a.shape[1]
            advance(batch_size_of(batch))
    n = examples.n
    return [
        ((a_sum / max(count, 1)).cpu(), (s_sum / n).cpu())
        for (a_sum, s_sum), count in zip(sums, positions)
    ]


def eigendecomposition(
    matrix: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eigenvalues (d,), eigenvectors (d, d))`` of a symmetric factor, ascending, float64;
    symmetrised first so that rounding in the accumulation cannot make it non-symmetric."""
    matrix = matrix.to(FACTOR_DTYPE)
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return values, vectors


def corrected_eigenvalues_and_diagonal(
    gradients: LayoutGradients,
    state: Mapping[str, torch.Tensor],
    examples: Examples,
    batch_size: int,
    eigenbases: list[tuple[torch.Tensor, torch.Tensor]] | None,
    progress: bool = True,
) -> tuple[list[torch.Tensor] | None, list[torch.Tensor]]:
    """EK-FAC's corrected eigenvalues (if ``eigenbases`` are given) and the diagonal Fisher
    of every block, from one pass of per-example training-loss gradients.

    Args:
        gradients: the layout's per-example gradients.
        state: the checkpoint's parameters and buffers.
        examples: the training set.
        batch_size: examples per gradient batch.
        eigenbases: per Kronecker layer, ``(Q_A (in, in), Q_S (out, out))``; ``None`` for the
            diagonal only.

    Returns:
        ``(corrected, diagonal)``: per layer ``Λ`` ``(out, in)`` (or ``None``), and per block
        the diagonal Fisher, ``(out, in)`` for a layer and ``(size,)`` for a fallback
        parameter; float64 on the CPU.
    """
    layout, device = gradients.layout, gradients.device
    bases = None
    if eigenbases is not None:
        bases = [(q_a.to(device), q_s.to(device)) for q_a, q_s in eigenbases]
    corrected = None
    if bases is not None:
        corrected = [
            torch.zeros(layer.out_dim, layer.in_dim, dtype=FACTOR_DTYPE, device=device)
            for layer in layout.layers
        ]
    diagonal = [torch.zeros(size, dtype=FACTOR_DTYPE, device=device) for size in layout.block_sizes]
    with progress_bar(examples.n, "corrected eigenvalues", progress) as advance:
        for batch in gradients.curvature_batches(state, examples, batch_size):
            layers, fallback, _ = gradients.blocks(state, batch, "loss")
            for index, layer in enumerate(layers):
                matrices = layer.matrices().to(FACTOR_DTYPE)
                diagonal[index] += matrices.square().sum(0).reshape(-1)
                if bases is not None:
                    corrected[index] += layer.rotated(*bases[index]).square().sum(0)
            for index, block in enumerate(fallback, start=len(layers)):
                diagonal[index] += block.to(FACTOR_DTYPE).square().sum(0)
            advance(batch_size_of(batch))
    n = examples.n
    diagonal = [values.cpu() / n for values in diagonal]
    for index, layer in enumerate(layout.layers):
        diagonal[index] = diagonal[index].reshape(layer.out_dim, layer.in_dim)
    if corrected is not None:
        corrected = [values.cpu() / n for values in corrected]
    return corrected, diagonal
