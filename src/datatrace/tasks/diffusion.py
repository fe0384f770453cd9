"""Diffusion: the denoising loss (Journey TRAK) and D-TRAK's alternative output functions.

A denoising model ``ε_θ(x_t, t[, condition])`` is trained on ``x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε``
to predict ``ε`` (or ``x_0``, or the velocity, as the scheduler's ``prediction_type`` says). Its
attributed output on one example is a (weighted) sum over ``K`` draws ``(t_k, ε_k)`` that the
*data* carries (see :mod:`datatrace.applications.diffusion.data`): the task itself holds no
randomness, so
per-example gradients run under ``torch.vmap`` and every example gets the same draws in every
batch, chunk and run.

Nothing here imports ``diffusers``: any scheduler with ``alphas_cumprod`` (and optionally
``config.prediction_type``) and any model called as ``model(x_t, t, **condition)`` works.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from datatrace.tasks._checks import cast_columns, integer_values
from datatrace.tasks._inputs import model_dtype
from datatrace.tasks.base import Task

# Keys of a diffusion batch that are not conditioning inputs of the model.
IMAGE_KEY = "x0"
TIMESTEPS_KEY = "timesteps"
NOISE_KEY = "noise"
# Optional ``(B, K)`` weights of the draws in the output (absent: every draw weighs 1, a sum).
WEIGHTS_KEY = "draw_weights"
RESERVED_KEYS = (IMAGE_KEY, TIMESTEPS_KEY, NOISE_KEY, WEIGHTS_KEY)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _pixel_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over every axis but the first: ``(N, C, H, W) → (N,)``."""
    return values.flatten(1).mean(1)


# Output functions of one draw, from the model's prediction and the training target, each
# ``(N, C, H, W) → (N,)``. "loss" is negated (see ``Diffusion``); the others are D-TRAK's
# alternatives, functions of the prediction alone (Zheng et al. 2024; the names of its code's
# "mean-squared-l2-norm", "l2-norm", "l1-norm", "linf-norm", "mean").
OUTPUT_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "loss": lambda prediction, target: -_pixel_mean((prediction - target) ** 2),
    "square_norm": lambda prediction, target: _pixel_mean(prediction**2),
    "l2_norm": lambda prediction, target: prediction.flatten(1).norm(dim=1),
    "l1_norm": lambda prediction, target: _pixel_mean(prediction.abs()),
    "linf_norm": lambda prediction, target: prediction.flatten(1).abs().amax(dim=1),
    "mean": lambda prediction, target: _pixel_mean(prediction),
}


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(N,)`` coefficients reshaped to broadcast over ``(N, *sample_shape)``."""
    return values.reshape(values.shape + (1,) * (like.dim() - 1))


def add_noise(
    alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The forward process ``x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε``, as ``DDPMScheduler.add_noise``.

    Written with tensor operations only (no in-place updates of the schedule), so it runs under
    ``torch.vmap`` and on any device.

    Args:
        alphas_cumprod: ``(num_train_timesteps,)`` the schedule's ``ᾱ``.
        x0: ``(N, *sample_shape)`` clean samples.
        noise: ``(N, *sample_shape)`` standard normal noise.
        timesteps: ``(N,)`` integer timesteps.

    Returns:
        ``(N, *sample_shape)`` noisy samples.
    """
    alpha = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[timesteps.long()]
    return _per_sample(alpha**0.5, x0) * x0 + _per_sample((1 - alpha) ** 0.5, x0) * noise


def denoising_target(
    prediction_type: str,
    alphas_cumprod: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """What the model is trained to predict: ``ε``, ``x_0``, or the velocity
    ``v = √ᾱ_t ε − √(1−ᾱ_t) x_0`` (``DDPMScheduler.get_velocity``). Shapes as :func:`add_noise`."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        alpha = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[timesteps.long()]
        return _per_sample(alpha**0.5, x0) * noise - _per_sample((1 - alpha) ** 0.5, x0) * x0
    raise ValueError(
        f"unknown prediction_type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}"
    )


def denoiser_output(result: Any) -> torch.Tensor:
    """The prediction tensor of a denoiser's return value: a tensor, an output object with a
    ``sample`` field (``UNet2DOutput``), or a tuple whose first entry is the prediction."""
    if torch.is_tensor(result):
        return result
    if hasattr(result, "sample"):
        return result.sample
    if isinstance(result, (tuple, list)) and result and torch.is_tensor(result[0]):
        return result[0]
    raise TypeError(
        f"the model returned a {type(result).__name__}: a denoiser must return a tensor, an "
        "object with a .sample tensor, or a tuple whose first entry is the prediction"
    )


def schedule_of(scheduler: Any) -> tuple[torch.Tensor, str]:
    """``(alphas_cumprod, prediction_type)`` of a diffusers scheduler (or any object with an
    ``alphas_cumprod`` attribute; ``prediction_type`` defaults to ``"epsilon"``)."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        raise TypeError(
            f"{type(scheduler).__name__} has no alphas_cumprod: pass the scheduler the model was "
            "trained with (e.g. diffusers.DDPMScheduler)"
        )
    config = getattr(scheduler, "config", None)
    prediction_type = getattr(config, "prediction_type", None) or "epsilon"
    return torch.as_tensor(alphas_cumprod).detach().cpu().float(), str(prediction_type)


