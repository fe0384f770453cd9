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


MODELS = {"mlp": DigitsMLP, "cnn": DigitsCNN}


def make_model(name: str = "mlp", seed: int = 0, **kwargs) -> nn.Module:
    """A freshly initialised digits model, deterministic in ``seed``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose from {sorted(MODELS)}")
    torch.manual_seed(seed)
    return MODELS[name](**kwargs)
