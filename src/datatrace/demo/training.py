"""A deterministic training loop for the small classifiers of the demo and benchmarks."""

from __future__ import annotations

import copy

import torch
from torch import nn

from datatrace.demo.data import Split
from datatrace.demo.models import make_model


def train_classifier(
    model: nn.Module,
    train: Split,
    *,
    epochs: int = 30,
    lr: float = 1e-2,
    batch_size: int = 64,
    weight_decay: float = 5e-4,
    seed: int = 0,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """Train ``model`` with Adam and cross-entropy (``label_smoothing`` as in torch's);
    deterministic in ``seed``.

    Returns:
        The trained model, in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for lo in range(0, len(train), batch_size):
            index = order[lo : lo + batch_size]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(
                model(train.images[index]), train.labels[index], label_smoothing=label_smoothing
            )
            loss.backward()
            optimizer.step()
        schedule.step()
    return model.eval()


def train_checkpoints(
    train: Split,
    n_models: int,
    *,
    model: str = "mlp",
    epochs: int = 30,
    seed: int = 0,
    **model_kwargs,
) -> list[dict[str, torch.Tensor]]:
    """State dicts of ``n_models`` models trained independently, with seeds ``seed + i``."""
    checkpoints = []
    for index in range(n_models):
        net = make_model(model, seed=seed + index, **model_kwargs)
        train_classifier(net, train, epochs=epochs, seed=seed + index)
        checkpoints.append(copy.deepcopy(net.state_dict()))
    return checkpoints


@torch.no_grad()
def accuracy(model: nn.Module, split: Split) -> float:
    """Fraction of ``split`` that ``model`` classifies correctly."""
    model.eval()
    return (model(split.images).argmax(1) == split.labels).float().mean().item()
