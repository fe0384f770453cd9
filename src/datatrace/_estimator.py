"""Pieces shared by the estimators: the fitted-state check and checkpoint lists."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from datatrace.grads.checkpoints import Checkpoint


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
