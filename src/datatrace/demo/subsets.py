"""Subset training on the bundled digits: ready ``train``/``evaluate`` for subset experiments.

Used by ``datatrace subsets run`` out of the box, by the datamodels/LDS demos and benchmarks::

    from datatrace.demo.subsets import DigitsSubsets
    digits = DigitsSubsets(epochs=30)
    experiment = SubsetExperiment(store, "lds", n_train=digits.n_train,
                                  n_outputs=digits.n_outputs, n_masks=100,
                                  description=digits.description())
    experiment.run(digits.train, digits.evaluate)

Everything here is module-level (or a method of a module-level dataclass), so it pickles for
process pools and Ray, and each worker loads the digits once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from datatrace.demo.data import Split, digits_split
from datatrace.demo.models import MODELS, make_model
from datatrace.demo.training import train_classifier
from datatrace.tasks.classification import classification_margin

# The digits split of the demo: 1,500 training and 297 test images.
TEST_SIZE = 297


@functools.lru_cache(maxsize=4)
def _split(split_seed: int) -> tuple[Split, Split]:
    return digits_split(n_test=TEST_SIZE, seed=split_seed)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` torch CPU threads (0: leave the setting), restoring it afterwards."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class DigitsSubsets:
    """Train a digits classifier on a subset of the 1,500 training images; margins on the 297 test.

    Args:
        model: architecture (``"mlp"`` or ``"cnn"``, see :func:`datatrace.demo.make_model`).
        epochs: training epochs (Adam, cosine schedule; :func:`datatrace.demo.train_classifier`).
        lr: learning rate.
        batch_size: examples per step.
        weight_decay: Adam's weight decay.
        split_seed: seed of the train/test split of the digits.
        threads: torch threads while training (1: fast when other processes share the cores).
        max_train: use only the first ``max_train`` training images (default: all 1,500).
    """

    model: str = "mlp"
    epochs: int = 30
    lr: float = 1e-2
    batch_size: int = 64
    weight_decay: float = 5e-4
    split_seed: int = 0
    threads: int = 1
    max_train: int | None = None

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}: choose from {sorted(MODELS)}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        available = len(_split(self.split_seed)[0])
        if self.max_train is not None and not 1 <= self.max_train <= available:
            raise ValueError(f"max_train must be between 1 and {available}, got {self.max_train}")

    def training_split(self) -> Split:
        """The training images used: the first ``max_train`` of the split (all by default)."""
        train = _split(self.split_seed)[0]
        return train if self.max_train is None else train.subset(np.arange(self.max_train))

    @property
    def n_train(self) -> int:
        """Training images used (1,500 unless ``max_train`` is set)."""
        return len(self.training_split())

    @property
    def n_outputs(self) -> int:
        """Test images whose margins :meth:`evaluate` returns (297)."""
        return len(_split(self.split_seed)[1])

    def description(self) -> dict:
        """What produces the outputs, for the experiment's provenance."""
        settings = asdict(self)
        if settings["max_train"] is None:  # all training images: as recorded before the option
            del settings["max_train"]
        return {"task": "datatrace.demo.subsets:DigitsSubsets", **settings}

    def train(self, train_indices: np.ndarray, seed: int) -> nn.Module:
        """A model trained on training images ``train_indices`` ``(n_subset,)``; deterministic."""
        train_split = self.training_split().subset(train_indices)
        with torch_threads(self.threads):
            network = make_model(self.model, seed=seed)
            return train_classifier(
                network,
                train_split,
                epochs=self.epochs,
                lr=self.lr,
                batch_size=self.batch_size,
                weight_decay=self.weight_decay,
                seed=seed,
            )

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> np.ndarray:
        """Margins ``logit_y − logsumexp_{c≠y} logit_c`` of the test images, ``(297,)``."""
        test = _split(self.split_seed)[1]
        with torch_threads(self.threads):
            return classification_margin(model.eval()(test.images), test.labels).numpy()


DEFAULT_DIGITS = DigitsSubsets()


def train_digits(train_indices: np.ndarray, seed: int) -> nn.Module:
    """:meth:`DigitsSubsets.train` with the default settings (MLP, 30 epochs)."""
    return DEFAULT_DIGITS.train(train_indices, seed)


def evaluate_digits(model: nn.Module) -> np.ndarray:
    """:meth:`DigitsSubsets.evaluate` with the default settings: test margins ``(297,)``."""
    return DEFAULT_DIGITS.evaluate(model)
