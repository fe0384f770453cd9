"""Baseline attribution methods with TRAK's API, for comparison.

- :class:`GradientDot`: TracIn at the given checkpoints, oriented like every datatrace score: the
  first-order change of the target's output from a gradient step on the training example.
- :class:`GradientCosine`: cosine similarity of the projected output gradients.
- :class:`RepresentationSimilarity`: cosine similarity of penultimate-layer representations.

The gradient baselines read the same stored features as :class:`~datatrace.TRAK` (same model,
task, projector and seed give the same store), so they cost nothing more after a TRAK run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datatrace._arguments import named_device, positive_integer
from datatrace._estimator import (
    check_fitted,
    checked_examples,
    checkpoint_list,
    gradient_features,
    reopen_features,
)
from datatrace.attributions import Attributions
from datatrace.data import Examples, batch_to
from datatrace.grads.checkpoints import Checkpoint, load_checkpoint, uncompiled
from datatrace.grads.featurize import default_device
from datatrace.grads.per_example import PerExampleGradients
from datatrace.grads.projectors import Projector
from datatrace.grads.selection import ParamSelection
from datatrace.progress import progress_bar
from datatrace.store import Store
from datatrace.subsets.backends import Backend
from datatrace.tasks.base import Task


class _GradientBaseline:
    """Featurizes like TRAK; subclasses say how target and training features combine."""

    method = ""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        *,
        proj_dim: int | None = 2048,
        projector: str | Projector = "auto",
        params: ParamSelection = None,
        store: str | Path | Store | None = None,
        seed: int = 0,
        batch_size: int = 32,
        chunk_size: int = 512,
        device: torch.device | str | None = None,
        progress: bool = True,
    ):
        self.model = uncompiled(model)
        self.task = task
        self.proj_dim = proj_dim
        self.projector = projector
        self.params = params
        self.store = store
        self.seed = seed
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.device = device
        self.progress = progress

    def fit(
        self,
        train_data: Any,
        checkpoints: Sequence[Checkpoint] | Checkpoint | None = None,
        *,
        backend: str | Backend | None = None,
    ) -> _GradientBaseline:
        """Featurize the training set under each checkpoint (or reuse a store that has it).

        Args:
            train_data: training examples.
            checkpoints: state dicts, modules or file paths; ``None`` for the model as it is.
            backend: where to featurize, as in :meth:`TRAK.fit <datatrace.TRAK.fit>`.

        Returns:
            ``self``.

        Raises:
            ValueError, TypeError: the training set is empty or its first batch is malformed;
                raised before the store is opened.
        """
        features = gradient_features(self)
        train = checked_examples(train_data, "train", self.task, self.model, self.batch_size)
        self.features_ = features
        self.checkpoints_ = checkpoint_list(self.model, checkpoints)
        store = self.store if isinstance(self.store, Store) else Store(self.store)
        self.store_ = store
        self.stored_ = self.features_.featurize_train(
            train, self.checkpoints_, store, backend=backend
        )
        self.n_train_ = self.stored_[0].n_train
        return self

    @classmethod
    def from_store(
        cls,
        store: str | Path | Store,
        model: nn.Module,
        task: Task,
        checkpoints: Sequence[Checkpoint] | Checkpoint | None = None,
        **settings: Any,
    ) -> _GradientBaseline:
        """A fitted estimator on the features of a complete store, without the training data.

        Verifies the store as :meth:`TRAK.from_store <datatrace.TRAK.from_store>` does (model,
        parameters, task, projection, checkpoints, completeness); arguments as there.
        """
        estimator, stored = reopen_features(cls, store, model, task, checkpoints, settings)
        estimator.stored_ = stored
        estimator.n_train_ = stored[0].n_train  # less examples removed from the store
        return estimator

    def score(self, targets: Any) -> Attributions:
        """Scores ``(n_targets, n_train)``: the mean over checkpoints of :meth:`_combine`."""
        check_fitted(self, "stored_")
        targets = checked_examples(
            targets, "targets", self.features_.task, self.model, self.batch_size
        )
        total = None
        for index, checkpoint in enumerate(self.checkpoints_):
            target_features, _ = self.features_.featurize_all(
                targets,
                checkpoint,
                index,
                f"targets, checkpoint {index + 1}/{len(self.checkpoints_)}",
            )
            stored = self.stored_[index]
            scores = np.empty((len(target_features), self.n_train_), dtype=np.float32)
            out_to_loss = stored.train_out_to_loss()
            for start, stop, block in stored.iter_chunks():
                weights = out_to_loss[start:stop]
                scores[:, start:stop] = self._combine(
                    target_features, torch.as_tensor(block), torch.as_tensor(weights)
                )
            total = scores if total is None else total + scores
        return Attributions(
            total / len(self.checkpoints_),
            self.method,
            info={
                "projector": self.features_.projector.config(),
                "n_checkpoints": len(self.checkpoints_),
            },
        )

    def _combine(
        self, targets: torch.Tensor, train: torch.Tensor, out_to_loss: torch.Tensor
    ) -> np.ndarray:
        raise NotImplementedError


class GradientDot(_GradientBaseline):
    """TracIn (Pruthi et al. 2020) at the given checkpoints, in datatrace's orientation.

    Score of training example ``z`` for target ``z'``: ``mean_c Q_c(z)·⟨φ_c(z'), φ_c(z)⟩``, where
    ``φ_c`` are projected output gradients. A gradient step on ``z`` moves the parameters by
    ``η·Q(z)·∇f(z)``, which changes the target's output by ``η·Q(z)·⟨∇f(z'), ∇f(z)⟩``: positive
    scores push the target's output up, as in TRAK. Checkpoints are weighted equally (multiply by
    the learning rate of each checkpoint yourself if they differ). Arguments as for TRAK.
    """

    method = "GradientDot"

    def _combine(self, targets, train, out_to_loss):
        return (targets @ train.T * out_to_loss[None, :]).numpy()


class GradientCosine(_GradientBaseline):
    """Cosine similarity of projected output gradients, averaged over checkpoints."""

    method = "GradientCosine"

    def _combine(self, targets, train, out_to_loss):
        normalise = lambda rows: rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)  # noqa: E731
        return (normalise(targets) @ normalise(train).T).numpy()


class RepresentationSimilarity:
    """Cosine similarity of the representations a layer receives, averaged over checkpoints.

    Args:
        model: the module.
        task: used to run the model on a batch (its output is discarded).
        layer: the module whose *input* is the representation; default: the last ``nn.Linear``
            of the model (the penultimate-layer features of a classifier).
        batch_size: examples per forward pass.
        device: where the model runs (default: the model's device).
        progress: show progress bars.
    """

    method = "RepresentationSimilarity"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        *,
        layer: nn.Module | None = None,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        progress: bool = True,
    ):
        self.model = uncompiled(model)
        self.task = task
        self.layer = layer
        self.batch_size = batch_size
        self.device = device
        self.progress = progress

    def _layer(self) -> nn.Module:
        if self.layer is not None:
            if not any(module is self.layer for module in self.model.modules()):
                raise ValueError(
                    f"layer {type(self.layer).__name__} is not a module of the model: pass one "
                    "of model.modules() (the representation is that layer's input)"
                )
            return self.layer
        linear = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if not linear:
            raise ValueError("the model has no nn.Linear layer: pass layer= explicitly")
        return linear[-1]

    @torch.no_grad()
    def _representations(self, data: Any, checkpoint: Checkpoint) -> torch.Tensor:
        device = named_device(self.device) if self.device else default_device(self.model)
        state = load_checkpoint(checkpoint, self.model, device)
        runner = PerExampleGradients(self.model, self.task, [])
        layer = self._layer()
        captured: list[torch.Tensor] = []
        examples = Examples(data)
        with progress_bar(examples.n, "representations", self.progress) as advance:
            for batch in examples.batches(0, examples.n, self.batch_size):
                # Checked before the layer is hooked: the check may run the model on an example.
                batch = batch_to(self.task.check_batch(self.model, batch), device)
                hook = layer.register_forward_hook(
                    lambda module, inputs, output: captured.append(
                        inputs[0].flatten(1).float().cpu()
                    )
                )
                try:
                    runner.outputs(state, batch)
                finally:
                    hook.remove()
                advance(len(captured[-1]))
        features = torch.cat(captured)
        return features / features.norm(dim=1, keepdim=True).clamp_min(1e-30)

    def fit(
        self, train_data: Any, checkpoints: Sequence[Checkpoint] | Checkpoint | None = None
    ) -> RepresentationSimilarity:
        """Compute the training set's normalised representations under each checkpoint."""
        positive_integer("batch_size", self.batch_size)
        self._layer()
        train_data = checked_examples(train_data, "train", self.task, self.model, self.batch_size)
        self.checkpoints_ = checkpoint_list(self.model, checkpoints)
        self.train_representations_ = [
            self._representations(train_data, c) for c in self.checkpoints_
        ]
        return self

    def score(self, targets: Any) -> Attributions:
        """Mean cosine similarity over checkpoints, ``(n_targets, n_train)``."""
        check_fitted(self, "train_representations_")
        targets = checked_examples(targets, "targets", self.task, self.model, self.batch_size)
        total = sum(
            self._representations(targets, checkpoint) @ train.T
            for checkpoint, train in zip(self.checkpoints_, self.train_representations_)
        )
        return Attributions(
            (total / len(self.checkpoints_)).numpy(),
            self.method,
            info={"n_checkpoints": len(self.checkpoints_)},
        )
