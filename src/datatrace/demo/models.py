"""Small classifiers for the digits, trained in seconds on a CPU."""

from __future__ import annotations

import torch
from torch import nn


class DigitsMLP(nn.Module):
    """``(n, 1, 8, 8) → 64 → hidden → hidden → 10`` with ReLU."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.head = nn.Linear(hidden, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


class DigitsCNN(nn.Module):
    """Two 3×3 convolutions with max-pooling, then a linear head."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * channels * 2 * 2, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


class DigitsBatchNormCNN(nn.Module):
    """Three 3×3 convolutions with batch norm (the second and third with max-pooling), then a
    linear head; attributed in eval mode, with the checkpoint's running statistics."""

    def __init__(self, channels: int = 16):
        super().__init__()

        def block(inputs: int, outputs: int, pool: bool) -> list[nn.Module]:
            layers = [nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU()]
            return [*layers, nn.MaxPool2d(2)] if pool else layers

        self.body = nn.Sequential(
            *block(1, channels, pool=False),
            *block(channels, 2 * channels, pool=True),
            *block(2 * channels, 2 * channels, pool=True),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * channels * 2 * 2, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


class ResidualBlock(nn.Module):
    """``x + W₂ relu(W₁ layernorm(x))`` (pre-norm, as in transformers' feed-forward blocks)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.inner = nn.Linear(width, 2 * width)
        self.outer = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.outer(torch.relu(self.inner(self.norm(x))))


class DigitsResidualMLP(nn.Module):
    """``(n, 1, 8, 8) → width``, ``depth`` pre-norm residual blocks, layer norm, ``→ 10``."""

    def __init__(self, width: int = 64, depth: int = 4):
        super().__init__()
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64, width))
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(images)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(self.norm(hidden))


MODELS = {
    "mlp": DigitsMLP,
    "cnn": DigitsCNN,
    "cnn-bn": DigitsBatchNormCNN,
    "resmlp": DigitsResidualMLP,
}


def make_model(name: str = "mlp", seed: int = 0, **kwargs) -> nn.Module:
    """A freshly initialised digits model, deterministic in ``seed``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose from {sorted(MODELS)}")
    torch.manual_seed(seed)
    return MODELS[name](**kwargs)
