"""One side of a block's map as the per-layer projections apply it: a coordinate mask, a dense
factor or the identity (:class:`Factor`), or ``nnz`` CountSketches (:class:`CountSketch`); and
the precision helpers of featurizing under autocast."""

from __future__ import annotations

import contextlib

import torch


class Factor:
    """One side's ``(dim, k)`` factor: identity, a dense matrix, or a scaled coordinate mask."""

    def __init__(self, dim: int, k: int, matrix=None, index=None, scale: float = 1.0):
        self.dim, self.k, self.matrix, self.index, self.scale = dim, k, matrix, index, scale
        self.identity = matrix is None and index is None
        self._dense = matrix

    def dense(self, like: torch.Tensor) -> torch.Tensor:
        """The factor as a ``(dim, k)`` matrix in the dtype and on the device of ``like``."""
        if self._dense is None:
            dense = torch.zeros(self.dim, self.k, dtype=like.dtype, device=like.device)
            columns = torch.arange(self.k, device=like.device)
            dense[columns if self.identity else self.index, columns] = self.scale
            self._dense = dense
        return self._dense

    def vectors(self, x: torch.Tensor, augmented: bool) -> torch.Tensor:
        """``[x, 1] F`` (``augmented``) or ``x F`` for ``x`` of shape ``(..., dim - augmented)``."""
        if self.identity:
            return torch.cat([x, torch.ones_like(x[..., :1])], -1) if augmented else x
        if self.index is None:
            out = x @ self.matrix[: x.shape[-1]]
            return out + self.matrix[-1] if augmented else out
        out = x[..., self.index.clamp(max=x.shape[-1] - 1)] * self.scale
        if augmented:
            out[..., self.index == x.shape[-1]] = self.scale
        return out

    def along(self, matrices: torch.Tensor, axis: int) -> torch.Tensor:
        """``Fᵀ`` applied along ``axis`` (1 or 2) of ``(batch, rows, cols)`` matrices."""
        if self.identity:
            return matrices
        if self.index is not None:
            return matrices.index_select(axis, self.index) * self.scale
        if axis == 1:
            return torch.einsum("nrc,rk->nkc", matrices, self.matrix)
        return matrices @ self.matrix


class CountSketch:
    """One side's ``nnz`` CountSketches ``[dim] → [width]``: in sketch ``j``, coordinate ``i`` is
    added to bucket ``buckets[j, i]`` of slice ``j`` (of ``width``) with sign ``signs[j, i]``."""

    def __init__(self, dim: int, width: int, buckets: torch.Tensor, signs: torch.Tensor):
        self.dim, self.width, self.buckets, self.signs = dim, width, buckets, signs
        self.nnz = len(buckets)
        offsets = torch.arange(self.nnz, device=buckets.device).unsqueeze(1) * width
        self._flat_buckets = buckets + offsets  # buckets among all nnz·width

    def vectors(self, x: torch.Tensor, augmented: bool) -> torch.Tensor:
        """Sketches ``(..., nnz, width)`` of ``[x, 1]`` (``augmented``) or ``x``, for ``x`` of
        shape ``(..., dim - augmented)``."""
        size = x.shape[-1]
        out = x.new_zeros(*x.shape[:-1], self.nnz * self.width)
        for buckets, signs in zip(self._flat_buckets, self.signs.to(x.dtype)):
            out.index_add_(-1, buckets[:size], x * signs[:size])
            if augmented:
                out[..., buckets[-1]] += signs[-1]
        return out.unflatten(-1, (self.nnz, self.width))

    def one_hot(self, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Sketches ``(*index.shape, nnz, width)`` of the unit vectors ``e_index``."""
        out = like.new_zeros(*index.shape, self.nnz * self.width)
        buckets = self._flat_buckets[:, index].movedim(0, -1)
        signs = self.signs.to(like.dtype)[:, index].movedim(0, -1)
        return out.scatter_(-1, buckets, signs).unflatten(-1, (self.nnz, self.width))


def full_precision(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A 16-bit floating tensor (from a forward pass under autocast) in float32; any other as
    it is."""
    if tensor is not None and tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor


def without_autocast():
    """A context in which autocast is off (on the CPU and, where there is one, CUDA)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", enabled=False))
    if torch.cuda.is_available():
        stack.enter_context(torch.autocast("cuda", enabled=False))
    return stack
