"""Pieces shared by the estimators: the fitted-state check, checkpoint lists, feature settings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from datatrace.grads.checkpoints import Checkpoint
from datatrace.grads.featurize import GradientFeatures
from datatrace.grads.projectors import Projector, make_projector
from datatrace.tasks.base import Task


class NotFittedError(RuntimeError):
    """A method that needs fitted state was called before ``fit``."""


def check_fitted(estimator: object, attribute: str) -> None:
    if not hasattr(estimator, attribute):
        raise NotFittedError(
            f"this {type(estimator).__name__} is not fitted yet: call fit(train_data, "
            "checkpoints) first"
        )


def checkpoint_list(
    model: nn.Module, checkpoints: Sequence[Checkpoint] | Checkpoint | None
) -> list[Checkpoint]:
    """The checkpoints to use: the given ones, or the model's current parameters."""
    if checkpoints is None:
        return [{name: t.detach().clone() for name, t in model.state_dict().items()}]
    if isinstance(checkpoints, (str, nn.Module)) or hasattr(checkpoints, "keys"):
        return [checkpoints]
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError(
            "checkpoints is empty: pass at least one checkpoint (or None for the "
            "model's current parameters)"
        )
    return checkpoints


def gradient_features(
    estimator: Any, task: Task | None = None, projector: Projector | None = None
) -> GradientFeatures:
    """The gradient features an estimator's settings describe (``model``, ``task``,
    ``projector``/``proj_dim``, ``params``, ``seed``, ``batch_size``, ``chunk_size``,
    ``device``, ``progress``); ``task`` replaces its task (targets scored with another output),
    ``projector`` reuses a projector object (and the matrices it keeps)."""
    return GradientFeatures(
        estimator.model,
        estimator.task if task is None else task,
        projector or make_projector(estimator.projector, estimator.proj_dim),
        params=estimator.params,
        seed=estimator.seed,
        batch_size=estimator.batch_size,
        chunk_rows=estimator.chunk_size,
        device=estimator.device,
        progress=estimator.progress,
    )
