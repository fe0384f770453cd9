"""Featurizing: projected per-example gradients and out-to-loss weights, chunk by chunk.

Shared by TRAK and the gradient baselines, so that they all read the same stored features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from datatrace.data import Examples, batch_to
from datatrace.grads.checkpoints import Checkpoint, load_checkpoint
from datatrace.grads.per_example import PerExampleGradients, task_for_checkpoint
from datatrace.grads.projectors import Projector, derive_seed
from datatrace.grads.selection import ParamSelection, select_parameters
from datatrace.progress import progress_bar
from datatrace.store import CheckpointFeatures, Store
from datatrace.store.provenance import (
    architecture_fingerprint,
    batch_fingerprint,
    tensors_fingerprint,
)
from datatrace.tasks.base import Task

# Training examples whose values are hashed into the provenance to recognise the training set.
FINGERPRINT_EXAMPLES = 16


def default_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


class GradientFeatures:
    """Projected gradients ``φ = Pᵀ∇_θ f(z; θ_c)`` and weights ``Q(z; θ_c)`` for each checkpoint.

    Args:
        model: the module whose outputs are attributed.
        task: defines ``f`` and ``Q``.
        projector: the random projection (see :mod:`datatrace.grads.projectors`).
        params: which parameters to differentiate (see :data:`ParamSelection`).
        seed: base seed; checkpoint ``c`` is projected with ``derive_seed(seed, "checkpoint", c)``.
        batch_size: examples per per-example-gradient batch (bounds memory: ``batch_size × p``).
        chunk_rows: training examples per stored chunk (the unit of resumption).
        device: where gradients are computed; defaults to the model's device.
        progress: show progress bars.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        projector: Projector,
        params: ParamSelection = None,
        seed: int = 0,
        batch_size: int = 32,
        chunk_rows: int = 512,
        device: torch.device | str | None = None,
        progress: bool = True,
    ):
        if batch_size < 1 or chunk_rows < 1:
            raise ValueError("batch_size and chunk_rows must be positive")
        self.model = model
        self.task = task
        self.projector = projector
        self.params = params
        self.seed = seed
        self.batch_size = batch_size
        self.chunk_rows = chunk_rows
        self.device = torch.device(device) if device is not None else default_device(model)
        self.progress = progress
        self.param_names = select_parameters(model, params)
        self._gradients = PerExampleGradients(model, task, self.param_names)
        # (checkpoint, state, gradients) of the checkpoint last prepared (see gradients_for).
        self._prepared: tuple[int, dict, PerExampleGradients] | None = None
        named = dict(model.named_parameters())
        self.sizes = [named[name].numel() for name in self.param_names]
        self.dim = projector.output_dim(self.sizes)

    def projection_seed(self, checkpoint: int) -> int:
        return derive_seed(self.seed, "checkpoint", checkpoint)

    def load(self, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        return load_checkpoint(checkpoint, self.model, self.device)

    def provenance(self, train: Examples) -> dict[str, Any]:
        return {
            "model": architecture_fingerprint(self.model),
            "params": {
                "count": len(self.param_names),
                "size": int(sum(self.sizes)),
                "names": batch_fingerprint(self.param_names),
            },
            "task": self.task.config(),
            "projector": self.projector.config(),
            "feature_dim": self.dim,
            "seed": self.seed,
            "n_train": train.n,
            "train_data": batch_fingerprint(train.read(0, min(train.n, FINGERPRINT_EXAMPLES))),
            "chunk_rows": self.chunk_rows,
        }

    def gradients_for(self, state: dict[str, torch.Tensor], checkpoint: int) -> PerExampleGradients:
        """The gradient computation under checkpoint ``checkpoint`` (whose parameters and buffers
        are ``state``), with the task that ``Task.for_checkpoint`` gives for it. The last one is
        kept, so that the task is prepared once per checkpoint, not once per batch."""
        cached = self._prepared
        if cached is not None and cached[0] == checkpoint and cached[1] is state:
            return cached[2]
        task = task_for_checkpoint(self.model, self.task, state, checkpoint)
        gradients = (
            self._gradients
            if task is self.task
            else PerExampleGradients(self.model, task, self.param_names)
        )
        self._prepared = (checkpoint, state, gradients)
        return gradients

    def featurize(
        self, state: dict[str, torch.Tensor], batch: Any, checkpoint: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``(batch_size, k)`` and out-to-loss weights ``(batch_size,)`` of one batch,
        on the CPU in float32."""
        gradients = self.gradients_for(state, checkpoint)
        batch = batch_to(batch, self.device)
        grads = gradients.gradients(state, batch)
        features = self.projector.project(
            [grads[name] for name in self.param_names], self.projection_seed(checkpoint)
        )
        out_to_loss = gradients.out_to_loss(state, batch)
        return features.float().cpu(), out_to_loss.float().cpu()

    def featurize_all(
        self, data: Any, checkpoint: Checkpoint, index: int, description: str = "featurizing"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and weights of all of ``data`` under checkpoint ``index``, in memory."""
        examples = Examples(data)
        state = self.load(checkpoint)
        features, weights = [], []
        with progress_bar(examples.n, description, self.progress) as advance:
            for lo in range(0, examples.n, self.batch_size):
                hi = min(lo + self.batch_size, examples.n)
                batch_features, batch_weights = self.featurize(state, examples.read(lo, hi), index)
                features.append(batch_features)
                weights.append(batch_weights)
                advance(hi - lo)
        self._prepared = None  # let the checkpoint's tensors go
        return torch.cat(features), torch.cat(weights)

    def featurize_train(
        self,
        data: Any,
        checkpoints: Sequence[Checkpoint],
        store: Store,
        shard: tuple[int, int] | None = None,
    ) -> list[CheckpointFeatures]:
        """Featurize the training set under every checkpoint into ``store``, resuming what is done.

        Args:
            data: the training set.
            checkpoints: one per model in the ensemble.
            store: where features go; its provenance is checked first.
            shard: ``(index, count)`` to compute only the row chunks ``≡ index (mod count)``, so
                that ``count`` processes can share the work on one store.

        Returns:
            The stored features of each checkpoint.
        """
        if shard is not None and not (0 <= shard[0] < shard[1]):
            raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
        train = Examples(data)
        recorded = store.check_provenance("features", self.provenance(train), adopt=["chunk_rows"])
        chunk_rows = recorded["chunk_rows"]
        stored = []
        for index, checkpoint in enumerate(checkpoints):
            state = self.load(checkpoint)
            identity = {
                "checkpoint": tensors_fingerprint(state),
                "projection_seed": self.projection_seed(index),
            }
            features = store.checkpoint_features(index, train.n, self.dim, chunk_rows, identity)
            pending = features.pending(shard)
            rows = sum(stop - start for start, stop in map(features.rows, pending))
            description = f"checkpoint {index + 1}/{len(checkpoints)}"
            with progress_bar(rows, description, self.progress) as advance:
                for chunk in pending:
                    start, stop = features.rows(chunk)
                    parts = [
                        self.featurize(state, batch, index)
                        for batch in train.batches(start, stop, self.batch_size)
                    ]
                    features.write(
                        chunk,
                        torch.cat([p[0] for p in parts]).numpy(),
                        torch.cat([p[1] for p in parts]).numpy(),
                    )
                    advance(stop - start)
            stored.append(features)
        self._prepared = None
        return stored
