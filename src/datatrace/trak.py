"""TRAK: attribution through randomly projected after-kernels, ensembled over checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datatrace._estimator import (
    check_fitted,
    checked_examples,
    checkpoint_list,
    gradient_features,
    reopen_features,
)
from datatrace.attributions import Attributions
from datatrace.grads.checkpoints import Checkpoint
from datatrace.grads.projectors import Projector
from datatrace.grads.selection import ParamSelection
from datatrace.kernel import (
    DEFAULT_DAMPING,
    Kernel,
    absolute_damping,
    damping_from_features,
    uses_dual,
)
from datatrace.store import CheckpointFeatures, Store
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
        projector: ``"auto"`` (default): for a million selected parameters or more, per-layer
            projections computed from each layer's inputs and output gradients, never forming a
            per-example gradient (FactGraSS, ``k`` split across layers by gradient energy;
            other parameters by per-example gradients and sparse JL); below, ``"sparse"``
            (docs/trak.md "Projections"). ``"sparse"``: per-example gradients, then sparse JL;
            ``"tensorsketch"``, ``"factgrass"``, ``"factorized"``
            (LoGra's dense factors), ``"dense"`` (Gaussian), ``"rademacher"``, ``"identity"`` (no
            projection), or a ``Projector``.
        damping: ``"auto"`` (default): ``λ_c`` from each checkpoint's features and the number of
            checkpoints (:func:`~datatrace.kernel.damping_from_features`, docs/trak.md); a
            number: ``λ_c`` relative to the mean diagonal entry of ``Φ_cᵀΦ_c``
            (``λ_c = damping · tr/k``).
        damping_absolute: if given, the absolute ``λ`` for every checkpoint (overrides ``damping``).
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
        damping_: ``(n_checkpoints,)`` absolute ``λ_c`` used.
        relative_damping_: ``(n_checkpoints,)`` the same, divided by the mean diagonal of
            ``Φ_cᵀΦ_c``.
        dual_: whether the kernels are solved in the ``n × n`` dual (``k > n``).
        kernels_: per checkpoint, the :class:`~datatrace.kernel.Kernel` (Cholesky factor).
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
        self.model = model
        self.task = task
        self.proj_dim = proj_dim
        self.projector = projector
        self.damping = damping
        self.damping_absolute = damping_absolute
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
    ) -> TRAK:
        """Featurize the training set under each checkpoint and build the kernels.

        Resumes whatever the store already holds. With ``shard=(index, count)`` only that share of
        the row chunks is computed (for several processes on one store); the kernels are built
        once every chunk is present, so only a call that finds the store complete is fitted.

        Args:
            train_data: training examples (Dataset, ordered DataLoader, tuple or dict of tensors).
            checkpoints: state dicts, modules or file paths; ``None`` for the model as it is.
            shard: optional ``(index, count)`` share of the featurization work.

        Returns:
            ``self``.

        Raises:
            ValueError, TypeError: the training set is empty, or its first batch is malformed
                (:meth:`Task.check_batch <datatrace.tasks.Task.check_batch>`); raised before
                the store is opened, so nothing is written.
        """
        features = gradient_features(self)
        train = checked_examples(train_data, "train", self.task, self.model, self.batch_size)
        checkpoints = checkpoint_list(self.model, checkpoints)
        store = Store(self.store) if not isinstance(self.store, Store) else self.store
        stored = features.featurize_train(train, checkpoints, store, shard)
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

    def _build_kernels(self, stored: list[CheckpointFeatures]) -> TRAK:
        """Fitted state from the complete stored features of every checkpoint."""
        self._stored = stored
        self.n_train_ = stored[0].n_rows
        self.feature_dim_ = self.features_.dim
        self.out_to_loss_ = np.stack([part.out_to_loss[:] for part in stored])
        statistics = [part.statistics() for part in stored]
        self.damping_ = np.array([self._damping(stats) for stats in statistics])
        self.relative_damping_ = self.damping_ / [stats.mean_diagonal for stats in statistics]
        self.dual_ = uses_dual(self.feature_dim_, self.n_train_)
        self.kernels_ = [
            Kernel(part.gram(dual=self.dual_), damping, self.dual_)
            for part, damping in zip(stored, self.damping_)
        ]
        return self

    def _damping(self, statistics) -> float:
        if self.damping_absolute is not None:
            if not self.damping_absolute >= 0:
                raise ValueError(
                    f"damping_absolute must be non-negative, got {self.damping_absolute}"
                )
            return float(self.damping_absolute)
        if isinstance(self.damping, str):
            if self.damping != "auto":
                raise ValueError(
                    f"damping must be 'auto' or a number (relative to the mean diagonal of ΦᵀΦ), "
                    f"got {self.damping!r}"
                )
            return damping_from_features(statistics, len(self.checkpoints_))
        return absolute_damping(statistics, float(self.damping))

    def score(
        self, targets: Any, *, name: str | None = None, task: Task | None = None
    ) -> Attributions:
        """Attribute each target to the training examples.

        Args:
            targets: target examples, in any form accepted for training data.
            name: if given, also save the result in the store under ``scores/<name>``.
            task: another output for the targets only (e.g.
                :class:`~datatrace.tasks.ClassLogit`, one class's logit per target row), with
                the same parameters and projections as the training features; default: the
                task the estimator was fitted with.

        Returns:
            :class:`~datatrace.Attributions` with ``scores`` of shape ``(n_targets, n_train)``.

        Raises:
            ValueError, TypeError: no targets, or their first batch is malformed
                (:meth:`Task.check_batch <datatrace.tasks.Task.check_batch>`).
        """
        check_fitted(self, "store_")
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
            "dual": self.dual_,
            "n_params": int(sum(self.features_.sizes)),
            "seed": self.seed,
        }
