"""Sampling from a denoising model while recording its trajectory (``x_t`` and ``x̂_0(t)``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from datatrace._arguments import named_device
from datatrace.applications.diffusion.data import check_condition
from datatrace.grads.featurize import default_device
from datatrace.grads.projectors import derive_seed
from datatrace.progress import progress_bar
from datatrace.tasks.diffusion import denoiser_output


@dataclass(frozen=True)
class Trajectory:
    """The sampling trajectory of ``n`` generated samples.

    :func:`sample_with_trajectory` records one. A trajectory recorded by another sampler is
    built with :meth:`from_arrays`, which takes numpy arrays or tensors and checks their layout.

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

    @classmethod
    def from_arrays(
        cls,
        timesteps: Any,
        noisy: Any,
        pred_original: Any,
        samples: Any = None,
        condition: Mapping[str, Any] | None = None,
    ) -> Trajectory:
        """A trajectory from arrays recorded elsewhere (numpy arrays or tensors), checked.

        Arrays are laid out ``(step, sample, ...)``, steps in sampling order; a ``(sample,
        step)`` array is refused unless ``n_samples == n_steps``, where the shapes cannot tell
        the two apart. ``noisy``, ``pred_original`` and ``samples`` become float32 tensors on
        the CPU, ``timesteps`` int64, and floating-point ``condition`` values float32.

        Args:
            timesteps: ``(n_steps,)`` integer timesteps, strictly decreasing (noisiest first).
            noisy: ``(n_steps, n_samples, *sample_shape)`` the sample ``x_t`` entering each step.
            pred_original: ``(n_steps, n_samples, *sample_shape)`` the predicted clean sample
                ``x̂_0(t)`` at each step.
            samples: ``(n_samples, *sample_shape)`` the generated samples; default
                ``pred_original[-1]``, the prediction of the last step. That is what DDPM and
                DDIM (with ``set_alpha_to_one``, the default) output when the last step lands
                on ``ᾱ = 1``, i.e. leaves no noise; pass the sampler's output otherwise.
            condition: conditioning inputs, by keyword, each with ``n_samples`` rows.

        Returns:
            :class:`Trajectory`.

        Raises:
            ValueError: an array has the wrong shape (a ``(sample, step)`` layout is named as
                such), the timesteps are not integers in strictly decreasing order, or a
                condition does not have one row per sample.
        """
        timesteps = _as_timesteps(timesteps)
        n_steps = len(timesteps)
        noisy = _as_float32(noisy)
        pred_original = _as_float32(pred_original)
        for name, array in (("noisy", noisy), ("pred_original", pred_original)):
            _check_step_axis(name, array, n_steps)
        if pred_original.shape != noisy.shape:
            raise ValueError(
                f"noisy has shape {tuple(noisy.shape)} but pred_original "
                f"{tuple(pred_original.shape)}: both must be (n_steps, n_samples, "
                "*sample_shape), recorded at the same steps for the same samples"
            )
        n_samples, sample_shape = noisy.shape[1], tuple(noisy.shape[2:])
        if samples is None:
            samples = pred_original[-1].clone()
        samples = _as_float32(samples)
        if tuple(samples.shape) != (n_samples, *sample_shape):
            raise ValueError(
                f"samples has shape {tuple(samples.shape)}, expected (n_samples, *sample_shape) "
                f"= {(n_samples, *sample_shape)} as in noisy and pred_original"
            )
        checked = check_condition(condition, n_samples)
        checked = {
            key: value.float() if value.is_floating_point() else value
            for key, value in checked.items()
        }
        return cls(timesteps, noisy, pred_original, samples, checked)

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
    device = named_device(device) if device is not None else default_device(model)
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


def _as_float32(array: Any) -> torch.Tensor:
    return torch.as_tensor(array).detach().to("cpu", torch.float32)


def _as_timesteps(timesteps: Any) -> torch.Tensor:
    values = torch.as_tensor(timesteps).detach().cpu()
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(
            f"timesteps must be 1-D, (n_steps,), with at least one step; got shape "
            f"{tuple(values.shape)}"
        )
    if values.is_floating_point() and not torch.equal(values, values.round()):
        raise ValueError(
            "timesteps must be integers (the scheduler's training timesteps), got "
            f"{values.tolist()}"
        )
    values = values.long()
    if len(values) > 1 and not bool((values[1:] < values[:-1]).all()):
        raise ValueError(
            f"timesteps must be strictly decreasing, in sampling order (noisiest first), got "
            f"{values.tolist()}: if they were recorded in increasing order, reverse them and the "
            "step axis of noisy and pred_original (e.g. np.flip(a, 0))"
        )
    return values


def _check_step_axis(name: str, array: torch.Tensor, n_steps: int) -> None:
    """Refuse an array that is not ``(n_steps, n_samples, *sample_shape)``."""
    if array.ndim < 3:
        raise ValueError(
            f"{name} has shape {tuple(array.shape)}: expected (n_steps, n_samples, "
            "*sample_shape) with at least one sample axis, e.g. (n_steps, n_samples, C, H, W)"
        )
    if array.shape[0] == n_steps:
        return
    if array.shape[1] == n_steps:
        raise ValueError(
            f"{name} has shape {tuple(array.shape)}: its second axis has the {n_steps} steps, "
            f"so it is laid out (sample, step); a trajectory is (step, sample). Transpose it "
            f"first, e.g. np.swapaxes({name}, 0, 1) or {name}.transpose(0, 1)"
        )
    raise ValueError(
        f"{name} has shape {tuple(array.shape)}: its first axis must have one entry per "
        f"timestep ({n_steps}), as (n_steps, n_samples, *sample_shape)"
    )


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
