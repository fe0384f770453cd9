"""Random projections of per-example gradients: ``φ = Pᵀ g``.

Every projection matrix ``P`` (``p × k``) is a pure function of an integer seed and the sizes of the
parameter blocks it projects. It is generated on the CPU in fixed canonical blocks of rows, each
from its own generator seeded by a hash of ``(seed, parameter index, block index)``, and then moved
to the device. So the matrix is the same on every machine and device, does not depend on batch
size or memory settings, and is never materialised whole: a model with 10⁸ parameters only ever
holds a few blocks at a time.

All random projections are scaled so that ``E[P Pᵀ] = I``: inner products of projected vectors
are unbiased estimates of the inner products of the gradients.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from datatrace._arguments import positive_integer

# Rows of P generated from one seeded generator. Part of the definition of each matrix: changing
# it changes every projection (and invalidates stored features), so it is fixed, not a setting.
DENSE_GENERATION_ROWS = 256
SPARSE_GENERATION_ROWS = 65_536
# A sparse-JL block of at most this many coordinates is applied as one CSR sparse-dense product
# (the same sums, in another order) instead of nnz scatter-adds: measured on the CPU, the
# product is faster below about 10⁵ coordinates and slower at 10⁶ (a 256-example batch of 10,250
# coordinates into 876 outputs: 4.7 ms against 4 × 3.4 ms; 29,440 into 1,840: 17 ms against 40).
CSR_MAX_COORDINATES = 131_072


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of integers and strings, identical in every process.

    Python's ``hash`` is salted per process, so a cryptographic hash of the parts is used instead.
    """
    text = ":".join(str(part) for part in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _generator(*parts: int | str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed(*parts))


class Projector(ABC):
    """Maps per-example gradients, given as per-parameter blocks, to ``k`` features.

    Subclasses store settings only; the matrix is determined by ``seed`` and the block sizes at
    each call, and cached when it fits in ``max_cache_bytes``.
    """

    def __init__(self, max_cache_bytes: int = 1 << 30):
        self.max_cache_bytes = max_cache_bytes
        self._cache: dict[Any, Any] = {}

    @abstractmethod
    def output_dim(self, sizes: Sequence[int]) -> int:
        """Number of features ``k`` for parameter blocks of the given sizes."""

    @abstractmethod
    def project(self, grads: Sequence[torch.Tensor], seed: int) -> torch.Tensor:
        """Project a batch of per-example gradients.

        Args:
            grads: one tensor per parameter block, each ``(batch_size, *block_shape)``.
            seed: determines ``P`` together with the block sizes.

        Returns:
            ``(batch_size, k)`` float32 features ``Pᵀ g`` on the gradients' device.
        """

    def config(self) -> dict[str, Any]:
        """Settings that determine the matrix (for a store's provenance)."""
        return {"name": type(self).__name__}

    def check_sizes(self, sizes: Sequence[int]) -> None:
        """Refuse parameter blocks of these sizes before any work, if projecting them would be
        unreasonable (the default accepts any)."""
        return None

    def matrix(self, sizes: Sequence[int], seed: int) -> torch.Tensor:
        """The whole ``(p, k)`` matrix, for tests and small models, built by projecting the
        identity block by block."""
        columns = []
        for index, size in enumerate(sizes):
            eye = torch.eye(size)
            grads = [torch.zeros(size, other) for other in sizes]
            grads[index] = eye
            columns.append(self.project(grads, seed))
        return torch.cat(columns, dim=0)

    def _cached(self, key: Any, nbytes: int, make):
        if key in self._cache:
            return self._cache[key]
        value = make()
        if nbytes <= self.max_cache_bytes:
            self._cache = {key: value}  # one matrix at a time: checkpoints use different seeds
        return value


def _flat(grads: Sequence[torch.Tensor], keep_float64: bool = False) -> list[torch.Tensor]:
    """``(batch, -1)`` views of ``grads`` in float32 (float64 kept with ``keep_float64``: the
    factorised blocks' features, which these projectors' outputs join, are in the activations'
    dtype)."""
    if not grads:
        raise ValueError("no gradient blocks to project")
    batch = grads[0].shape[0]
    flat = [g.reshape(batch, -1) for g in grads]
    keep = (torch.float64,) if keep_float64 else ()
    return [g if g.dtype in keep else g.float() for g in flat]


class IdentityProjector(Projector):
    """No projection: the features are the flattened gradients (``k = p``).

    For tests and small models only: the kernel is ``p × p``.
    """

    def output_dim(self, sizes: Sequence[int]) -> int:
        return int(sum(sizes))

    def project(self, grads: Sequence[torch.Tensor], seed: int) -> torch.Tensor:
        return torch.cat(_flat(grads, keep_float64=True), dim=1)


class DenseProjector(Projector):
    """Dense random projection with i.i.d. Gaussian or Rademacher entries scaled by ``1/√k``.

    Costs ``p·k`` multiply-adds per example (plus generating ``P`` unless it is cached): the
    reference projection, exact in distribution, slow for large models.

    A matrix larger than ``max_cache_bytes`` would be generated again for every batch (measured:
    a 2-D CNN of 422k parameters at k = 2048 took 126 training epochs that way), so it is refused
    with advice unless ``regenerate=True``. For large models the per-layer dense factors of
    ``projector="factorized"`` (LoGra) keep only ``out × k_out + in × k_in`` numbers per layer.

    Args:
        proj_dim: ``k``.
        distribution: ``"gaussian"`` or ``"rademacher"``.
        max_cache_bytes: keep ``P`` in memory between batches when it is at most this large.
        work_bytes: size of the blocks of ``P`` generated at a time when it is not cached.
        regenerate: accept a matrix larger than ``max_cache_bytes``, generated block by block
            for every batch.
    """

    def __init__(
        self,
        proj_dim: int,
        distribution: str = "gaussian",
        max_cache_bytes: int = 1 << 30,
        work_bytes: int = 64 << 20,
        regenerate: bool = False,
    ):
        super().__init__(max_cache_bytes)
        proj_dim = positive_integer("proj_dim", proj_dim)
        if distribution not in ("gaussian", "rademacher"):
            raise ValueError(
                f"unknown distribution {distribution!r}: use 'gaussian' or 'rademacher'"
            )
        self.proj_dim = proj_dim
        self.distribution = distribution
        self.work_bytes = work_bytes
        self.regenerate = regenerate

    def config(self) -> dict[str, Any]:
        return {"name": "dense", "proj_dim": self.proj_dim, "distribution": self.distribution}

    def check_sizes(self, sizes: Sequence[int]) -> None:
        """Refuse a matrix that does not fit in the cache (see the class docstring).

        Raises:
            ValueError: ``4·p·k`` bytes exceed ``max_cache_bytes`` and ``regenerate`` is off.
        """
        total_bytes = 4 * int(sum(sizes)) * self.proj_dim
        if total_bytes > self.max_cache_bytes and not self.regenerate:
            raise ValueError(
                f"the dense projection of {int(sum(sizes)):,} parameters to k = {self.proj_dim} "
                f"is a {total_bytes / 2**30:.1f} GiB matrix, more than the "
                f"{self.max_cache_bytes / 2**30:.1f} GiB cache: it would be generated again for "
                "every batch, many training epochs of work. Use projector='factorized' (per-layer "
                "dense factors) or 'sparse', select fewer parameters (params=...), or pass "
                "DenseProjector(k, max_cache_bytes=...) with room for it (or regenerate=True)"
            )

    def output_dim(self, sizes: Sequence[int]) -> int:
        return self.proj_dim

    def _rows(self, seed: int, block: int, first_row: int, stop_row: int) -> torch.Tensor:
        """Rows ``first_row:stop_row`` of parameter block ``block``'s part of ``P`` (CPU)."""
        parts = []
        for gen_block in range(
            first_row // DENSE_GENERATION_ROWS, -(-stop_row // DENSE_GENERATION_ROWS)
        ):
            lo = gen_block * DENSE_GENERATION_ROWS
            generator = _generator(seed, block, gen_block)
            shape = (DENSE_GENERATION_ROWS, self.proj_dim)
            if self.distribution == "gaussian":
                rows = torch.randn(shape, generator=generator)
            else:
                rows = torch.randint(0, 2, shape, generator=generator).float().mul_(2).sub_(1)
            parts.append(rows[max(first_row - lo, 0) : stop_row - lo])
        return torch.cat(parts).div_(math.sqrt(self.proj_dim))

    def _row_ranges(self, size: int) -> Iterator[tuple[int, int]]:
        step = max(1, self.work_bytes // (4 * self.proj_dim))
        step = max(DENSE_GENERATION_ROWS, step - step % DENSE_GENERATION_ROWS)
        for lo in range(0, size, step):
            yield lo, min(lo + step, size)

    def project(self, grads: Sequence[torch.Tensor], seed: int) -> torch.Tensor:
        flat = _flat(grads)
        device = flat[0].device
        sizes = tuple(g.shape[1] for g in flat)
        total_bytes = 4 * sum(sizes) * self.proj_dim
        if total_bytes <= self.max_cache_bytes:
            blocks = self._cached(
                (seed, sizes, str(device)),
                total_bytes,
                lambda: [self._rows(seed, t, 0, size).to(device) for t, size in enumerate(sizes)],
            )
            return sum(g @ block for g, block in zip(flat, blocks))
        out = torch.zeros(flat[0].shape[0], self.proj_dim, device=device)
        for t, g in enumerate(flat):
            for lo, hi in self._row_ranges(g.shape[1]):
                out.addmm_(g[:, lo:hi], self._rows(seed, t, lo, hi).to(device))
        return out


class SparseJLProjector(Projector):
    """Sparse Johnson–Lindenstrauss projection: each gradient coordinate is added, with a random
    sign and weight ``1/√s``, into ``s`` output coordinates, one in each of ``s`` equal slices
    of the ``k`` outputs (so the ``s`` are distinct and ``E[P Pᵀ] = I`` exactly).

    Costs ``s`` multiply-adds per coordinate and example, whatever ``k``: the default projector.

    Args:
        proj_dim: ``k``; must be a multiple of ``nnz``.
        nnz: ``s``, the number of output coordinates each input coordinate reaches.
        max_cache_bytes: keep the hash tables in memory when they are at most this large.
    """

    def __init__(self, proj_dim: int, nnz: int = 4, max_cache_bytes: int = 1 << 30):
        super().__init__(max_cache_bytes)
        proj_dim = positive_integer("proj_dim", proj_dim)
        if nnz < 1:
            raise ValueError(f"nnz must be positive, got {nnz}")
        if proj_dim % nnz:
            raise ValueError(
                f"proj_dim={proj_dim} is not a multiple of nnz={nnz}: each input coordinate is "
                f"hashed into one of {nnz} equal slices of the output, so choose a proj_dim "
                f"divisible by {nnz} (e.g. {proj_dim - proj_dim % nnz + nnz})"
            )
        self.proj_dim = proj_dim
        self.nnz = nnz
        self._csr_cache: dict[Any, torch.Tensor] = {}

    def config(self) -> dict[str, Any]:
        return {"name": "sparse_jl", "proj_dim": self.proj_dim, "nnz": self.nnz}

    def output_dim(self, sizes: Sequence[int]) -> int:
        return self.proj_dim

    def _tables(self, seed: int, block: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(buckets, signs)``, each ``(nnz, size)``, for parameter block ``block`` (CPU)."""
        width = self.proj_dim // self.nnz
        offsets = (torch.arange(self.nnz) * width).unsqueeze(1)
        if size == 0:  # a placeholder block (project_outer): no coordinates
            return torch.zeros(self.nnz, 0, dtype=torch.int64), torch.zeros(self.nnz, 0)
        buckets, signs = [], []
        for gen_block in range(-(-size // SPARSE_GENERATION_ROWS)):
            rows = min(SPARSE_GENERATION_ROWS, size - gen_block * SPARSE_GENERATION_ROWS)
            generator = _generator(seed, block, gen_block)
            buckets.append(torch.randint(0, width, (self.nnz, rows), generator=generator) + offsets)
            signs.append(torch.randint(0, 2, (self.nnz, rows), generator=generator))
        scale = 1.0 / math.sqrt(self.nnz)
        sign = torch.cat(signs, dim=1).float().mul_(2 * scale).sub_(scale)
        return torch.cat(buckets, dim=1), sign

    def project(self, grads: Sequence[torch.Tensor], seed: int) -> torch.Tensor:
        flat = _flat(grads, keep_float64=True)
        if len({g.dtype for g in flat}) > 1:
            flat = [g.double() for g in flat]
        device = flat[0].device
        sizes = tuple(g.shape[1] for g in flat)
        tables = self._cached(
            (seed, sizes, str(device)),
            12 * self.nnz * sum(sizes),
            lambda: [
                tuple(t.to(device) for t in self._tables(seed, index, size))
                for index, size in enumerate(sizes)
            ],
        )
        out = torch.zeros(flat[0].shape[0], self.proj_dim, device=device, dtype=flat[0].dtype)
        for index, (g, (buckets, signs)) in enumerate(zip(flat, tables)):
            if g.shape[1] == 0:
                continue
            if g.shape[1] <= CSR_MAX_COORDINATES and device.type == "cpu":
                matrix = self._csr(seed, sizes, index, buckets, signs, g.dtype)
                out += (matrix @ g.T).T
                continue
            signed = torch.empty_like(g)
            for j in range(self.nnz):
                torch.mul(g, signs[j], out=signed)
                out.index_add_(1, buckets[j], signed)
        return out

    def project_outer(
        self, rows: torch.Tensor, cols: torch.Tensor, seed: int, index: int
    ) -> torch.Tensor:
        """What :meth:`project` adds for block ``index`` when that block's gradients are the
        outer products ``rows[:, b] ⊗ cols[:, b]`` (``(R, batch)``, ``(C, batch)``; a
        one-position layer's whole weight gradient), without forming them all at once
        (:func:`outer_product_jl`): ``(batch, proj_dim)``. :meth:`project` is then called with
        a ``(batch, 0)`` placeholder at ``index``, which keeps the other blocks' maps."""
        size, per_slab = rows.shape[0] * cols.shape[0], slab_rows(cols.shape[0])
        dtype = rows.dtype if rows.dtype in (torch.float32, torch.float64) else torch.float32
        key = ("outer", seed, index, size, per_slab, str(rows.device), dtype)
        cached = self.__dict__.setdefault("_outer_cache", {})
        matrices = cached.get(key)
        if matrices is None:
            buckets, signs = self._tables(seed, index, size)
            matrices = [
                matrix.to(rows.device)
                for matrix in slab_matrices(buckets, signs.to(dtype), self.proj_dim,
                                            cols.shape[0], per_slab)
            ]  # fmt: skip
            if (cached and next(iter(cached))[1] != seed) or len(cached) > 64:
                cached = self._outer_cache = {}  # one checkpoint's maps at a time
            cached[key] = matrices
        return outer_product_jl(rows, cols, matrices, per_slab)

    def _csr(self, seed, sizes, index, buckets, signs, dtype) -> torch.Tensor:
        """Block ``index``'s map as a ``(k, size)`` CSR matrix, cached beside the hash tables."""
        key = ("csr", seed, sizes, index, dtype)
        cached = self._csr_cache
        if key in cached:
            return cached[key]
        matrix = hashed_csr(buckets, signs.to(dtype), self.proj_dim)
        if (cached and next(iter(cached))[1:3] != (seed, sizes)) or len(cached) > 64:
            cached = {}  # one checkpoint's maps at a time, as the hash tables
        cached[key] = matrix
        self._csr_cache = cached
        return matrix


# Products (rows × cols of one example) per slab of a one-position outer product's sparse JL
# (outer_product_jl): at batch 256 and float32, 4 MiB of products at a time, which stay in cache
# for the CSR product, where a layer's whole products (30 MiB for a 128 × 229 mask) are a fresh
# allocation per batch, paid in page faults.
SLAB_PRODUCTS = 4096


def slab_rows(cols: int) -> int:
    """Rows of an outer product's ``rows × cols`` products per slab (:data:`SLAB_PRODUCTS`)."""
    return max(1, SLAB_PRODUCTS // cols)


def slab_matrices(
    buckets: torch.Tensor, signs: torch.Tensor, dim: int, cols: int, rows_per_slab: int
) -> list[torch.Tensor]:
    """A hashed sparse JL (:func:`hashed_csr`) over row-major ``rows × cols`` products, cut into
    the CSR matrices of ``rows_per_slab`` rows of products each (contiguous column ranges)."""
    width = rows_per_slab * cols
    return [
        hashed_csr(buckets[:, lo : lo + width], signs[:, lo : lo + width], dim)
        for lo in range(0, buckets.shape[1], width)
    ]


def outer_product_jl(
    rows: torch.Tensor, cols: torch.Tensor, matrices: list[torch.Tensor], rows_per_slab: int
) -> torch.Tensor:
    """The sparse JL of every example's outer product ``rows[:, b] ⊗ cols[:, b]`` (``(R, batch)``
    and ``(C, batch)``, flattened row-major), formed and mapped a slab of rows at a time with
    :func:`slab_matrices`: ``(batch, dim)``, the sum of the slabs' CSR products, equal to the
    map of all products up to the order of the sums."""
    n = rows.shape[1]
    out = rows.new_zeros(matrices[0].shape[0], n, dtype=matrices[0].dtype)
    for index, matrix in enumerate(matrices):
        lo = index * rows_per_slab
        products = rows[lo : lo + rows_per_slab].unsqueeze(1) * cols.unsqueeze(0)
        out.addmm_(matrix, products.reshape(-1, n).to(matrix.dtype))
    return out.T


def hashed_csr(buckets: torch.Tensor, signs: torch.Tensor, dim: int) -> torch.Tensor:
    """A hashed sparse JL as a ``(dim, size)`` CSR matrix: input coordinate ``j`` adds
    ``signs[r, j]`` into output ``buckets[r, j]`` for every slice ``r`` (``(nnz, size)`` each).
    Applied as one sparse-dense product it gives the scatter-adds' sums in another order."""
    nnz, size = buckets.shape
    flat = buckets.reshape(-1)
    order = torch.argsort(flat, stable=True)
    columns = torch.arange(size, device=flat.device).repeat(nnz)[order]
    rows = torch.zeros(dim + 1, dtype=torch.int64, device=flat.device)
    rows[1:] = torch.bincount(flat, minlength=dim).cumsum(0)
    with warnings.catch_warnings():  # "CSR support is in beta": the product is tested
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            rows, columns, signs.reshape(-1)[order], (dim, size), check_invariants=False
        )


PROJECTORS = {"sparse": SparseJLProjector, "dense": DenseProjector, "identity": IdentityProjector}


# Names of the per-layer factorised projections (datatrace.grads.factorized) and their variant.
FACTORIZED_NAMES = {
    "factorized": "dense",
    "logra": "dense",
    "factgrass": "sparse",
    "tensorsketch": "sketch",
    "hybrid": "hybrid",
}
# What ``projector="auto"`` (the default) builds: per-layer FactGraSS (masks, then sparse JL)
# of the factorised gradients with the gradient-energy split of k (other parameters by per-example
# gradients and sparse JL), at every model size. A block small next to its share of k keeps its
# whole gradient before the JL (factorized.WHOLE_BLOCK_FRACTION), so on small models it is
# per-layer sparse JL of exact per-layer gradients: within the run-to-run spread of whole-vector
# sparse JL on every family measured, and faster on all but the smallest (benchmarks/
# projector_study.py, perf_featurize.py; docs/trak.md "Projections").
AUTO_PROJECTOR = "factgrass"


def make_projector(projector: str | Projector, proj_dim: int | None) -> Projector:
    """A projector named ``"auto"`` (:data:`AUTO_PROJECTOR`), ``"sparse"``, ``"dense"``,
    ``"rademacher"``, ``"identity"``, ``"factorized"`` (or ``"logra"``: per-layer Gaussian
    factors), ``"factgrass"`` (per-layer masks and sparse JL) or ``"tensorsketch"`` (per-layer
    TensorSketch), or as given.

    Raises:
        ValueError: unknown name, or ``proj_dim`` missing (or not a positive integer) for a
            random projection.
    """
    if isinstance(projector, Projector):
        return projector
    if projector == "auto":
        projector = AUTO_PROJECTOR
    if projector == "identity":
        return IdentityProjector()
    if projector not in ("sparse", "dense", "gaussian", "rademacher", *FACTORIZED_NAMES):
        raise ValueError(
            f"unknown projector {projector!r}: use 'auto' (default: per-layer FactGraSS), "
            "'sparse', 'dense' (Gaussian), 'rademacher', 'identity', 'factorized' (or 'logra'), "
            "'factgrass', 'tensorsketch', 'hybrid', or a Projector object"
        )
    if proj_dim is None:
        raise ValueError(f"the {projector!r} projector needs proj_dim")
    proj_dim = positive_integer("proj_dim", proj_dim)
    if projector in FACTORIZED_NAMES:
        from datatrace.grads.factorized import FactorizedProjector  # imports this module

        return FactorizedProjector(proj_dim, variant=FACTORIZED_NAMES[projector])
    if projector == "sparse":
        return SparseJLProjector(proj_dim)
    return DenseProjector(proj_dim, "rademacher" if projector == "rademacher" else "gaussian")
