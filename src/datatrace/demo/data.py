"""Bundled data for the demo, examples and benchmarks: scikit-learn's 8×8 digits (offline)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits


@dataclass(frozen=True)
class Split:
    """Images ``(n, 1, 8, 8)`` float32 in ``[0, 1]`` and labels ``(n,)`` int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.labels

    def subset(self, indices) -> Split:
        indices = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return Split(self.images[indices], self.labels[indices])


def digits_split(n_test: int = 297, seed: int = 0) -> tuple[Split, Split]:
    """The 1,797 digits shuffled with ``seed`` and split into train and test.

    Returns:
        ``(train, test)`` with ``1797 − n_test`` and ``n_test`` examples.
    """
    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(labels))
    images = torch.tensor(images[order] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    labels = torch.tensor(labels[order], dtype=torch.long)
    n_train = len(labels) - n_test
    return (Split(images[:n_train], labels[:n_train]), Split(images[n_train:], labels[n_train:]))
