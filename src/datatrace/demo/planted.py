"""A planted difference between two learning algorithms on the digits, for ModelDiff.

A share of the training images of one class carry a small bright patch in the top-left corner.
Algorithm A trains on the images as they are; algorithm B trains with an augmentation that erases
that corner of every image, so B's models never see the patch. By construction A's models can
learn "patch → class" and B's cannot: the right answer of a comparison of A with B is the patched
subpopulation, and adding the patch to test images of other classes moves A's outputs towards the
patched class and leaves B's unchanged.

Used by ``tests/test_modeldiff.py``, ``examples/modeldiff_digits.py`` and docs/modeldiff.md::

    planted = PlantedPatch()
    data = planted.data()
    model_a = planted.train_a(np.arange(planted.n_train), seed=0)
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from datatrace.demo.data import Split, digits_split
from datatrace.demo.models import make_model
from datatrace.demo.subsets import torch_threads
from datatrace.demo.training import train_classifier

# The patch is drawn at full brightness: the digits are scaled to [0, 1] and the corner pixels
# of real digits are (almost) always 0, so the patch is a feature no real image has.
PATCH_VALUE = 1.0


@dataclass(frozen=True)
class PlantedData:
    """The data of a planted comparison.

    Attributes:
        train_a: ``(n_train, 1, 8, 8)`` training images as algorithm A sees them (patched).
        train_b: the same images as algorithm B sees them (corner erased).
        train_labels: ``(n_train,)``.
        patched: ``(n_patched,)`` indices of the patched training images.
        targets: ``(n_targets, 1, 8, 8)`` test images, some patched.
        target_labels: ``(n_targets,)``.
        patched_targets: ``(n,)`` indices of the patched test images (same class first, then
            other classes).
    """

    train_a: torch.Tensor
    train_b: torch.Tensor
    train_labels: torch.Tensor
    patched: np.ndarray
    targets: torch.Tensor
    target_labels: torch.Tensor
    patched_targets: np.ndarray


@dataclass(frozen=True)
class PlantedPatch:
    """Algorithms A (plain) and B (corner erased) on digits with a patched subpopulation.

    Args:
        patched_class: the class whose images get the patch.
        fraction: share of that class's training images patched.
        patch_size: side of the square patch, in pixels.
        erase_size: side of the corner square B's augmentation sets to 0 (≥ ``patch_size``).
        patched_targets_same: test images of the patched class that get the patch.
        patched_targets_other: test images of other classes that get the patch.
        epochs: training epochs (Adam, cosine schedule; :func:`datatrace.demo.train_classifier`).
        batch_size: examples per step.
        model: architecture (see :func:`datatrace.demo.make_model`).
        seed: seed of the choice of patched images (and of the digits split).
        threads: torch threads while training.
        label_smoothing: of the cross-entropy both algorithms train with (0: none). With it no
            training example is fit to ``Q ≈ 0``, so ``Q`` no longer hides the patched images.
    """

    patched_class: int = 0
    fraction: float = 0.2
    patch_size: int = 2
    erase_size: int = 3
    patched_targets_same: int = 15
    patched_targets_other: int = 30
    epochs: int = 20
    batch_size: int = 128
    model: str = "mlp"
    seed: int = 0
    threads: int = 1
    label_smoothing: float = 0.0

    def __post_init__(self):
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if not 1 <= self.patch_size <= self.erase_size <= 8:
            raise ValueError(
                f"need 1 ≤ patch_size ≤ erase_size ≤ 8, got {self.patch_size} and {self.erase_size}"
            )

    def description(self) -> dict:
        """The settings, for provenance."""
        settings = asdict(self)
        if not settings["label_smoothing"]:  # as recorded before the option existed
            del settings["label_smoothing"]
        return {"planted": "datatrace.demo.planted:PlantedPatch", **settings}

    @property
    def n_train(self) -> int:
        return len(self.data().train_labels)

    def add_patch(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` ``(n, 1, 8, 8)`` with the patch drawn in the top-left corner (a copy)."""
        images = images.clone()
        images[:, :, : self.patch_size, : self.patch_size] = PATCH_VALUE
        return images

    def erase_corner(self, images: torch.Tensor) -> torch.Tensor:
        """B's augmentation: the top-left ``erase_size`` square set to 0 (a copy)."""
        images = images.clone()
        images[:, :, : self.erase_size, : self.erase_size] = 0.0
        return images

    def data(self) -> PlantedData:
        """The patched training set, B's view of it, and the partly patched test images."""
        return _planted_data(self)

    def _train(self, images: torch.Tensor, train_indices: np.ndarray, seed: int) -> nn.Module:
        labels = self.data().train_labels
        indices = torch.as_tensor(np.asarray(train_indices), dtype=torch.long)
        with torch_threads(self.threads):
            return train_classifier(
                make_model(self.model, seed=seed),
                Split(images[indices], labels[indices]),
                epochs=self.epochs,
                batch_size=self.batch_size,
                seed=seed,
                label_smoothing=self.label_smoothing,
            )

    def train_a(self, train_indices: np.ndarray, seed: int) -> nn.Module:
        """Algorithm A: train on the training images as they are."""
        return self._train(self.data().train_a, train_indices, seed)

    def train_b(self, train_indices: np.ndarray, seed: int) -> nn.Module:
        """Algorithm B: train with the corner erased from every image."""
        return self._train(self.data().train_b, train_indices, seed)

    @torch.no_grad()
    def margin_to_patched_class(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """``logit_c − logsumexp_{k≠c} logit_k`` for the patched class ``c``, ``(n,)``."""
        logits = model.eval()(images)
        c = self.patched_class
        others = torch.cat([logits[:, :c], logits[:, c + 1 :]], dim=1)
        return logits[:, c] - others.logsumexp(dim=1)


@functools.lru_cache(maxsize=4)
def _planted_data(planted: PlantedPatch) -> PlantedData:
    train, test = digits_split(seed=planted.seed)
    rng = np.random.default_rng(planted.seed)
    labels = train.labels.numpy()
    members = np.flatnonzero(labels == planted.patched_class)
    patched = np.sort(
        rng.choice(members, max(1, round(planted.fraction * len(members))), replace=False)
    )
    train_a = train.images.clone()
    train_a[patched] = planted.add_patch(train_a[patched])
    test_labels = test.labels.numpy()
    same = np.flatnonzero(test_labels == planted.patched_class)[: planted.patched_targets_same]
    other = np.flatnonzero(test_labels != planted.patched_class)[: planted.patched_targets_other]
    patched_targets = np.concatenate([same, other])
    targets = test.images.clone()
    targets[patched_targets] = planted.add_patch(targets[patched_targets])
    return PlantedData(
        train_a=train_a,
        train_b=planted.erase_corner(train_a),
        train_labels=train.labels,
        patched=patched,
        targets=targets,
        target_labels=test.labels,
        patched_targets=patched_targets,
    )
