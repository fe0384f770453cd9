"""An optional FAISS index over the kernel-folded training features of a TRAK ensemble, for
approximate top-k queries over millions of training examples (``pip install "datatrace[faiss]"``).

One inner-product search over concatenations gives the ensemble:
``u_j = [φ'_{j,1} K_1⁻¹, ..., φ'_{j,C} K_C⁻¹] / C`` (queries) and
``v_i = q̄_i [φ_{i,1}, ..., φ_{i,C}]`` (training vectors), so ``u_j · v_i = τ_{ji}``. Only the
primal has a ``k × k`` ``K_c⁻¹`` to fold; in the dual, exact top-k is cheap (``n < k``).
faiss is imported only when an index is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from datatrace._arguments import non_negative_integer
from datatrace.attributions import Ranking
from datatrace.methods.retrieval import (
    DEFAULT_MEMORY_BUDGET,
    SOLVE_COPIES,
    EnsembleScores,
    TargetFeaturizer,
    TopK,
    concatenate_rankings,
)
from datatrace.progress import progress_bar

if TYPE_CHECKING:
    import faiss

EXACT_FAISS_BELOW = 20_000
"""``factory="auto"`` builds an exact ``"Flat"`` index below this many training examples (an
inverted file gains nothing there), else ``"IVF{nlist},Flat"``."""
IVF_LISTS_PER_ROOT = 1
"""``nlist = √n`` inverted lists. FAISS suggests 4–16·√n for the fastest searches, but fitting
the lists costs ``nlist²`` (their number times the sample they are fitted on): at ``n = 10⁶``,
√n lists fit in about a minute on 2 CPU cores (benchmarks/scale.py)."""
IVF_TRAIN_PER_LIST = 64
"""Training examples sampled per inverted list to fit its centroids (FAISS warns below 39)."""
DEFAULT_NPROBE = 32
"""Inverted lists searched per query: the recall/speed trade-off (benchmarks/scale.py)."""


def import_faiss() -> Any:
    """The ``faiss`` module, or an ImportError saying how to install it."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "the FAISS index needs the faiss package: pip install 'datatrace[faiss]' "
            "(which installs faiss-cpu)"
        ) from error
    return faiss


class FaissIndex:
    """An inner-product FAISS index over the kernel-folded training vectors of an ensemble.

    Training vectors ``v_i = q̄_i [φ_{i,1}, ..., φ_{i,C}]`` (``C·k`` dimensions) are added
    chunk by chunk from the store; a target's query is ``[φ'_1 K_1⁻¹, ..., φ'_C K_C⁻¹] / C``, so
    ``u · v_i`` is its score ``τ_i`` and one search gives its top-k (opponents: a search with
    ``-u``). Built by :meth:`TRAK.faiss_index <datatrace.TRAK.faiss_index>`, queried by
    :meth:`TRAK.top_k(..., index=...) <datatrace.TRAK.top_k>`. The index holds ``n × C·k``
    float32 (``"Flat"``, ``"IVF...,Flat"``) or less (``"IVF...,SQ8"``, ``PQ``).

    Args:
        scores: the ensemble (primal only).
        factory: a FAISS ``index_factory`` string (``"Flat"``: exact; ``"IVF4096,Flat"``...),
            or ``"auto"``: ``"Flat"`` below :data:`EXACT_FAISS_BELOW` training examples, else
            ``"IVF{√n},Flat"``.
        nprobe: inverted lists searched per query (IVF indices; default
            :data:`DEFAULT_NPROBE`).
        seed: seed of the sample the inverted lists are fitted on.
        progress: show a progress bar while adding the training vectors.

    Raises:
        ImportError: faiss is not installed.
        ValueError: the kernels are dual (``k > n``): there is no ``k × k`` inverse to fold, and
            exact :meth:`TRAK.top_k <datatrace.TRAK.top_k>` costs only ``n·k`` per target.
    """

    def __init__(
        self,
        scores: EnsembleScores,
        factory: str = "auto",
        nprobe: int | None = None,
        seed: int = 0,
        progress: bool = False,
    ):
        seed = non_negative_integer("seed", seed)
        if scores.dual:
            raise ValueError(
                f"the FAISS index folds K⁻¹ (k × k) into the queries, but with k = {scores.dim} > "
                f"n = {scores.n_train} the kernels are solved in the n × n dual: use the exact "
                "top_k(targets, k) without an index (it costs n·k per target)"
            )
        faiss = import_faiss()
        self.n_train = scores.n_train
        self.dim = scores.n_checkpoints * scores.dim
        if factory == "auto":
            lists = int(IVF_LISTS_PER_ROOT * np.sqrt(self.n_train))
            factory = "Flat" if self.n_train < EXACT_FAISS_BELOW else f"IVF{lists},Flat"
        self.factory = factory
        self.index: faiss.Index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not self.index.is_trained:
            lists = getattr(faiss.extract_index_ivf(self.index), "nlist", 1)
            sample = min(self.n_train, IVF_TRAIN_PER_LIST * lists)
            rows = np.sort(np.random.default_rng(seed).choice(self.n_train, sample, replace=False))
            self.index.train(np.ascontiguousarray(scores.train_vectors(rows)))
        columns = scores.column_blocks(scores.feature_rows)
        with progress_bar(len(columns), "FAISS index", progress) as advance:
            for lo, hi in columns:
                self.index.add(np.ascontiguousarray(scores.train_vectors(slice(lo, hi))))
                advance(1)
        self.nprobe = None
        if "IVF" in factory:
            self.nprobe = DEFAULT_NPROBE if nprobe is None else nprobe
            faiss.extract_index_ivf(self.index).nprobe = self.nprobe

    def search(self, queries: np.ndarray, k: int) -> tuple[Ranking, Ranking]:
        """Proponents and opponents of ``queries`` ``(rows, C·k)`` float32: two
        :class:`~datatrace.Ranking` ``(rows, k)``; index −1 (score ``-inf``/``inf``) where the
        probed lists hold fewer than ``k`` examples."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (rows, {self.dim}), got shape {queries.shape}")
        found = []
        for sign in (1.0, -1.0):
            values, indices = self.index.search(sign * queries, k)
            values = sign * values
            values[indices < 0] = sign * -np.inf
            found.append(Ranking(indices.astype(np.int64), values.astype(np.float32)))
        return found[0], found[1]


def faiss_top_k(
    scores: EnsembleScores,
    index: FaissIndex,
    featurize: TargetFeaturizer,
    n_targets: int,
    k: int,
    budget: int = DEFAULT_MEMORY_BUDGET,
) -> TopK:
    """Approximate top-``k`` from ``index``, targets featurized in blocks that fit ``budget``."""
    if index.n_train != scores.n_train or index.dim != scores.n_checkpoints * scores.dim:
        raise ValueError(
            f"the FAISS index holds {index.n_train} training vectors of {index.dim} dimensions, "
            f"but this estimator has {scores.n_train} of {scores.n_checkpoints * scores.dim}: "
            "build the index from this estimator (trak.faiss_index())"
        )
    k = min(k, scores.n_train)
    per_row = scores.n_checkpoints * scores.dim * 4 * (2 + SOLVE_COPIES) + k * 12 * 2
    rows = max(1, min(n_targets, budget // per_row))
    parts = []
    for lo in range(0, n_targets, rows):
        hi = min(lo + rows, n_targets)
        parts.append(index.search(scores.query_vectors(featurize(lo, hi)), k))
    return TopK(*(concatenate_rankings([part[side] for part in parts]) for side in (0, 1)))
