"""TRAK: attribution through randomly projected after-kernels, ensembled over checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datatrace._arguments import positive_integer, real_number
from datatrace._estimator import (
    check_fitted,
    checked_examples,
    checkpoint_list,
    gradient_features,
    reopen_features,
)
from datatrace.attributions import Attributions
from datatrace.data import Examples
from datatrace.grads.checkpoints import Checkpoint, uncompiled
from datatrace.grads.featurize import FINGERPRINT_EXAMPLES, GradientFeatures
from datatrace.grads.projectors import Projector
from datatrace.grads.selection import ParamSelection
from datatrace.methods.faiss_index import FaissIndex, faiss_top_k
from datatrace.methods.kernel import (
    DEFAULT_DAMPING,
    MIN_RELATIVE_DAMPING,
    Kernel,
    absolute_damping,
    damping_from_features,
    neighbour_sample,
    scaled_to_plain_trace,
    uses_dual,
    weighted_dual_gram,
    weighted_gram_and_statistics,
    weighted_statistics_of_gram,
)
from datatrace.methods.retrieval import (
    DEFAULT_MEMORY_BUDGET,
    EnsembleScores,
    TopK,
    stream_top_k,
    write_scores,
)
from datatrace.store import CheckpointFeatures, Store
from datatrace.store.provenance import batch_fingerprint
from datatrace.store.scores import ScoreMatrix, score_chunks
from datatrace.subsets.backends import Backend
from datatrace.tasks.base import Task


class TRAK:
    """TRAK attribution (Park et al. 2023) for any differentiable model.

    For each checkpoint ``c``: ``Φ_c`` holds the projected gradients ``Pᵀ∇_θ f(z_i; θ_c)`` of the
    training examples, ``K_c = Φ_cᵀΦ_c + λ_c I`` (float64), and a target ``z'`` with projected
    gradient ``φ'`` gets the scores ``φ' K_c⁻¹ Φ_cᵀ`` — computed as ``φ'Φ_cᵀ(Φ_cΦ_cᵀ + λ_c I)⁻¹``
    (the same numbers, from an ``n × n`` system) when ``k > n``. The ensemble is
    ``τ = mean_c(T_c) ⊙ mean_c(Q_c)`` with every checkpoint weighted equally and ``Q_c`` the
    out-to-loss weights of the training examples.

    Args:
        model: the module; it is never modified (checkpoints are swapped in functionally).
        task: what output is attributed (e.g. :class:`~datatrace.tasks.Classification`).
        proj_dim: projection dimension ``k``.
        projector: ``"auto"`` (default): ``"factgrass"``, per-layer projections computed from
            each layer's inputs and output gradients, never forming a per-example gradient of
            the whole model (``k`` split across layers by gradient energy; layers small next
            to their share of ``k`` and other parameters through one sparse JL of their exact
            gradients; docs/trak.md "Projections"); a store already holding features made with
            another built-in projection at this ``k`` keeps it. ``"sparse"``: per-example
            gradients, then sparse JL;
            ``"tensorsketch"``, ``"factgrass"``, ``"factorized"``
            (LoGra's dense factors), ``"dense"`` (Gaussian), ``"rademacher"``, ``"identity"`` (no
            projection), or a ``Projector``.
        damping: ``"auto"`` (default): ``λ_c`` from each checkpoint's features and the number of
            checkpoints (:func:`~datatrace.methods.kernel.damping_from_features`, docs/trak.md),
            times each target's own factor: how much of the training kernel its features see
            against the training examples' median
            (:func:`~datatrace.methods.kernel.target_damping_factor`; about 1 for targets like
            the training examples); a number: ``λ_c`` relative to the mean diagonal entry of
            ``Φ_cᵀΦ_c`` (``λ_c = damping · tr/k``), the same for every target.
        damping_absolute: if given, the absolute ``λ`` for every checkpoint (overrides ``damping``).
        kernel_weights: ``"auto"`` (default): where the task defines the loss's curvature in
            its output (:meth:`Task.curvature <datatrace.tasks.Task.curvature>`: ``Q(1 − Q)``
            for classifiers' margins and language models), the Gauss–Newton ``Φ_cᵀR_cΦ_c``
            with ``R_c`` those weights of the training examples under checkpoint ``c`` — the
            Newton step of TRAK's derivation, whose ``R`` the reference implementation drops
            (docs/defaults.md "TRAK's kernel": higher LDS or MRR at the default damping on 24
            of 28 rows, 14 classifier and language-model families with one checkpoint and
            their ensembles, equal on one; lower on rotated test digits, by 0.004 and 0.006,
            and on a near-separable binary classifier's ensemble); elsewhere (a
            squared error, diffusion losses) ``Φ_cᵀΦ_c``. The weights are scaled so that
            ``tr(Φ_cᵀR_cΦ_c) = tr(Φ_cᵀΦ_c)``: each checkpoint's scores keep the scale of the
            plain kernel's, and the ensemble's mean weighs checkpoints alike (a checkpoint
            whose ``Q`` collapsed would otherwise dominate it by ``1/R``). ``None``: the plain
            kernel ``Φ_cᵀΦ_c`` everywhere, as in MadryLab's ``traker`` (the default before
            2026-12-03).
        params: parameters to differentiate: name patterns or submodules (default: all).
        store: where features are kept: a directory (resumable, shareable), an fsspec URL, a
            :class:`~datatrace.store.Store`, or ``None`` for memory.
        seed: seed of the projections (checkpoint ``c`` uses its own seed derived from it).
        batch_size: examples per gradient batch, or ``"auto"``: the largest batch whose
            estimated memory fits ``memory_budget`` (:mod:`datatrace.grads.memory`).
        chunk_size: training examples per stored chunk (a crash loses at most one).
        device: where gradients are computed (default: the model's device).
        progress: show progress bars.
        memory_budget: bytes a batch is sized to with ``batch_size="auto"`` (default: half
            the free memory of a CUDA device; on the CPU a quarter of the free RAM, at most
            4 GiB).
        precision: ``None`` (the model's dtype), ``"bfloat16"`` or ``"float16"``: forward and
            backward passes under ``torch.autocast`` in that dtype, projections and features
            in float32, the kernel in float64 (see
            :class:`~datatrace.grads.featurize.GradientFeatures`).

    Attributes (after ``fit``):
        store_: the :class:`~datatrace.store.Store` holding features and kernels.
        n_train_: number of training examples.
        feature_dim_: ``k`` (``p`` for the identity projection).
        out_to_loss_: ``(n_checkpoints, n_train)`` weights ``Q_c`` of the training examples.
        damping_: ``(n_checkpoints,)`` absolute ``λ_c`` used (with ``damping="auto"``, before
            each target's factor).
        relative_damping_: ``(n_checkpoints,)`` the same, divided by the mean diagonal of
            ``Φ_cᵀΦ_c``.
        dual_: whether the kernels are solved in the ``n × n`` dual (``k > n``).
        kernel_weights_: ``"gauss-newton"`` (``Φ_cᵀR_cΦ_c``) or ``"none"`` (``Φ_cᵀΦ_c``): the
            kernels built; ``"mixed"`` where some checkpoints fell back to the plain kernel
            (every example's loss flat there).
        kernels_: per checkpoint, the :class:`~datatrace.methods.kernel.Kernel` (Cholesky factor).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        *,
        proj_dim: int | None = 2048,
        projector: str | Projector = "auto",
        damping: float | str = DEFAULT_DAMPING,
        damping_absolute: float | None = None,
        kernel_weights: str | None = "auto",
        params: ParamSelection = None,
        store: str | Path | Store | None = None,
        seed: int = 0,
        batch_size: int | str = 32,
        chunk_size: int = 512,
        device: torch.device | str | None = None,
        progress: bool = True,
        memory_budget: int | None = None,
        precision: str | None = None,
    ):
        self.model = uncompiled(model)
        self.task = task
        self.proj_dim = proj_dim
        self.projector = projector
        self.damping = damping
        self.damping_absolute = damping_absolute
        self.kernel_weights = kernel_weights
        self.params = params
        self.store = store
        self.seed = seed
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.device = device
        self.progress = progress
        self.memory_budget = memory_budget
        self.precision = precision

    def fit(
        self,
        train_data: Any,
        checkpoints: Sequence[Checkpoint] | Checkpoint | None = None,
        *,
        shard: tuple[int, int] | None = None,
        backend: str | Backend | None = None,
    ) -> TRAK:
        """Featurize the training set under each checkpoint and build the kernels.

        Resumes whatever the store already holds. With ``shard=(index, count)`` only that share of
        the row chunks is computed (for several processes on one store); the kernels are built
        once every chunk is present, so only a call that finds the store complete is fitted.
        Each primal ``ΦᵀΦ`` is the sum of the chunks' partial Grams, not a pass over ``Φ``.

        Args:
            train_data: training examples (Dataset, ordered DataLoader, tuple or dict of tensors).
            checkpoints: state dicts, modules or file paths; ``None`` for the model as it is.
            shard: optional ``(index, count)`` share of the featurization work.
            backend: ``None`` (default) featurizes in this process;
                ``LocalBackend(processes=N)`` or ``RayBackend(...)`` (or ``"processes"``,
                ``"ray"``) spreads row chunks × checkpoints over its workers, with claims so
                that several drivers can share one store and a dead one's chunks are taken over
                (:mod:`datatrace.grads.distributed`, docs/scale.md). The store is the same.

        Returns:
            ``self``.

        Raises:
            ValueError, TypeError: the training set is empty, or its first batch is malformed
                (:meth:`Task.check_batch <datatrace.tasks.Task.check_batch>`); raised before
                the store is opened, so nothing is written.
        """
        self._check_kernel_settings()
        features = gradient_features(self)
        train = checked_examples(train_data, "train", self.task, self.model, self.batch_size)
        checkpoints = checkpoint_list(self.model, checkpoints)
        store = Store(self.store) if not isinstance(self.store, Store) else self.store
        stored = features.featurize_train(train, checkpoints, store, shard, backend)
        self.store_ = store
        self.features_ = features
        self.checkpoints_ = checkpoints
        if not all(part.is_complete() for part in stored):
            del self.store_  # not fitted until every shard is written
            return self
        return self._build_kernels(stored)

    @classmethod
    def from_store(
        cls,
        store: str | Path | Store,
        model: nn.Module,
        task: Task,
        checkpoints: Sequence[Checkpoint] | Checkpoint | None = None,
        **settings: Any,
    ) -> TRAK:
        """A fitted TRAK rebuilt from a complete store, without the training data.

        The projector, its seed and the chunk size are read from the store's provenance; the
        kernels are rebuilt from the stored Grams. Before anything is used, the model's
        architecture, the parameter selection, the task and the projection are checked against
        the provenance, and each checkpoint against the fingerprint recorded when it was
        featurized. ``score(targets)`` then gives the scores the fitted estimator gave (with the
        same damping settings).

        Args:
            store: a directory, an fsspec URL or a :class:`~datatrace.store.Store` that a
                ``fit`` completed; nothing is created where there is no store.
            model: the module it was fitted with (same architecture).
            task: the task it was fitted with.
            checkpoints: the checkpoints it was fitted with, in the same order (the first ones
                of the store when fewer are given); ``None`` for the model as it is.
            **settings: other constructor arguments: ``damping``, ``damping_absolute``,
                ``params`` (the parameter selection of the fit: only its fingerprint is
                stored, so a selection other than the default must be passed again),
                ``batch_size``, ``device``, ``progress``; ``projector``, ``proj_dim`` and
                ``seed`` only to insist on values (checked against the store).

        Returns:
            A fitted :class:`TRAK`.

        Raises:
            FileNotFoundError: no store at ``store``.
            StoreMismatchError: the model, parameters, task, projection or a checkpoint differ
                from the fit's (the message names what differs).
            ValueError: the store holds no features, or not every row chunk of them.
        """
        estimator, stored = reopen_features(cls, store, model, task, checkpoints, settings)
        return estimator._build_kernels(stored)

    def add_examples(self, train_data: Any, *, backend: str | Backend | None = None) -> TRAK:
        """Add training examples to the fitted store: only they are featurized, and each kernel
        becomes the stored ``ΦᵀΦ`` plus their partial Grams (:mod:`datatrace.methods.incremental`).

        They become the last columns of the scores. The damping is chosen again (``"auto"``
        reads the features once for its statistics).

        Args:
            train_data: the new examples, in any form accepted by :meth:`fit`.
            backend: where to featurize them (as in :meth:`fit`).

        Returns:
            ``self``, refitted.
        """
        from datatrace.methods.incremental import add_examples

        check_fitted(self, "store_")
        new = checked_examples(train_data, "train", self.task, self.model, self.batch_size)
        add_examples(self.features_, new, self.checkpoints_, self._stored, self.store_, backend)
        for part in self._stored:
            part._require_complete("scoring with the added examples")
        return self._build_kernels(self._stored)

    def remove_examples(self, indices: Any) -> TRAK:
        """Remove training examples: their rows are marked removed in the store and each
        kernel is downdated by their contributions, nothing is featurized
        (:mod:`datatrace.methods.incremental`). The scores then have ``n_train_ - len(indices)``
        columns, those of the remaining examples in order, as a fit without them would give;
        ``train_rows_`` maps each column to its stored row.

        Args:
            indices: ``(r,)`` positions in the current training set (score columns), or a
                boolean mask ``(n_train_,)``, True where the example is removed.

        Returns:
            ``self``, refitted.
        """
        from datatrace.methods.incremental import remove_examples

        check_fitted(self, "store_")
        remove_examples(self._stored, indices)
        return self._build_kernels(self._stored)

    @property
    def train_rows_(self) -> np.ndarray:
        """``(n_train,)`` the stored row of each training example (score column); ``arange``
        unless examples were added after padding or removed."""
        check_fitted(self, "store_")
        return self._stored[0].train_rows()

    def _build_kernels(self, stored: list[CheckpointFeatures]) -> TRAK:
        """Fitted state from the complete stored features of every checkpoint."""
        self._check_kernel_settings()
        self._stored = stored
        self.n_train_ = stored[0].n_train  # less removed examples (add/remove_examples)
        self.feature_dim_ = self.features_.dim
        self.out_to_loss_ = np.stack([part.train_out_to_loss() for part in stored])
        self.dual_ = uses_dual(self.feature_dim_, self.n_train_)
        statistics, self.kernels_, weighted_kernels = [], [], []
        for part, out_to_loss in zip(stored, self.out_to_loss_):
            # one checkpoint's Gram in memory at a time; the dual Gram also gives the statistics
            # (trace, neighbour cosines) without Φ
            gram = part.gram(dual=True) if self.dual_ else None
            plain = part.statistics(gram)
            weights = self._kernel_weights(out_to_loss)
            plain_gram = None
            weighted_kernels.append(weights is not None)
            if weights is None:
                gram = part.gram() if gram is None else gram
                statistics.append(plain)
            else:
                gram, plain_gram, weights, weighted = self._weighted_kernel(
                    part, gram, plain, weights
                )
                statistics.append(weighted)
            damping = self._damping(statistics[-1])
            per_target = self._per_target_damping()
            self.kernels_.append(
                Kernel(
                    gram,
                    damping,
                    self.dual_,
                    coupling=statistics[-1].coupling if per_target else None,
                    floor=MIN_RELATIVE_DAMPING * statistics[-1].mean_diagonal,
                    weights=weights if self.dual_ else None,
                    plain_gram=plain_gram,
                )
            )
            del gram, plain_gram
        self.kernel_weights_ = (
            "gauss-newton"
            if all(weighted_kernels)
            else "none"
            if not any(weighted_kernels)
            else "mixed"
        )
        self.damping_ = np.array([kernel.damping for kernel in self.kernels_])
        self.relative_damping_ = self.damping_ / [stats.mean_diagonal for stats in statistics]
        return self

    def _check_kernel_settings(self) -> None:
        """Refuse a damping or kernel setting that cannot work before anything is featurized
        (the kernels are built after every feature is stored)."""
        if self.kernel_weights is not None and self.kernel_weights != "auto":
            raise ValueError(
                f"kernel_weights must be 'auto' (the task's Gauss–Newton weights where it has "
                f"them) or None (the plain kernel ΦᵀΦ), got {self.kernel_weights!r}"
            )
        if self.damping != "auto":
            relative = " (relative to the mean diagonal of ΦᵀΦ)"
            real_number("damping", self.damping, note=relative, alternative=" or 'auto'")
        if self.damping_absolute is not None:
            real_number("damping_absolute", self.damping_absolute, alternative=" or None")

    def _kernel_weights(self, out_to_loss: np.ndarray) -> np.ndarray | None:
        """``(n_train,)`` the diagonal of ``R`` for one checkpoint's ``Q``, or ``None`` for the
        plain kernel (``kernel_weights=None``, or a task without a curvature)."""
        if self.kernel_weights is None:
            return None
        weights = self.task.curvature(out_to_loss)
        if weights is None:
            return None
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != out_to_loss.shape or not np.all(np.isfinite(weights) & (weights >= 0)):
            raise ValueError(
                f"{type(self.task).__name__}.curvature must return {out_to_loss.shape} finite, "
                "non-negative weights"
            )
        if not weights.any():
            return None  # every example's loss is flat: nothing to weight by
        return weights

    def _weighted_kernel(self, part: CheckpointFeatures, dual_gram, plain, weights):
        """``(gram, plain_gram, weights, statistics)`` of one checkpoint's Gauss–Newton kernel,
        its weights scaled to the plain kernel's trace (:func:`scaled_to_plain_trace`): in the
        dual from the plain ``ΦΦᵀ`` (kept as ``plain_gram``), in the primal from one pass over
        ``Φ`` (``plain_gram`` ``None``)."""
        if self.dual_:
            weighted = weighted_statistics_of_gram(dual_gram, weights, plain)
            gram = weighted_dual_gram(dual_gram, weights)
        else:
            # The plain ΦᵀΦ is folded from the partial Grams featurizing stored and kept, as for
            # the plain kernel: the store's layout and checks are the same for either kernel,
            # and a reopening with kernel_weights=None finds it built.
            part.gram()
            rows = neighbour_sample(part.n_train)
            sample = part.features[part.train_rows()[rows], :]
            gram, weighted = weighted_gram_and_statistics(
                part.iter_chunks(), weights, plain, sample, rows
            )
        gram, weights, weighted = scaled_to_plain_trace(gram, weights, weighted, plain)
        return gram, dual_gram, weights, weighted

    def _per_target_damping(self) -> bool:
        """Whether each target gets its own multiple of ``λ_c`` (``damping="auto"`` only:
        :func:`~datatrace.methods.kernel.target_damping_factor`)."""
        return self.damping_absolute is None and self.damping == "auto"

    def _damping(self, statistics) -> float:
        if self.damping_absolute is not None:
            return float(self.damping_absolute)
        if self.damping == "auto":
            return damping_from_features(statistics, len(self.checkpoints_))
        return absolute_damping(statistics, float(self.damping))

    def score(
        self,
        targets: Any,
        *,
        name: str | None = None,
        task: Task | None = None,
        out: str | Path | Store | None = None,
        memory_budget: int | None = None,
    ) -> Attributions | ScoreMatrix:
        """Attribute each target to the training examples.

        Args:
            targets: target examples, in any form accepted for training data.
            name: if given, also save the result in the store under ``scores/<name>``; with
                ``out`` a store or path, the name of the streamed matrix there (default
                ``"scores"``).
            task: another output for the targets only (e.g.
                :class:`~datatrace.tasks.ClassLogit`, one class's logit per target row), with
                the same parameters and projections as the training features; default: the
                task the estimator was fitted with.
            out: stream the scores into a store instead of memory (docs/scale.md): a name
                (a string: ``scores/<out>`` in the estimator's store), or a
                :class:`~datatrace.store.Store` or a directory ``Path`` (``scores/<name>``
                there). The matrix is written chunk by chunk, each checksummed and marked done;
                calling again with the same targets after an interruption computes only the
                missing chunks.
            memory_budget: with ``out``, the working memory in bytes (default
                :data:`~datatrace.methods.retrieval.DEFAULT_MEMORY_BUDGET`, 1 GiB); it sets how many
                targets are scored per pass over the training features.

        Returns:
            :class:`~datatrace.Attributions` with ``scores`` of shape ``(n_targets, n_train)``;
            with ``out``, the complete :class:`~datatrace.store.scores.ScoreMatrix` (read it by
            ``.rows(lo, hi)``, ``.columns(lo, hi)`` or slices).

        Raises:
            ValueError, TypeError: no targets, or their first batch is malformed
                (:meth:`Task.check_batch <datatrace.tasks.Task.check_batch>`);
                ``memory_budget`` without ``out``, or too small for one block of targets.
            StoreMismatchError: ``out`` names a matrix of other targets or another fit.
        """
        check_fitted(self, "store_")
        if out is not None:
            return self._score_to_store(targets, out, name, task, memory_budget)
        if memory_budget is not None:
            raise ValueError(
                "memory_budget bounds the memory of streamed scores: pass out=... with it (the "
                "in-memory score matrix needs n_targets × n_train × 4 bytes)"
            )
        features = self.features_
        if task is not None and task is not self.task:
            features = gradient_features(self, task, features.projector)
        targets = checked_examples(targets, "targets", features.task, self.model, self.batch_size)
        total = None
        for index, checkpoint in enumerate(self.checkpoints_):
            target_features, _ = features.featurize_all(
                targets,
                checkpoint,
                index,
                f"targets, checkpoint {index + 1}/{len(self.checkpoints_)}",
            )
            scores = self.kernels_[index].scores(
                target_features,
                self._stored[index].iter_chunks(),
                self.n_train_,
            )
            total = scores if total is None else total + scores
        mean_out_to_loss = self.out_to_loss_.mean(axis=0)
        scores = total / len(self.checkpoints_) * mean_out_to_loss[None, :].astype(np.float32)
        attributions = Attributions(scores, "TRAK", mean_out_to_loss, self._info())
        if name is not None:
            self.store_.save_attributions(name, attributions)
        return attributions

    def _info(self) -> dict[str, Any]:
        return {
            "projector": self.features_.projector.config(),
            "feature_dim": self.feature_dim_,
            "n_checkpoints": len(self.checkpoints_),
            "damping": None if self.damping_absolute is not None else self.damping,
            "damping_absolute": self.damping_.tolist(),
            "damping_relative": self.relative_damping_.tolist(),
            "per_target_damping": self._per_target_damping(),
            "kernel_weights": self.kernel_weights_,
            "dual": self.dual_,
            "n_params": int(sum(self.features_.sizes)),
            "seed": self.seed,
        }

    # -- queries that never hold the whole score matrix (docs/scale.md) ----------------------

    def top_k(
        self,
        targets: Any,
        k: int = 10,
        *,
        task: Task | None = None,
        index: FaissIndex | None = None,
        memory_budget: int | None = None,
    ) -> TopK:
        """The ``k`` strongest proponents and opponents of each target, without the score matrix.

        Exact by default: the scores of :meth:`score` are computed block by block over the
        stored training features with a running top-k, ties broken by the lower training
        index (as a stable ``argsort`` of the full rows). With ``index`` (from
        :meth:`faiss_index`), approximate: one inner-product search per target.

        Args:
            targets: target examples, in any form accepted for training data.
            k: examples per target and side (at most ``n_train``).
            task: another output for the targets only, as in :meth:`score`.
            index: a :class:`~datatrace.methods.faiss_index.FaissIndex` built from this estimator.
            memory_budget: working memory in bytes (default
                :data:`~datatrace.methods.retrieval.DEFAULT_MEMORY_BUDGET`).

        Returns:
            :class:`~datatrace.methods.retrieval.TopK`: ``proponents`` and ``opponents``, each a
            :class:`~datatrace.Ranking` with ``indices`` and ``scores`` ``(n_targets, k)``,
            strongest first.

        Raises:
            ValueError: ``k < 1``, or the budget is too small for one target.
        """
        check_fitted(self, "store_")
        k = positive_integer("k", k)
        examples, featurize, _ = self._target_featurizer(targets, task)
        scores = self._ensemble()
        budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
        if index is not None:
            return faiss_top_k(scores, index, featurize, examples.n, k, budget)
        _, width = score_chunks(examples.n, self.n_train_, scores.feature_rows)
        return stream_top_k(scores, featurize, examples.n, k, width, budget, self.progress)

    def self_influence(self) -> np.ndarray:
        """Each training example's score on itself, from the stored features (no featurizing).

        ``q̄_i · mean_c φ_{i,c} K_c⁻¹ φ_{i,c}ᵀ``: the diagonal of :meth:`score` with the
        training set as targets (same ensemble, same ``Q``), computed in float64.

        Returns:
            ``(n_train,)`` float32.
        """
        check_fitted(self, "store_")
        return self._ensemble().self_influence(self.progress)

    def faiss_index(
        self, factory: str = "auto", *, nprobe: int | None = None, seed: int = 0
    ) -> FaissIndex:
        """A FAISS inner-product index over the kernel-folded training vectors, for approximate
        :meth:`top_k` (``pip install "datatrace[faiss]"``).

        Args:
            factory: a FAISS ``index_factory`` string, or ``"auto"`` (exact ``"Flat"`` for
                small training sets, else ``"IVF{√n},Flat"``).
            nprobe: inverted lists searched per query (IVF; default 32).
            seed: seed of the sample the inverted lists are fitted on.

        Returns:
            :class:`~datatrace.methods.faiss_index.FaissIndex` (pass it as ``top_k(...,
            index=...)``).

        Raises:
            ImportError: faiss is not installed.
            ValueError: the kernels are dual (``k > n``, :attr:`dual_`): there is no ``k × k``
                inverse to fold into the queries; exact :meth:`top_k` is cheap there.
        """
        check_fitted(self, "store_")
        return FaissIndex(self._ensemble(), factory, nprobe, seed, self.progress)

    def _ensemble(self) -> EnsembleScores:
        return EnsembleScores(self.kernels_, self._stored, self.out_to_loss_)

    def _target_featurizer(self, targets: Any, task: Task | None):
        """The checked targets, ``featurize(start, stop)`` (per checkpoint, the features of
        targets ``start:stop``) and the targets' task."""
        features: GradientFeatures = self.features_
        if task is not None and task is not self.task:
            features = gradient_features(self, task, features.projector)
        examples = checked_examples(targets, "targets", features.task, self.model, self.batch_size)
        count = len(self.checkpoints_)

        def featurize(start: int, stop: int) -> list[torch.Tensor]:
            batch = examples.read(start, stop)
            return [
                features.featurize_all(
                    batch, checkpoint, index, f"targets, checkpoint {index + 1}/{count}"
                )[0]
                for index, checkpoint in enumerate(self.checkpoints_)
            ]

        return examples, featurize, features.task

    def _score_to_store(
        self,
        targets: Any,
        out: str | Path | Store,
        name: str | None,
        task: Task | None,
        memory_budget: int | None,
    ) -> ScoreMatrix:
        if isinstance(out, str):
            if name is not None:
                raise ValueError(
                    f"out={out!r} already names the matrix in the estimator's store: leave "
                    "name= out, or pass a Store or Path as out="
                )
            store, name = self.store_, out
        else:
            store, name = (out if isinstance(out, Store) else Store(out)), name or "scores"
        examples, featurize, target_task = self._target_featurizer(targets, task)
        scores = self._ensemble()
        budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
        rows, width = score_chunks(examples.n, self.n_train_, scores.feature_rows)
        rows = min(rows, scores.block_rows(budget, examples.n, width))
        matrix = ScoreMatrix.create(
            store,
            name,
            (examples.n, self.n_train_),
            (rows, width),
            self._query_provenance(examples, target_task),
            scores.mean_out_to_loss,
            "TRAK",
            self._info(),
        )
        return write_scores(scores, matrix, featurize, budget, self.progress)

    def _query_provenance(self, examples: Examples, task: Task) -> dict[str, Any]:
        """What a streamed score matrix depends on: the fit and the targets."""
        first = examples.read(0, min(examples.n, FINGERPRINT_EXAMPLES))
        return {
            "features": self.store_.provenance("features"),
            "checkpoints": [dict(part.group.attrs.get("identity", {})) for part in self._stored],
            "train_rows": batch_fingerprint(self._stored[0].train_rows()),
            "damping": self.damping_.tolist(),
            # each target's own factor (damping="auto"): the coupling it is measured against
            "target_damping": [
                kernel.coupling if kernel.coupling is not None else "none"
                for kernel in self.kernels_
            ],
            "dual": self.dual_,
            "kernel_weights": self.kernel_weights_,
            "target_task": task.config(),
            "n_targets": examples.n,
            "targets": batch_fingerprint(first),
        }
