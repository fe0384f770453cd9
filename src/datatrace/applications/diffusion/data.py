"""Seeded examples for diffusion attribution: training images with their draws, and targets.

The randomness of the denoising loss (timesteps and noise) lives in the data, not in the task:
example ``i`` gets its draws from a generator seeded by ``derive_seed(seed, kind, i)``, so it has
the same draws whatever batch, chunk, shard or process it falls in, and a resumed run recomputes
exactly what it lost. Every item is a dict ``{"x0", "timesteps", "noise", **condition}`` as
:class:`~datatrace.tasks.diffusion.Diffusion` reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from datatrace.grads.projectors import derive_seed
from datatrace.progress import progress_bar
from datatrace.tasks.diffusion import (
    IMAGE_KEY,
    NOISE_KEY,
    RESERVED_KEYS,
    TIMESTEPS_KEY,
    WEIGHTS_KEY,
)

# Default number of timesteps per training image (Journey TRAK uses 5 to 20, D-TRAK 10 to 100).
DEFAULT_TRAIN_TIMESTEPS = 10
# Default number of noise draws per target (Journey TRAK uses ~20).
DEFAULT_TARGET_DRAWS = 10


def _generator(*parts: int | str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed(*parts))


def check_condition(condition: Mapping[str, Any] | None, n: int) -> dict[str, torch.Tensor]:
    """Conditioning inputs as tensors, checked to have one row per example and no reserved key."""
    condition = {key: torch.as_tensor(value) for key, value in (condition or {}).items()}
    for key, value in condition.items():
        if key in RESERVED_KEYS:
            raise ValueError(f"{key!r} cannot be a conditioning input: it is a reserved batch key")
        if len(value) != n:
            raise ValueError(
                f"conditioning input {key!r} has {len(value)} rows, expected one per image ({n})"
            )
    return condition


@torch.no_grad()
def encode_images(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    batch_size: int = 64,
    progress: bool = True,
) -> torch.Tensor:
    """``encoder`` applied to ``images`` in batches, without gradients (e.g. VAE latents).

    Args:
        encoder: maps ``(b, C, H, W)`` images to ``(b, *latent_shape)`` latents, e.g.
            ``lambda x: vae.encode(x).latent_dist.mean * vae.config.scaling_factor``.
        images: ``(n, C, H, W)``.
        batch_size: images per encoder call.

    Returns:
        ``(n, *latent_shape)`` latents on the CPU.
    """
    latents = []
    with progress_bar(len(images), "encoding", progress) as advance:
        for lo in range(0, len(images), batch_size):
            batch = images[lo : lo + batch_size]
            latents.append(torch.as_tensor(encoder(batch)).detach().cpu())
            advance(len(batch))
    return torch.cat(latents)


class DiffusionTrainingExamples(Dataset):
    """Training images, each with ``K`` seeded random timesteps and noise draws.

    Item ``i`` is ``{"x0": (C, H, W), "timesteps": (K,), "noise": (K, C, H, W), **condition_i}``,
    its draws generated from ``derive_seed(seed, "diffusion-train", i)``: the train features of
    Journey TRAK sum the gradient of the output over these ``K`` draws.

    Args:
        images: ``(n, C, H, W)`` training images, scaled as the model was trained on them.
        scheduler: the model's noise scheduler (``num_train_timesteps`` bounds the timesteps).
        n_timesteps: ``K``, draws per image (ignored when ``timesteps`` is given).
        seed: seed of the draws.
        timesteps: optional fixed timesteps used for every image (e.g. evenly spaced, as D-TRAK
            does), instead of ``K`` uniformly random ones; noise is still drawn per image.
        condition: optional conditioning inputs of the model, one row per image, by keyword:
            ``{"class_labels": (n,)}`` for a class-conditional ``UNet2DModel``,
            ``{"encoder_hidden_states": (n, L, D)}`` (text embeddings) for a
            ``UNet2DConditionModel``.
        encoder: optional callable applied to the images before anything else (latent
            diffusion: the VAE encoder times its scaling factor); the draws then have the
            latents' shape. Images are encoded once, here.
        encode_batch_size: images per encoder call.
        progress: show a progress bar while encoding.
    """

    def __init__(
        self,
        images: torch.Tensor,
        scheduler: Any,
        *,
        n_timesteps: int = DEFAULT_TRAIN_TIMESTEPS,
        seed: int = 0,
        timesteps: Sequence[int] | None = None,
        condition: Mapping[str, Any] | None = None,
        encoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
        encode_batch_size: int = 64,
        progress: bool = True,
    ):
        images = torch.as_tensor(images)
        if encoder is not None:
            images = encode_images(encoder, images, encode_batch_size, progress)
        if images.dim() < 2:
            raise ValueError(f"images must be (n, *sample_shape), got shape {tuple(images.shape)}")
        self.num_train_timesteps = _num_train_timesteps(scheduler)
        if timesteps is not None:
            fixed = torch.as_tensor(list(timesteps), dtype=torch.long)
            if fixed.numel() == 0 or fixed.min() < 0 or fixed.max() >= self.num_train_timesteps:
                raise ValueError(
                    f"timesteps must be a non-empty list in [0, {self.num_train_timesteps}), got "
                    f"{list(timesteps)}"
                )
            self.fixed_timesteps: torch.Tensor | None = fixed
            n_timesteps = len(fixed)
        else:
            self.fixed_timesteps = None
        if n_timesteps < 1:
            raise ValueError(f"n_timesteps must be at least 1, got {n_timesteps}")
        self.images = images
        self.n_timesteps = n_timesteps
        self.seed = seed
        self.condition = check_condition(condition, len(images))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"training example {index} out of range for {len(self)}")
        generator = _generator(self.seed, "diffusion-train", index)
        if self.fixed_timesteps is None:
            timesteps = torch.randint(
                0, self.num_train_timesteps, (self.n_timesteps,), generator=generator
            )
        else:
            timesteps = self.fixed_timesteps.clone()
        image = self.images[index]
        noise = torch.randn((self.n_timesteps, *image.shape), generator=generator)
        item = {IMAGE_KEY: image, TIMESTEPS_KEY: timesteps, NOISE_KEY: noise.to(image.dtype)}
        item.update({key: value[index] for key, value in self.condition.items()})
        return item


class DiffusionTargets(Dataset):
    """Targets at one timestep: clean images re-noised to ``t`` with seeded draws.

    Item ``j`` is ``{"x0": images[j], "timesteps": (t,)*n_draws, "noise": (n_draws, C, H, W),
    "draw_weights": (1/n_draws,)*n_draws, **condition_j}``, its noise generated from
    ``derive_seed(seed, "diffusion-target", t, j)``: the target's output is the *mean* over its
    draws (training examples sum over theirs).
    Built from a trajectory with :meth:`from_trajectory`, ``images`` are the predicted clean
    images ``x̂_0(t)`` of the generated samples at sampling step ``t`` (Journey TRAK).

    Args:
        images: ``(n, C, H, W)`` clean images (or latents) to attribute.
        timestep: the noise level ``t`` they are re-noised to.
        n_draws: noise draws per target (the output averages over them).
        seed: seed of the noise.
        condition: optional conditioning inputs, one row per image (see
            :class:`DiffusionTrainingExamples`).
    """

    def __init__(
        self,
        images: torch.Tensor,
        timestep: int,
        *,
        n_draws: int = DEFAULT_TARGET_DRAWS,
        seed: int = 0,
        condition: Mapping[str, Any] | None = None,
    ):
        if n_draws < 1:
            raise ValueError(f"n_draws must be at least 1, got {n_draws}")
        self.images = torch.as_tensor(images)
        self.timestep = int(timestep)
        self.n_draws = n_draws
        self.seed = seed
        self.condition = check_condition(condition, len(self.images))

    @classmethod
    def from_trajectory(
        cls, trajectory: Any, step: int, *, n_draws: int = DEFAULT_TARGET_DRAWS, seed: int = 0
    ) -> DiffusionTargets:
        """Targets at sampling timestep ``step`` of a
        :class:`~datatrace.applications.diffusion.Trajectory`: its ``x̂_0(step)`` and
        conditioning."""
        return cls(
            trajectory.pred_original_at(step),
            step,
            n_draws=n_draws,
            seed=seed,
            condition=trajectory.condition,
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"target {index} out of range for {len(self)}")
        generator = _generator(self.seed, "diffusion-target", self.timestep, index)
        image = self.images[index]
        noise = torch.randn((self.n_draws, *image.shape), generator=generator)
        item = {
            IMAGE_KEY: image,
            TIMESTEPS_KEY: torch.full((self.n_draws,), self.timestep, dtype=torch.long),
            NOISE_KEY: noise.to(image.dtype),
            WEIGHTS_KEY: torch.full((self.n_draws,), 1 / self.n_draws, dtype=image.dtype),
        }
        item.update({key: value[index] for key, value in self.condition.items()})
        return item


def _num_train_timesteps(scheduler: Any) -> int:
    config = getattr(scheduler, "config", None)
    count = getattr(config, "num_train_timesteps", None)
    if count is None and getattr(scheduler, "alphas_cumprod", None) is not None:
        count = len(scheduler.alphas_cumprod)
    if count is None:
        raise TypeError(
            f"cannot tell how many timesteps {type(scheduler).__name__} was trained with: pass "
            "the model's noise scheduler (e.g. diffusers.DDPMScheduler)"
        )
    return int(count)
