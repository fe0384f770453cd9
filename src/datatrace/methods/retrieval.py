"""Queries of TRAK's ensemble scores that never hold the whole score matrix: score blocks
streamed over the stored training features, exact running top-k and self-influence (the
approximate top-k of a FAISS index is in :mod:`datatrace.methods.faiss_index`).

The scores are those of :meth:`TRAK.score <datatrace.TRAK.score>` (DESIGN.md):
``τ = (1/C Σ_c T_c) ⊙ q̄`` with ``T_c = Φ'_c K_c⁻¹ Φ_cᵀ`` and ``q̄ = mean_c Q_c``.

Folding. In the primal (``k ≤ n``) ``K_c⁻¹`` is folded into the targets once per block of
targets, ``A_c = Φ'_c K_c⁻¹`` (``(rows, k)``), so that a block of training columns costs
``Σ_c A_c Φ_c[cols]ᵀ``: the columns are visited in order and every stored feature chunk of every
checkpoint is read once per target block. In the dual (``k > n``) the ``n × n`` system is solved
for a block of targets over all ``n`` columns at once (:meth:`Kernel.scores
<datatrace.methods.kernel.Kernel.scores>`); as ``n < k`` that is no larger than ``A_c``. Memory is
bounded by a budget that sets how many targets a block holds (:meth:`EnsembleScores.block_rows`),
never by ``n_targets × n_train``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from datatrace._arguments import positive_integer
from datatrace.attributions import Ranking
from datatrace.methods.kernel import Kernel
from datatrace.progress import progress_bar
from datatrace.store import CheckpointFeatures
from datatrace.store.scores import ScoreMatrix

DEFAULT_MEMORY_BUDGET = 2**30
"""Default working memory of a streamed query, in bytes (1 GiB): blocks of targets are sized to
fit it (:meth:`EnsembleScores.block_rows`). It covers the score computation, not featurizing
the targets (bounded by ``batch_size``) nor what the caller keeps (a top-k result)."""

# Copies the memory estimate counts, each for a reason:
# a column block of stored features: zarr's decoded chunks and the assembled array;
FEATURE_COPIES = 2
# per target row of a column block: the running sum, one checkpoint's product, the scaled result;
SCORE_COPIES = 3
# top-k, per side: int64 keys of a row tied at its block's boundary and their selection (the
# kept keys and their merge are small beside them), plus a comparison mask of one byte per score;
KEY_COPIES = 2
# a float64 Cholesky solve: its right-hand side and its solution.
SOLVE_COPIES = 2

# Low 32 bits of a top-k key: 2³² − 1 − index, so that a lower index ranks first among ties.
INDEX_BITS = 32
INDEX_MASK = (1 << INDEX_BITS) - 1
# Flips the magnitude bits of a negative float32's bit pattern: the int32 then orders as the float.
MAGNITUDE_BITS = 0x7FFFFFFF


@dataclass(frozen=True)
class TopK:
    """The ``k`` strongest proponents and opponents of every target.

    Attributes:
        proponents: :class:`~datatrace.Ranking` with ``indices`` and ``scores``
            ``(n_targets, k)``, highest score first.
        opponents: the same, lowest (most negative) score first.

    Ties are broken by the lower training index first (the order of a stable ``argsort``), in
    the exact streamed query; a FAISS query returns what the index returns.
    """

    proponents: Ranking
    opponents: Ranking


def order_keys(scores: torch.Tensor, columns: torch.Tensor, largest: bool) -> torch.Tensor:
    """int64 keys whose descending order is the ranking of ``scores`` float32: by score
    (highest first if ``largest``, else lowest), then by lower column index. High 32 bits: the
    score's bit pattern made monotone (``-0.0`` counts as ``0.0``); low 32 bits:
    ``2³² − 1 − column``.

    Args:
        scores: ``(rows, width)``.
        columns: the column index of each score, int64, broadcastable to ``scores``.
    """
    bits = (scores.to(torch.float32) + 0.0).contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ MAGNITUDE_BITS, bits)
    if not largest:
        ordered = ~ordered
    return ordered.to(torch.int64) * (1 << INDEX_BITS) + (INDEX_MASK - columns)


def decode_keys(keys: torch.Tensor, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """The ``(indices, scores)`` that :func:`order_keys` encoded (exactly)."""
    high = torch.div(keys, 1 << INDEX_BITS, rounding_mode="floor")
    indices = INDEX_MASK - (keys - high * (1 << INDEX_BITS))
    return indices.numpy(), _scores_of(high, largest).numpy()


def _scores_of(high: torch.Tensor, largest: bool) -> torch.Tensor:
    """The float32 scores whose monotone bit patterns are ``high`` (a key's high 32 bits)."""
    ordered = high.to(torch.int32)
    if not largest:
        ordered = ~ordered
    return torch.where(ordered < 0, ordered ^ MAGNITUDE_BITS, ordered).view(torch.float32)


class RunningTopK:
    """The ``k`` best columns of every row, over column blocks seen one at a time (any order).

    Exact: the same indices and scores as a stable ``argsort`` of the whole rows (``-scores``
    for ``largest``), ties broken by the lower index. Each block's own best ``k`` are selected
    by value (``torch.topk``), then merged with the kept ones by :func:`order_keys`; a row whose
    ``k``-th value in the block is tied with values left out is selected again by key, so that
    the lower indices win.

    Args:
        k: columns kept per row.
        largest: keep the highest scores (proponents), else the lowest (opponents).
    """

    def __init__(self, k: int, largest: bool = True):
        self.k = positive_integer("k", k)
        self.largest = largest
        self.keys: torch.Tensor | None = None

    def update(self, scores: torch.Tensor, start: int) -> None:
        """Take in the block ``scores`` ``(rows, width)`` of columns ``start:start + width``."""
        scores = torch.as_tensor(scores).to(torch.float32)
        width = scores.shape[1]
        if start + width > INDEX_MASK:
            raise ValueError(f"column indices must stay below 2³² − 1, got {start + width}")
        if self.keys is not None and len(self.keys) != len(scores):
            raise ValueError(f"blocks must have {len(self.keys)} rows, got {len(scores)}")
        take = min(self.k, width)
        values, columns = torch.topk(scores, take, dim=1, largest=self.largest, sorted=False)
        keys = order_keys(values, columns + start, self.largest)
        if take < width:
            if self.largest:
                boundary = values.min(dim=1).values
                reaching = (scores >= boundary[:, None]).sum(dim=1)
            else:
                boundary = values.max(dim=1).values
                reaching = (scores <= boundary[:, None]).sum(dim=1)
            tied = torch.nonzero(reaching > take).squeeze(1)
            if len(tied):
                every = torch.arange(start, start + width, dtype=torch.int64)
                exact = order_keys(scores[tied], every, self.largest)
                keys[tied] = torch.topk(exact, take, dim=1, sorted=False).values
        if self.keys is not None:
            keys = torch.cat((self.keys, keys), dim=1)
            keys = torch.topk(keys, min(self.k, keys.shape[1]), dim=1, sorted=False).values
        self.keys = keys

    def result(self) -> Ranking:
        """:class:`~datatrace.Ranking` ``(rows, min(k, columns seen))``, best first."""
        if self.keys is None:
            raise ValueError("no columns seen yet: call update first")
        keys = torch.sort(self.keys, dim=1, descending=True).values
        indices, scores = decode_keys(keys, self.largest)
        return Ranking(indices, scores)


class EnsembleScores:
    """TRAK's ensemble scores ``τ`` for blocks of targets × training columns, from the stored
    training features (never all of them in memory).

    Args:
        kernels: per checkpoint, its :class:`~datatrace.methods.kernel.Kernel` (all primal or all
        dual).
        stored: per checkpoint, its complete :class:`~datatrace.store.CheckpointFeatures`.
        out_to_loss: ``(n_checkpoints, n_train)`` weights ``Q_c`` of the training examples.
    """

    def __init__(
        self,
        kernels: Sequence[Kernel],
        stored: Sequence[CheckpointFeatures],
        out_to_loss: np.ndarray,
    ):
        self.kernels = list(kernels)
        self.stored = list(stored)
        self.n_checkpoints = len(self.kernels)
        # Score columns are the training examples: the stored rows less any removed ones.
        self.n_train = self.stored[0].n_train
        rows = self.stored[0].train_rows()
        self.train_rows = None if len(rows) == self.stored[0].n_rows else rows
        self.dim = self.stored[0].features.shape[1]
        self.dual = self.kernels[0].dual
        self.feature_rows = self.stored[0].chunk_rows
        # As TRAK.score computes it: the float32 mean over checkpoints.
        self.mean_out_to_loss = np.asarray(out_to_loss).mean(axis=0).astype(np.float32)

    # -- memory ------------------------------------------------------------------------------

    def block_bytes(self, rows: int, width: int, top_k: int | None = None) -> int:
        """Estimated working memory of one block of ``rows`` targets and ``width`` columns
        (``top_k``: with a running top-k of that many)."""
        fixed, per_row = self._memory(width, top_k)
        return fixed + rows * per_row

    def block_rows(
        self,
        budget: int,
        n_targets: int,
        width: int,
        top_k: int | None = None,
        multiple: int = 1,
    ) -> int:
        """The most targets per block whose :meth:`block_bytes` fit ``budget`` bytes: at most
        ``n_targets``, and a multiple of ``multiple`` unless that is all the targets.

        Raises:
            ValueError: ``budget`` does not fit one block of ``multiple`` targets.
        """
        fixed, per_row = self._memory(width, top_k)
        rows = (budget - fixed) // per_row if budget > fixed else 0
        needed = min(multiple, n_targets)
        if rows < needed:
            raise ValueError(
                f"memory_budget={budget} bytes is too small: a block of {needed} target(s) needs "
                f"about {fixed + needed * per_row} bytes (k = {self.dim}, "
                f"{self.n_checkpoints} checkpoint(s)); pass a larger memory_budget"
            )
        if rows >= n_targets:
            return n_targets
        return rows // multiple * multiple

    def _memory(self, width: int, top_k: int | None) -> tuple[int, int]:
        """``(fixed, per target row)`` bytes of a block (see the ``*_COPIES`` constants)."""
        checkpoints, dim = self.n_checkpoints, self.dim
        per_row = checkpoints * dim * 4  # the targets' features
        if self.dual:
            fixed = self.feature_rows * dim * 4 * FEATURE_COPIES
            per_row += self.n_train * (8 * SOLVE_COPIES + 4 * SCORE_COPIES)
        else:
            fixed = width * dim * 4 * FEATURE_COPIES
            per_row += checkpoints * dim * 4 + dim * 8 * SOLVE_COPIES + width * 4 * SCORE_COPIES
        if top_k is not None:
            per_row += (width + top_k) * 8 * KEY_COPIES + width
        return fixed, per_row

    # -- scores ------------------------------------------------------------------------------

    def column_features(self, part: CheckpointFeatures, start: int, stop: int) -> np.ndarray:
        """``(stop - start, k)`` stored features of training columns ``start:stop`` under one
        checkpoint: its rows, skipping rows removed from the training set. Reads the stored
        chunks the columns span (with nothing removed and ``start`` a multiple of the row chunk,
        exactly those of the columns)."""
        if self.train_rows is None:
            return part.features[start:stop]
        rows = self.train_rows[start:stop]
        return part.features[int(rows[0]) : int(rows[-1]) + 1][rows - rows[0]]

    def column_blocks(self, width: int) -> list[tuple[int, int]]:
        """``(start, stop)`` training columns of consecutive blocks of ``width``."""
        return [(lo, min(lo + width, self.n_train)) for lo in range(0, self.n_train, width)]

    def fold(self, target_features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``(K_c⁻¹ Φ'_cᵀ)`` per checkpoint, ``(k, rows)`` float32 (primal only), as
        :meth:`Kernel.scores <datatrace.methods.kernel.Kernel.scores>` solves it."""
        if self.dual:
            raise ValueError("folding K⁻¹ into the targets needs the primal kernel (k ≤ n)")
        return [
            kernel.fold(features).to(torch.float32)
            for features, kernel in zip(target_features, self.kernels)
        ]

    def blocks(
        self,
        target_features: Sequence[torch.Tensor],
        columns: Sequence[tuple[int, int]],
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, scores)`` for each column block, ``scores`` ``(rows, stop - start)``
        float32: the ensemble scores of one block of targets.

        Args:
            target_features: per checkpoint, ``(rows, k)`` features of the block's targets.
            columns: ``(start, stop)`` of the training columns wanted, in increasing order.
        """
        if len(target_features) != self.n_checkpoints:
            raise ValueError(
                f"target features of {len(target_features)} checkpoints given, the kernels "
                f"are of {self.n_checkpoints}"
            )
        weights = torch.from_numpy(self.mean_out_to_loss)
        if self.dual:
            total = None
            for features, kernel, part in zip(target_features, self.kernels, self.stored):
                scores = kernel.scores(features, part.iter_chunks(), self.n_train)
                total = scores if total is None else total + scores
            ensemble = torch.from_numpy(total) / self.n_checkpoints * weights
            for lo, hi in columns:
                yield lo, hi, ensemble[:, lo:hi]
            return
        folded = self.fold(target_features)
        for lo, hi in columns:
            total = None
            for solved, part in zip(folded, self.stored):
                scores = (torch.as_tensor(self.column_features(part, lo, hi)) @ solved).T
                total = scores if total is None else total + scores
            yield lo, hi, total / self.n_checkpoints * weights[lo:hi]

    def self_influence(self, progress: bool = False) -> np.ndarray:
        """``(n_train,)`` float32: each training example's ensemble score on itself,
        ``q̄_i · mean_c φ_{i,c} K_c⁻¹ φ_{i,c}ᵀ`` — the diagonal of the scores of the training
        set as targets, from the stored features (in float64, then rounded)."""
        influence = np.empty(self.n_train, dtype=np.float32)
        chunks = self.column_blocks(self.feature_rows)
        with progress_bar(len(chunks), "self-influence", progress) as advance:
            for start, stop in chunks:
                total = np.zeros(stop - start)
                for kernel, part in zip(self.kernels, self.stored):
                    block = self.column_features(part, start, stop)
                    if self.dual:
                        scores = kernel.scores(block, part.iter_chunks(), self.n_train)
                        total += scores[np.arange(stop - start), np.arange(start, stop)]
                    else:
                        block = torch.as_tensor(block).to(torch.float64)
                        solved = kernel.fold(block)  # each with its own damping, as in scores
                        total += (block.T * solved).sum(0).numpy()
                weights = self.mean_out_to_loss[start:stop].astype(np.float64)
                influence[start:stop] = total / self.n_checkpoints * weights
                advance(1)
        return influence

    # -- FAISS vectors -----------------------------------------------------------------------

    def query_vectors(self, target_features: Sequence[torch.Tensor]) -> np.ndarray:
        """``(rows, C·k)`` float32: ``[φ'_1 K_1⁻¹, ..., φ'_C K_C⁻¹] / C`` per target."""
        folded = self.fold(target_features)
        return torch.cat([solved.T for solved in folded], dim=1).numpy() / self.n_checkpoints

    def train_vectors(self, rows: slice | np.ndarray) -> np.ndarray:
        """``(len(rows), C·k)`` float32: ``q̄_i [φ_{i,1}, ..., φ_{i,C}]`` of training ``rows``
        (a slice or sorted indices)."""
        if self.train_rows is None:
            blocks = [part.features.read((rows, slice(None))) for part in self.stored]
        else:
            stored = self.train_rows[rows]
            blocks = [part.features.read((stored, slice(None))) for part in self.stored]
        return np.concatenate(blocks, axis=1) * self.mean_out_to_loss[rows][:, None]


# -- the streamed queries ------------------------------------------------------------------

TargetFeaturizer = Callable[[int, int], list[torch.Tensor]]
"""``featurize(start, stop)``: per checkpoint, the ``(stop - start, k)`` features of targets
``start:stop``."""


def write_scores(
    scores: EnsembleScores,
    matrix: ScoreMatrix,
    featurize: TargetFeaturizer,
    budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
) -> ScoreMatrix:
    """Compute the chunks of ``matrix`` not yet written, block of targets by block, then mark
    it complete. Targets of a block whose chunks are all written are not featurized again.

    Args:
        scores: the ensemble.
        matrix: a :class:`~datatrace.store.scores.ScoreMatrix` of ``(n_targets, n_train)``
            whose column chunks are whole multiples of the features' row chunks.
        featurize: the targets' features, by range.
        budget: working memory in bytes.

    Returns:
        ``matrix``, complete.
    """
    row_chunk, width = matrix.chunks
    rows = scores.block_rows(budget, matrix.n_targets, width, multiple=row_chunk)
    columns = scores.column_blocks(width)
    done = matrix.done()
    blocks = [(lo, min(lo + rows, matrix.n_targets)) for lo in range(0, matrix.n_targets, rows)]
    with progress_bar(len(blocks) * len(columns), "scores", progress) as advance:
        for lo, hi in blocks:
            pending = ~done[lo // row_chunk : -(-hi // row_chunk)].all(axis=0)
            advance(len(columns) - int(pending.sum()))
            if not pending.any():
                continue
            wanted = [block for block, missing in zip(columns, pending) if missing]
            for start, _, block in scores.blocks(featurize(lo, hi), wanted):
                matrix.write(lo, start, block.numpy())
                advance(1)
    matrix.finish()
    return matrix


def stream_top_k(
    scores: EnsembleScores,
    featurize: TargetFeaturizer,
    n_targets: int,
    k: int,
    width: int,
    budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = False,
) -> TopK:
    """Exact top-``k`` proponents and opponents of every target, with running top-k over
    column blocks of ``width`` (ties: lower index first).

    Returns:
        :class:`TopK` of ``(n_targets, min(k, n_train))``.
    """
    k = min(k, scores.n_train)
    rows = scores.block_rows(budget, n_targets, width, top_k=k)
    columns = scores.column_blocks(width)
    parts: list[tuple[Ranking, Ranking]] = []
    blocks = [(lo, min(lo + rows, n_targets)) for lo in range(0, n_targets, rows)]
    with progress_bar(len(blocks) * len(columns), "top-k", progress) as advance:
        for lo, hi in blocks:
            best, worst = RunningTopK(k, largest=True), RunningTopK(k, largest=False)
            for start, _, block in scores.blocks(featurize(lo, hi), columns):
                best.update(block, start)
                worst.update(block, start)
                advance(1)
            parts.append((best.result(), worst.result()))
    return TopK(*(concatenate_rankings([part[side] for part in parts]) for side in (0, 1)))


def concatenate_rankings(rankings: list[Ranking]) -> Ranking:
    """The rows of ``rankings`` stacked, in order."""
    return Ranking(
        np.concatenate([ranking.indices for ranking in rankings]),
        np.concatenate([ranking.scores for ranking in rankings]),
    )