def _draw_shapes(batch: Mapping[str, torch.Tensor]) -> tuple[int, int, torch.Size]:
    """``(n_examples, n_draws, sample_shape)`` of a diffusion batch, its shapes checked."""
    x0, timesteps, noise = batch[IMAGE_KEY], batch[TIMESTEPS_KEY], batch[NOISE_KEY]
    if timesteps.dim() != 2 or len(timesteps) != len(x0):
        raise ValueError(
            f"timesteps have shape {tuple(timesteps.shape)}, expected (batch, draws) with "
            f"batch = {len(x0)}, the rows of x0"
        )
    n_examples, n_draws = timesteps.shape
    sample_shape = x0.shape[1:]
    if noise.shape != (n_examples, n_draws, *sample_shape):
        raise ValueError(
            f"noise has shape {tuple(noise.shape)}, expected (batch, draws, *sample_shape) = "
            f"{(n_examples, n_draws, *sample_shape)}"
        )
    weights = batch.get(WEIGHTS_KEY)
    if weights is not None and tuple(weights.shape) != (n_examples, n_draws):
        raise ValueError(
            f"{WEIGHTS_KEY} has shape {tuple(weights.shape)}, expected (batch, draws) = "
            f"{(n_examples, n_draws)}"
        )
    return n_examples, n_draws, sample_shape


