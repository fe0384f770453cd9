"""Tiny denoising models and a deterministic training loop, for examples, tests and benchmarks.

Everything runs on a CPU in seconds to minutes: the bundled 8×8 digits (optionally upsampled) and a
``UNet2DModel`` built from a config (no download).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from datatrace.applications.diffusion.data import check_condition
from datatrace.progress import progress_bar
from datatrace.tasks.diffusion import add_noise, denoiser_output, denoising_target, schedule_of

DIFFUSERS_HINT = 'this needs Hugging Face diffusers: pip install "datatrace[diffusion]"'


def require_diffusers() -> Any:
    """The ``diffusers`` module, or an ImportError that says how to install it."""
    try:
        import diffusers
    except ImportError as error:
        raise ImportError(DIFFUSERS_HINT) from error
    return diffusers


def digits_images(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 bundled digits as diffusion training data.

    Args:
        size: side of the images; 8 is the original resolution, larger sizes are bilinear
            upsamplings.

    Returns:
        ``(images (1797, 1, size, size) float32 in [-1, 1], labels (1797,) int64)``.
    """
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    images = torch.tensor(images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    if size != 8:
        images = nn.functional.interpolate(images, size=(size, size), mode="bilinear")
    return images.clamp(0, 1) * 2 - 1, torch.tensor(labels, dtype=torch.long)


def tiny_unet(
    sample_size: int = 8,
    channels: int = 1,
    block_out_channels: tuple[int, ...] = (16, 32),
    num_class_embeds: int | None = None,
    attention: bool = False,
    seed: int = 0,
) -> nn.Module:
    """A small ``diffusers.UNet2DModel`` (tens of thousands of parameters at the defaults).

    Two resolution levels of ``DownBlock2D``/``UpBlock2D`` with one ResNet layer each, group
    norm with 8 groups; ``attention`` adds the self-attention of the middle block (it works
    under ``torch.vmap``, but per-example gradients then fall back to a slow loop over examples
    for the attention kernel).

    Args:
        sample_size: image side.
        channels: image (or latent) channels.
        block_out_channels: channels of each resolution level.
        num_class_embeds: number of classes for a class-conditional model
            (``model(x, t, class_labels=y)``), or ``None``.
        attention: include the middle block's self-attention.
        seed: seed of the initial weights.
    """
    diffusers = require_diffusers()
    torch.manual_seed(seed)
    levels = len(block_out_channels)
    return diffusers.UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        norm_num_groups=8,
        add_attention=attention,
        num_class_embeds=num_class_embeds,
    )


def tiny_text_unet(
    cross_attention_dim: int,
    sample_size: int = 8,
    channels: int = 1,
    block_out_channels: tuple[int, int] = (8, 16),
    seed: int = 0,
) -> nn.Module:
    """A small text-conditional ``diffusers.UNet2DConditionModel``.

    Called as ``model(x, t, encoder_hidden_states=e)`` with text embeddings ``e`` of shape
    ``(batch, n_tokens, cross_attention_dim)``: cross-attention in the first down and the last
    up block, one ResNet layer per block, group norm with 8 groups.

    Args:
        cross_attention_dim: width of the text embeddings.
        sample_size: image side.
        channels: image (or latent) channels.
        block_out_channels: channels of the two resolution levels.
        seed: seed of the initial weights.
    """
    diffusers = require_diffusers()
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def train_denoiser(
    model: nn.Module,
    scheduler: Any,
    images: torch.Tensor,
    *,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    condition: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> nn.Module:
    """Train ``model`` with the denoising loss and Adam; deterministic in ``seed``.

    Each step draws a batch of images, timesteps uniform in ``[0, num_train_timesteps)`` and
    Gaussian noise, and minimises ``mean‖model(x_t, t) − target‖²`` (the target set by the
    scheduler's ``prediction_type``); the learning rate follows a cosine schedule to 0.

    Args:
        model: the denoiser, called as ``model(x_t, t, **condition)``.
        scheduler: the noise scheduler (``alphas_cumprod``, ``config.prediction_type``).
        images: ``(n, *sample_shape)`` training images (or latents).
        steps: optimisation steps.
        batch_size: images per step (drawn with replacement).
        lr: peak learning rate.
        seed: seed of every draw.
        condition: optional conditioning inputs, one row per image, by keyword.
        progress: show a progress bar.

    Returns:
        The trained model, in eval mode.
    """
    alphas_cumprod, prediction_type = schedule_of(scheduler)
    condition = check_condition(condition, len(images))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    model.train()
    with progress_bar(steps, "training", progress) as advance:
        for _ in range(steps):
            index = torch.randint(0, len(images), (batch_size,), generator=generator)
            x0 = images[index]
            timesteps = torch.randint(0, len(alphas_cumprod), (batch_size,), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            noisy = add_noise(alphas_cumprod, x0, noise, timesteps)
            batch_condition = {key: value[index] for key, value in condition.items()}
            prediction = denoiser_output(model(noisy, timesteps, **batch_condition))
            target = denoising_target(prediction_type, alphas_cumprod, x0, noise, timesteps)
            loss = nn.functional.mse_loss(prediction, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            advance(1)
    return model.eval()
