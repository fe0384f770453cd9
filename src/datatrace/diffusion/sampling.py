"""Sampling from a denoising model while recording its trajectory (``x_t`` and ``x̂_0(t)``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from datatrace.diffusion.data import check_condition
from datatrace.grads.featurize import default_device
from datatrace.grads.projectors import derive_seed
from datatrace.progress import progress_bar
from datatrace.tasks.diffusion import denoiser_output


@dataclass(frozen=True)
class Trajectory:
    """The sampling trajectory of ``n`` generated samples.

    Attributes:
        timesteps: ``(n_steps,)`` the scheduler's timesteps, in sampling order (noisiest first).
        noisy: ``(n_steps, n, *sample_shape)`` the sample ``x_t`` entering each step.
        pred_original: ``(n_steps, n, *sample_shape)`` the predicted clean sample ``x̂_0(t)`` at
            each step (the scheduler's ``pred_original_sample``).
        samples: ``(n, *sample_shape)`` the generated samples (the output of the last step).
        condition: conditioning inputs of the samples, by keyword, one row per sample.
    """

    timesteps: torch.Tensor
    noisy: torch.Tensor
    pred_original: torch.Tensor
    samples: torch.Tensor
    condition: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return self.samples.shape[0]

    @property
    def n_steps(self) -> int:
        return len(self.timesteps)

    def step_index(self, step: int) -> int:
        """Position of timestep ``step`` in :attr:`timesteps`."""
        matches = (self.timesteps == int(step)).nonzero().flatten()
        if len(matches) == 0:
            shown = self.timesteps.tolist()
            raise ValueError(
                f"timestep {step} is not a step of this trajectory: choose among {shown}"
            )
        return int(matches[0])

    def pred_original_at(self, step: int) -> torch.Tensor:
        """``x̂_0(step)`` of every sample, ``(n, *sample_shape)``."""
        return self.pred_original[self.step_index(step)]

    def evenly_spaced_steps(self, count: int) -> list[int]:
        """``count`` timesteps spread evenly over the trajectory, noisiest first, always
        including its first and last steps."""
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        count = min(count, self.n_steps)
        if count == 1:
            return [int(self.timesteps[-1])]
        positions = torch.linspace(0, self.n_steps - 1, count).round().long()
        return [int(self.timesteps[p]) for p in positions.unique()]


@torch.no_grad()
def sample_with_trajectory(
    model: nn.Module,
    scheduler: Any,
    n: int,
    shape: tuple[int, ...] | None = None,
    *,
    seed: int = 0,
    num_inference_steps: int | None = None,
    condition: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Trajectory:
    """Generate ``n`` samples and record ``x_t`` and ``x̂_0(t)`` at every step.

    Sample ``j`` draws its initial noise and every step's noise from its own generator, seeded
    by ``derive_seed(seed, "diffusion-sample", j)``: it is the same whatever ``n`` and
    ``batch_size`` are. The user's scheduler is not modified (a copy is set to
    ``num_inference_steps``).

    Args:
        model: the denoiser, called as ``model(x_t, t, **condition)``.
        scheduler: a diffusers scheduler whose ``step`` returns ``pred_original_sample``
            (``DDPMScheduler``, ``DDIMScheduler``, ...).
        n: number of samples.
        shape: ``sample_shape`` ``(C, H, W)``; default from ``model.config`` (``in_channels``,
            ``sample_size``) for diffusers models.
        seed: seed of all the noise.
        num_inference_steps: sampling steps (default: the scheduler's ``num_train_timesteps``).
        condition: optional conditioning inputs, one row per sample, by keyword
            (``{"class_labels": (n,)}``; ``{"encoder_hidden_states": (n, L, D)}``).
        batch_size: samples generated together.
        device: where the model runs (default: the model's device).
        progress: show a progress bar.

    Returns:
        :class:`Trajectory`, on the CPU.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    shape = tuple(shape) if shape is not None else _sample_shape(model)
    condition = check_condition(condition, n)
    device = torch.device(device) if device is not None else default_device(model)
    scheduler = _copy(scheduler)
    steps = num_inference_steps or int(scheduler.config.num_train_timesteps)
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps.detach().cpu().long()
    was_training = model.training
    model.eval()
    noisy, predicted, samples = [], [], []
    try:
        with progress_bar(n * len(timesteps), "sampling", progress) as advance:
            for lo in range(0, n, batch_size):
                hi = min(lo + batch_size, n)
                batch_condition = {k: v[lo:hi].to(device) for k, v in condition.items()}
                generators = [
                    torch.Generator().manual_seed(derive_seed(seed, "diffusion-sample", j))
                    for j in range(lo, hi)
                ]
                parts = _sample_batch(
                    model, scheduler, generators, shape, batch_condition, device, advance
                )
                noisy.append(parts[0])
                predicted.append(parts[1])
                samples.append(parts[2])
    finally:
        model.train(was_training)
    return Trajectory(
        timesteps=timesteps,
        noisy=torch.cat(noisy, dim=1),
        pred_original=torch.cat(predicted, dim=1),
        samples=torch.cat(samples),
        condition={key: value.cpu() for key, value in condition.items()},
    )


def _sample_batch(model, scheduler, generators, shape, condition, device, advance):
    initial = torch.stack([torch.randn(shape, generator=g) for g in generators])
    sample = (initial * scheduler.init_noise_sigma).to(device)
    noisy, predicted = [], []
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, timestep)
        t = timestep.expand(len(sample)).to(device)
        prediction = denoiser_output(model(model_input, t, **condition))
        step = scheduler.step(prediction, timestep, sample, generator=generators)
        noisy.append(sample.cpu())
        predicted.append(step.pred_original_sample.cpu())
        sample = step.prev_sample
        advance(len(sample))
    return torch.stack(noisy), torch.stack(predicted), sample.cpu()


def _sample_shape(model: nn.Module) -> tuple[int, ...]:
    config = getattr(model, "config", None)
    channels = getattr(config, "in_channels", None)
    size = getattr(config, "sample_size", None)
    if channels is None or size is None:
        raise ValueError(
            "cannot tell the shape of a sample from the model: pass shape=(channels, height, width)"
        )
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (int(channels), int(height), int(width))


def _copy(scheduler: Any) -> Any:
    if hasattr(scheduler, "config") and hasattr(type(scheduler), "from_config"):
        return type(scheduler).from_config(scheduler.config)
    return copy.deepcopy(scheduler)
