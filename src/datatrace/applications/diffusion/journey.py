"""Journey TRAK: attribute each chosen step of a sampling trajectory with one fitted estimator.

The training features are computed once (``TRAK(model, Diffusion(...)).fit(train)``); each chosen
step ``t`` adds only the targets' features: the predicted clean images ``x̂_0(t)`` re-noised to
``t`` with seeded draws (:class:`~datatrace.applications.diffusion.DiffusionTargets`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from datatrace._arguments import named_device
from datatrace.applications.diffusion.data import DEFAULT_TARGET_DRAWS, DiffusionTargets
from datatrace.applications.diffusion.sampling import Trajectory
from datatrace.attributions import Attributions
from datatrace.data import Examples, batch_to
from datatrace.grads.featurize import default_device
from datatrace.grads.per_example import _eval_mode
from datatrace.progress import progress_bar
from datatrace.tasks.diffusion import Diffusion

# Steps attributed when none are chosen: enough to see the journey, few enough to be cheap.
DEFAULT_JOURNEY_STEPS = 5


class TrajectoryAttributions:
    """Attributions of generated samples at several steps of their sampling trajectory.

    ``scores[s, j, i]`` is the score of training example ``i`` for generated sample ``j`` at
    sampling timestep ``steps[s]``: positive when training on ``i`` lowers the denoising loss of
    ``x̂_0(steps[s])`` at that noise level (a proponent of the sample at that point of its
    journey).

    Args:
        scores: ``(n_steps, n_generated, n_train)``.
        steps: ``(n_steps,)`` the sampling timesteps, in the order of ``scores``.
        method: the estimator that produced the scores.
        out_to_loss: optional ``(n_train,)`` out-to-loss weights (1 for diffusion tasks).
        info: settings of the run (estimator settings, ``n_draws``, ``seed``).
    """

    def __init__(
        self,
        scores: np.ndarray,
        steps: Sequence[int],
        method: str = "",
        out_to_loss: np.ndarray | None = None,
        info: dict[str, Any] | None = None,
    ):
        scores = np.asarray(scores)
        steps = [int(step) for step in steps]
        if scores.ndim != 3 or scores.shape[0] != len(steps):
            raise ValueError(
                f"scores must be (n_steps, n_generated, n_train) with n_steps = {len(steps)}, got "
                f"shape {scores.shape}"
            )
        self.scores = scores
        self.steps = steps
        self.method = method
        self.out_to_loss = out_to_loss
        self.info = dict(info or {})

    @property
    def n_generated(self) -> int:
        return self.scores.shape[1]

    @property
    def n_train(self) -> int:
        return self.scores.shape[2]

    def __repr__(self) -> str:
        return (
            f"TrajectoryAttributions(method={self.method!r}, steps={self.steps}, "
            f"n_generated={self.n_generated}, n_train={self.n_train})"
        )

    def at_step(self, step: int) -> Attributions:
        """The ``(n_generated, n_train)`` attributions at sampling timestep ``step``."""
        if int(step) not in self.steps:
            raise ValueError(f"timestep {step} was not attributed: choose among {self.steps}")
        index = self.steps.index(int(step))
        info = {**self.info, "step": int(step)}
        return Attributions(self.scores[index], self.method, self.out_to_loss, info)

    def top(self, k: int = 10) -> np.ndarray:
        """Indices ``(n_steps, n_generated, k)`` of the ``k`` top proponents at every step."""
        return np.stack([self.at_step(step).top(k).indices for step in self.steps])


def _check_estimator(estimator: Any) -> None:
    if not hasattr(estimator, "score"):
        raise TypeError(
            f"{type(estimator).__name__} has no score(targets) method: pass a fitted TRAK (or "
            "another datatrace estimator)"
        )
    task = getattr(estimator, "task", None)
    if task is not None and not isinstance(task, Diffusion):
        raise TypeError(
            f"the estimator attributes a {type(task).__name__} task: a trajectory is attributed "
            "with datatrace.tasks.Diffusion (e.g. TRAK(unet, Diffusion(scheduler)))"
        )


def attribute_trajectory(
    estimator: Any,
    trajectory: Trajectory,
    steps: Sequence[int] | None = None,
    *,
    n_draws: int = DEFAULT_TARGET_DRAWS,
    seed: int = 0,
) -> TrajectoryAttributions:
    """Attribute the generated samples of ``trajectory`` at each chosen sampling step.

    For each step ``t``, the targets are ``x̂_0(t)`` of every sample re-noised to ``t`` with
    ``n_draws`` seeded noise draws (:meth:`DiffusionTargets.from_trajectory`), scored by the
    fitted ``estimator`` (whose training features are reused for every step).

    Args:
        estimator: a fitted :class:`~datatrace.TRAK` (or baseline) with a
            :class:`~datatrace.tasks.Diffusion` task.
        trajectory: from :func:`~datatrace.applications.diffusion.sample_with_trajectory`.
        steps: sampling timesteps to attribute (values of ``trajectory.timesteps``); default
            :data:`DEFAULT_JOURNEY_STEPS` evenly spaced ones.
        n_draws: noise draws per target (the target's output averages over them).
        seed: seed of the targets' noise.

    Returns:
        :class:`TrajectoryAttributions` with ``scores`` ``(n_steps, n_generated, n_train)``.
    """
    _check_estimator(estimator)
    if steps is None:
        steps = trajectory.evenly_spaced_steps(DEFAULT_JOURNEY_STEPS)
    steps = [int(step) for step in steps]
    for step in steps:
        trajectory.step_index(step)  # fails early, before any work, on a step not sampled
    per_step = []
    for step in steps:
        targets = DiffusionTargets.from_trajectory(trajectory, step, n_draws=n_draws, seed=seed)
        per_step.append(estimator.score(targets))
    first = per_step[0]
    info = {**first.info, "n_draws": n_draws, "target_seed": seed}
    return TrajectoryAttributions(
        np.stack([result.scores for result in per_step]),
        steps,
        first.method,
        first.out_to_loss,
        info,
    )


@torch.no_grad()
def trajectory_outputs(
    model: nn.Module,
    task: Diffusion,
    trajectory: Trajectory,
    steps: Sequence[int],
    *,
    n_draws: int = DEFAULT_TARGET_DRAWS,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> np.ndarray:
    """The task's output of ``model`` on the trajectory's targets at each step.

    With the same ``n_draws`` and ``seed`` as :func:`attribute_trajectory`, these are the
    quantities its scores predict (for ``Diffusion(output="loss")``: the negated denoising loss
    of ``x̂_0(t)`` at fixed noise, averaged over the ``n_draws`` draws), e.g. the outputs of
    models trained on random subsets for the LDS.

    Returns:
        ``(n_steps, n_generated)`` float64.
    """
    device = named_device(device) if device is not None else default_device(model)
    outputs = np.zeros((len(steps), trajectory.n_samples))
    with _eval_mode(model), progress_bar(len(steps), "outputs", progress) as advance:
        for row, step in enumerate(steps):
            targets = Examples(
                DiffusionTargets.from_trajectory(trajectory, step, n_draws=n_draws, seed=seed)
            )
            values = [
                task.output(model, batch_to(batch, device)).double().cpu()
                for batch in targets.batches(0, targets.n, batch_size)
            ]
            outputs[row] = torch.cat(values).numpy()
            advance(1)
    return outputs