class Diffusion(Task):
    """Attribute a denoising model through its denoising loss or a D-TRAK output function.

    Batches are dicts (built by
    :class:`~datatrace.applications.diffusion.DiffusionTrainingExamples` and
    :class:`~datatrace.applications.diffusion.DiffusionTargets`) with ``"x0"`` ``(B,
    *sample_shape)`` clean
    images (or latents), ``"timesteps"`` ``(B, K)`` integers, ``"noise"`` ``(B, K,
    *sample_shape)``, optionally ``"draw_weights"`` ``(B, K)``, and any further entries
    (``"class_labels"`` ``(B,)``, ``"encoder_hidden_states"`` ``(B, L, D)``, ...) passed to the
    model as keyword arguments, repeated for each draw. The model is called once per example on
    its ``K`` draws: ``model(x_t (K, *sample_shape), t (K,), **condition)``.

    The output of an example is a weighted sum over its draws ``k`` of
    ``w_k · g(ε_θ(x_{t_k}, t_k), target_k)``: training examples carry no weights (``w_k = 1``,
    the gradients summed over the ``K`` timesteps as in Journey TRAK), targets carry
    ``w_k = 1/K`` (the output averaged over the noise draws):

    - ``"loss"`` (Journey TRAK): ``g = −mean‖prediction − target‖²``, the *negated* denoising
      loss, so that, as everywhere in datatrace, a positive score means the training example
      pushes the output up, i.e. lowers the target's denoising loss (makes it more likely), and
      ``Q = −∂loss/∂output = 1``.
    - ``"square_norm"`` (D-TRAK's best): ``mean(prediction²)``; ``"l2_norm"``: ``‖prediction‖₂``;
      ``"l1_norm"``: ``mean|prediction|``; ``"linf_norm"``: ``max|prediction|``; ``"mean"``:
      ``mean(prediction)`` (the output functions of D-TRAK's reference code). These are surrogate
      output functions: used for both training and target gradients (their sign cancels), they
      often rank training examples by their effect on the loss better than the loss itself.

    ``out_to_loss`` is 1 for every example.

    Args:
        scheduler: the noise scheduler the model was trained with (``DDPMScheduler`` or any
            object with ``alphas_cumprod``; its ``config.prediction_type`` sets the target).
        output: one of :data:`OUTPUT_FUNCTIONS`.
    """

    def __init__(self, scheduler: Any, output: str = "loss"):
        if output not in OUTPUT_FUNCTIONS:
            raise ValueError(
                f"unknown diffusion output {output!r}: use one of {', '.join(OUTPUT_FUNCTIONS)}"
            )
        self.alphas_cumprod, self.prediction_type = schedule_of(scheduler)
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"the scheduler's prediction_type {self.prediction_type!r} is not supported: "
                f"use one of {', '.join(PREDICTION_TYPES)}"
            )
        self.output_name = output

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def per_draw(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The output function of every draw, ``(B, K)``; :meth:`output` sums it over ``K``,
        weighted by ``"draw_weights"`` when the batch has them."""
        x0, timesteps, noise = batch[IMAGE_KEY], batch[TIMESTEPS_KEY], batch[NOISE_KEY]
        n_examples, n_draws, sample_shape = _draw_shapes(batch)
        flat_x0 = x0.unsqueeze(1).expand(-1, n_draws, *sample_shape).reshape(-1, *sample_shape)
        flat_noise = noise.reshape(-1, *sample_shape)
        flat_timesteps = timesteps.reshape(-1)
        noisy = add_noise(self.alphas_cumprod, flat_x0, flat_noise, flat_timesteps)
        condition = {
            key: value.repeat_interleave(n_draws, dim=0)
            for key, value in batch.items()
            if key not in RESERVED_KEYS
        }
        prediction = denoiser_output(model(noisy, flat_timesteps, **condition))
        if prediction.shape[1] == 2 * flat_x0.shape[1]:
            # A model that also predicts its variance ("learned" variance types): the first
            # half of the channels is the prediction the loss compares with its target.
            prediction = prediction[:, : flat_x0.shape[1]]
        target = denoising_target(
            self.prediction_type, self.alphas_cumprod, flat_x0, flat_noise, flat_timesteps
        )
        return OUTPUT_FUNCTIONS[self.output_name](prediction, target).view(n_examples, n_draws)

    def output(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        per_draw = self.per_draw(model, batch)
        weights = batch.get(WEIGHTS_KEY)
        if weights is None:
            return per_draw.sum(1)
        return (per_draw * weights.to(per_draw.dtype)).sum(1)

    def check_batch(self, model: nn.Module, batch: Any) -> dict[str, Any]:
        """The batch checked (see :meth:`Task.check_batch`), without a forward pass: the columns
        ``x0``, ``timesteps`` and ``noise`` present; ``timesteps`` ``(B, K)`` integers in
        ``0 … num_train_timesteps − 1``; ``noise`` ``(B, K, *sample_shape)`` and
        ``draw_weights`` ``(B, K)``; floating columns in the model's dtype.

        Raises:
            TypeError: the batch is not a dict, or ``x0`` is not floating.
            KeyError: a required column is missing.
            ValueError: shapes that do not match, timesteps out of the schedule.
        """
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"Diffusion reads dicts with the columns {list(RESERVED_KEYS[:3])}, got a "
                f"{type(batch).__name__}: build them with DiffusionTrainingExamples (training "
                "set) and DiffusionTargets (targets)"
            )
        missing = [key for key in RESERVED_KEYS[:3] if key not in batch]
        if missing:
            raise KeyError(
                f"Diffusion needs the column(s) {missing}; the batch has {sorted(batch)}. "
                "DiffusionTrainingExamples and DiffusionTargets build complete batches"
            )
        if not torch.is_tensor(batch[IMAGE_KEY]) or not batch[IMAGE_KEY].is_floating_point():
            raise TypeError(f"{IMAGE_KEY!r} must be a floating tensor of clean images (or latents)")
        checked = cast_columns(batch, model_dtype(model), keep=(TIMESTEPS_KEY,))
        timesteps = integer_values(
            batch[TIMESTEPS_KEY], f"the {TIMESTEPS_KEY!r}", "timesteps index the noise schedule"
        )
        checked[TIMESTEPS_KEY] = timesteps
        _draw_shapes(checked)
        outside = (timesteps < 0) | (timesteps >= self.num_train_timesteps)
        if outside.any():
            raise ValueError(
                f"the {TIMESTEPS_KEY!r} hold {int(timesteps[outside][0])}, outside the schedule "
                f"of the scheduler: timesteps are 0 … {self.num_train_timesteps - 1}"
            )
        return checked

    def out_to_loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x0 = batch[IMAGE_KEY]
        return torch.ones(x0.shape[0], dtype=x0.dtype, device=x0.device)

    def config(self) -> dict[str, Any]:
        schedule = self.alphas_cumprod.numpy().tobytes()
        return {
            "name": type(self).__name__,
            "output": self.output_name,
            "prediction_type": self.prediction_type,
            "num_train_timesteps": self.num_train_timesteps,
            "schedule": hashlib.sha256(schedule).hexdigest()[:16],
        }
