"""Unlearning a forget set without retraining, and KLoM, the measure of how well it worked.

A model trained on a training set ``S`` should behave as if it had never seen a *forget set*
``F ⊂ S``: its outputs should be distributed like those of models retrained on ``S ∖ F``.

- :func:`datamodel_matching` (DMM, Georgiev et al. 2024, "Attribute-to-Delete"): attributions
  predict the logits of a model trained without ``F``, ``f̂(x) = f(x; θ) − Σ_{i∈F} β_i(x)`` per
  class; the model is fine-tuned from ``θ`` on ``F`` plus a random sample of retained examples,
  with a squared error towards ``f̂``.
- :func:`oracle_matching`: the same fine-tuning towards the mean logits of models truly
  retrained without ``F`` (an upper reference for DMM: perfect predictions).
- Baselines: :func:`gradient_ascent` (raise the loss on ``F``) and :func:`retain_finetune`
  (keep training on ``S ∖ F`` only).
- :func:`klom`: per evaluated point, the KL divergence between the distribution of margins over
  many unlearned models and over many models retrained without ``F``.

All matching losses compare **centred logits** (each row minus its mean over classes): the
softmax ignores a shift common to all classes, so matching it would spend the fine-tuning on
something that changes no prediction. Datamodels of logits are best fitted on centred logits
too (:func:`centre_logits`), which removes that shift's noise from the regression.

Per-class attributions ``β_i(x)`` for every class logit come as ``(n_points, n_classes,
n_train)``, or as attributions of ``n_points · n_classes`` flattened outputs in point-major order
(row ``p · n_classes + c`` explains logit ``c`` of point ``p``): what
``Datamodels().fit(masks, logits.reshape(R, -1))`` returns for logits ``(R, n_points,
n_classes)``. :func:`per_class_scores` turns the second form into the first.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from datatrace._arguments import positions, positive_integer
from datatrace._settings import Settings, setting
from datatrace.attributions import Attributions

# KLoM (Georgiev et al. 2024): margins are clipped to this magnitude, binned in this many bins
# over the range of both sets, and empty bins of the reference get this probability.
KLOM_CLIP = 100.0
KLOM_BINS = 20
KLOM_FLOOR = 1e-5


class _Settings(Settings):
    def check(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"{item.name} must be non-negative, got {value}")
        if getattr(self, "epochs", 1) < 1 or getattr(self, "batch_size", 1) < 1:
            raise ValueError("epochs and batch_size must be at least 1")


@dataclass(frozen=True)
class MatchingSettings(_Settings):
    """Fine-tuning towards target logits (datamodel and oracle matching).

    The reference (CIFAR-10, ResNet-9) uses Adam, lr 5e-4 decayed by 0.95 per epoch, 5 epochs,
    batch 512, a retain sample of 3·|F|. A forget set of 100 and a retain sample of 300 make one
    step per epoch at batch 512, so the defaults here use small batches and more epochs. They
    are a starting point, not a tuned optimum: on the digits benchmark
    (benchmarks/unlearning_klom.py, docs/unlearning.md) the best grid point changed with the
    forget set and the number of subset models (10 epochs at lr 3e-3 to 20 epochs at 1e-3);
    tune them by KLoM on a forget set of your own.
    """

    epochs: int = setting("passes over the forget set plus a fresh retain sample", 10)
    lr: float = setting("Adam learning rate", 1e-3)
    lr_decay: float = setting("learning-rate factor applied after every epoch (γ)", 0.95)
    batch_size: int = setting("examples per step", 32)
    retain_multiple: float = setting("retain sample size per epoch, as a multiple of |F|", 3.0)
    forget_repeats: int = setting("copies of the forget set in every epoch", 1)
    weight_penalty: float = setting("coefficient of ‖θ − θ₀‖² added to the loss (0: none)", 0.0)

    def check(self) -> None:
        super().check()
        if self.forget_repeats < 1:
            raise ValueError(f"forget_repeats must be at least 1, got {self.forget_repeats}")


@dataclass(frozen=True)
class GradientAscentSettings(_Settings):
    """Gradient ascent on the cross-entropy of the forget set (SGD)."""

    epochs: int = setting("passes over the forget set", 3)
    lr: float = setting("SGD learning rate", 1e-2)
    batch_size: int = setting("examples per step", 32)
    momentum: float = setting("SGD momentum", 0.0)


@dataclass(frozen=True)
class RetainFinetuneSettings(_Settings):
    """Fine-tuning on the retained examples only (cross-entropy, Adam)."""

    epochs: int = setting("passes over the retained examples", 2)
    lr: float = setting("Adam learning rate", 1e-3)
    batch_size: int = setting("examples per step", 64)


# -- data -------------------------------------------------------------------------------------


def _tensors(train_data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` tensors of a classification training set."""
    if not isinstance(train_data, (tuple, list)) or len(train_data) != 2:
        raise ValueError(
            "train_data must be a pair (inputs, labels) of tensors with one row per training "
            f"example, got {type(train_data).__name__}"
        )
    inputs, labels = (
        torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v for v in train_data
    )
    if len(inputs) != len(labels):
        raise ValueError(
            f"train_data has {len(inputs)} inputs but {len(labels)} labels: one of each per example"
        )
    return inputs, labels.long()


def _indices(indices: Sequence[int] | np.ndarray, n: int, what: str) -> np.ndarray:
    indices = positions(indices, n, what)
    if indices.size == 0:
        raise ValueError(f"{what} is empty")
    if indices.min() < 0 or indices.max() >= n:
        raise ValueError(f"{what} must be indices in [0, {n}), got values up to {indices.max()}")
    if len(np.unique(indices)) != len(indices):
        raise ValueError(f"{what} holds repeated indices")
    return indices


def centre_logits(logits: torch.Tensor) -> torch.Tensor:
    """Each row minus its mean over classes (the last dimension): what the softmax sees."""
    return logits - logits.mean(dim=-1, keepdim=True)


@torch.no_grad()
def model_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``model(inputs)`` in eval mode, batch by batch, ``(n, n_classes)``."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat(
            [model(inputs[lo : lo + batch_size]) for lo in range(0, len(inputs), batch_size)]
        )
    finally:
        model.train(was_training)


def per_class_scores(attributions: Attributions | np.ndarray, n_classes: int) -> np.ndarray:
    """Attributions of flattened per-class outputs as ``(n_points, n_classes, n_train)``.

    Args:
        attributions: ``(n_points · n_classes, n_train)`` scores, row ``p · n_classes + c``
            explaining output ``c`` of point ``p`` (point-major, as ``logits.reshape(-1)`` of
            ``(n_points, n_classes)`` logits orders them); or already ``(n_points, n_classes,
            n_train)``.
        n_classes: number of classes.

    Returns:
        ``(n_points, n_classes, n_train)`` (a view where possible).
    """
    scores = attributions.scores if isinstance(attributions, Attributions) else attributions
    scores = np.asarray(scores)
    if scores.ndim == 3:
        if scores.shape[1] != n_classes:
            raise ValueError(
                f"per-class attributions have {scores.shape[1]} classes, expected {n_classes}"
            )
        return scores
    if scores.ndim != 2 or scores.shape[0] % n_classes:
        raise ValueError(
            f"attributions of shape {scores.shape} are not (n_points · {n_classes}, n_train): "
            "fit them on outputs of shape (n_points, n_classes) flattened point-major"
        )
    return scores.reshape(scores.shape[0] // n_classes, n_classes, scores.shape[1])


def datamodel_predictions(
    model: nn.Module,
    forget_indices: Sequence[int] | np.ndarray,
    train_data: Any,
    attributions: Attributions | np.ndarray,
    *,
    points: Sequence[int] | np.ndarray | None = None,
) -> torch.Tensor:
    """Logits predicted for a model trained without the forget set: ``f(x; θ) − Σ_{i∈F} β_i(x)``.

    Args:
        model: the trained model ``θ`` (not modified).
        forget_indices: ``(|F|,)`` training indices to forget.
        train_data: ``(inputs, labels)`` tensors of the whole training set.
        attributions: per-class attributions of the points, ``(n_points, n_classes, n_train)`` or
            ``(n_points · n_classes, n_train)`` point-major (see :func:`per_class_scores`); or
            fitted :class:`~datatrace.Datamodels` of those outputs, whose
            :meth:`~datatrace.Datamodels.contribution` re-estimates the joint effect of the
            forget set from their fitting subsets instead of summing shrunk weights.
        points: ``(n_points,)`` training indices the attributions explain (default: all).

    Returns:
        ``(n_points, n_classes)`` predicted logits (float32).
    """
    inputs, _ = _tensors(train_data)
    points = _points(points, len(inputs))
    logits = model_logits(model, inputs[torch.as_tensor(points)])
    forget = _indices(forget_indices, len(inputs), "forget_indices")
    if hasattr(attributions, "contribution"):  # fitted Datamodels: the joint effect of F
        removed = np.asarray(attributions.contribution(forget), dtype=np.float64)
        if removed.size != logits.numel():
            raise ValueError(
                f"the datamodels explain {removed.size} outputs, expected {len(points)} points × "
                f"{logits.shape[1]} classes (point-major centred logits)"
            )
        removed = removed.reshape(logits.shape)
        return logits - torch.as_tensor(removed, dtype=logits.dtype)
    beta = per_class_scores(attributions, logits.shape[1])
    if beta.shape[0] != len(points) or beta.shape[2] != len(inputs):
        raise ValueError(
            f"attributions of shape {beta.shape} do not match {len(points)} points × "
            f"{logits.shape[1]} classes × {len(inputs)} training examples"
        )
    removed = beta[:, :, forget].sum(axis=2, dtype=np.float64)
    return logits - torch.as_tensor(removed, dtype=logits.dtype)


def _points(points: Sequence[int] | np.ndarray | None, n_train: int) -> np.ndarray:
    if points is None:
        return np.arange(n_train)
    return _indices(points, n_train, "points")


# -- fine-tuning ------------------------------------------------------------------------------


def _fine_tune(
    model: nn.Module,
    seed: int,
    epochs: int,
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    epoch_batches: Callable[[np.random.Generator, torch.Generator], list[torch.Tensor]],
    loss: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    lr_decay: float = 1.0,
    weight_penalty: float = 0.0,
) -> nn.Module:
    """A copy of ``model`` trained with ``loss`` on the index batches of each epoch."""
    tuned = copy.deepcopy(model)
    parameters = [p for p in tuned.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in parameters]
    optimizer = make_optimizer(parameters)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=lr_decay)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    # Seed torch's global generator too (dropout and the like), without changing it for the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tuned.train()
        for _ in range(epochs):
            for batch in epoch_batches(rng, generator):
                optimizer.zero_grad()
                value = loss(tuned, batch)
                if weight_penalty:
                    value = value + weight_penalty * sum(
                        (p - p0).pow(2).sum() for p, p0 in zip(parameters, start)
                    )
                value.backward()
                optimizer.step()
            schedule.step()
    return tuned.eval()


def _batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [order[lo : lo + batch_size] for lo in range(0, len(order), batch_size)]


def _cross_entropy_tune(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    rows: torch.Tensor,
    sign: float,
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    settings: GradientAscentSettings | RetainFinetuneSettings,
    seed: int,
) -> nn.Module:
    """The baselines: ``sign ×`` cross-entropy on the training ``rows`` ``(n_rows,)``, every
    epoch in a new order (``sign = −1``: gradient ascent on the forget set)."""
    inputs, labels = data

    def epoch_batches(rng: np.random.Generator, generator: torch.Generator) -> list[torch.Tensor]:
        return _batches(rows[torch.randperm(len(rows), generator=generator)], settings.batch_size)

    def loss(tuned: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return sign * nn.functional.cross_entropy(tuned(inputs[batch]), labels[batch])

    return _fine_tune(model, seed, settings.epochs, make_optimizer, epoch_batches, loss)


def match_logits(
    model: nn.Module,
    forget_indices: Sequence[int] | np.ndarray,
    train_data: Any,
    target_logits: torch.Tensor | np.ndarray,
    *,
    points: Sequence[int] | np.ndarray | None = None,
    settings: MatchingSettings | None = None,
    seed: int = 0,
) -> nn.Module:
    """Fine-tune a copy of ``model`` so that its logits on ``points`` approach ``target_logits``.

    Every epoch trains on the forget set (``forget_repeats`` copies) plus a fresh random sample
    of ``retain_multiple · |F|`` retained points (points not in ``F``), shuffled, with Adam and
    the mean squared error between centred logits; the learning rate is multiplied by
    ``lr_decay`` after each epoch. Deterministic in ``seed``.

    Args:
        model: the trained model (not modified).
        forget_indices: ``(|F|,)`` training indices to forget; all must be among ``points``.
        train_data: ``(inputs, labels)`` tensors of the whole training set.
        target_logits: ``(n_points, n_classes)`` logits to match on ``points``.
        points: ``(n_points,)`` training indices that have target logits (default: all).
        settings: :class:`MatchingSettings`.
        seed: seed of the retain samples, the order of examples and torch's random state.

    Returns:
        The fine-tuned copy, in eval mode.
    """
    settings = settings or MatchingSettings()
    settings.check()
    inputs, _ = _tensors(train_data)
    points = _points(points, len(inputs))
    forget = _indices(forget_indices, len(inputs), "forget_indices")
    targets = torch.as_tensor(np.asarray(target_logits), dtype=torch.float32)
    if targets.ndim != 2 or targets.shape[0] != len(points):
        raise ValueError(
            f"target_logits must be (n_points={len(points)}, n_classes), got {tuple(targets.shape)}"
        )
    row_of = {int(point): row for row, point in enumerate(points)}
    missing = [int(i) for i in forget if int(i) not in row_of]
    if missing:
        raise ValueError(
            f"{len(missing)} forget examples (e.g. {missing[:5]}) have no target logits: "
            "include every forget example in points"
        )
    forget_rows = torch.as_tensor([row_of[int(i)] for i in forget])
    retain_rows = np.setdiff1d(np.arange(len(points)), forget_rows.numpy())
    n_retain = min(len(retain_rows), round(settings.retain_multiple * len(forget)))
    point_inputs = inputs[torch.as_tensor(points)]
    targets = centre_logits(targets)

    def epoch_batches(rng: np.random.Generator, generator: torch.Generator) -> list[torch.Tensor]:
        retain = torch.as_tensor(rng.choice(retain_rows, size=n_retain, replace=False))
        rows = torch.cat([forget_rows.repeat(settings.forget_repeats), retain])
        order = rows[torch.randperm(len(rows), generator=generator)]
        return _batches(order, settings.batch_size)

    def loss(tuned: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        predicted = centre_logits(tuned(point_inputs[rows]))
        return (predicted - targets[rows]).pow(2).mean()

    return _fine_tune(
        model,
        seed,
        settings.epochs,
        lambda parameters: torch.optim.Adam(parameters, lr=settings.lr),
        epoch_batches,
        loss,
        lr_decay=settings.lr_decay,
        weight_penalty=settings.weight_penalty,
    )


def datamodel_matching(
    model: nn.Module,
    forget_indices: Sequence[int] | np.ndarray,
    train_data: Any,
    attributions: Attributions | np.ndarray,
    *,
    points: Sequence[int] | np.ndarray | None = None,
    settings: MatchingSettings | None = None,
    seed: int = 0,
) -> nn.Module:
    """Unlearn ``F`` by fine-tuning towards the logits attributions predict without it (DMM).

    Targets are ``f̂(x) = f(x; θ) − Σ_{i∈F} β_i(x)`` on every point (see
    :func:`datamodel_predictions`), then :func:`match_logits`.

    Args:
        model: the trained model ``θ`` (not modified).
        forget_indices: ``(|F|,)`` training indices to forget (all among ``points``).
        train_data: ``(inputs, labels)`` tensors of the whole training set.
        attributions: per-class attributions of ``points``: ``(n_points, n_classes, n_train)``
            or ``(n_points · n_classes, n_train)`` point-major (e.g. datamodels fitted on the
            flattened centred logits of subset-trained models).
        points: ``(n_points,)`` training indices the attributions explain (default: all);
            the retain samples are drawn from them.
        settings: :class:`MatchingSettings`.
        seed: see :func:`match_logits`.

    Returns:
        The unlearned copy of ``model``, in eval mode.
    """
    predicted = datamodel_predictions(
        model, forget_indices, train_data, attributions, points=points
    )
    return match_logits(
        model, forget_indices, train_data, predicted, points=points, settings=settings, seed=seed
    )


def oracle_matching(
    model: nn.Module,
    forget_indices: Sequence[int] | np.ndarray,
    train_data: Any,
    oracle_logits: torch.Tensor | np.ndarray,
    *,
    points: Sequence[int] | np.ndarray | None = None,
    settings: MatchingSettings | None = None,
    seed: int = 0,
) -> nn.Module:
    """Unlearn ``F`` by fine-tuning towards the mean logits of models retrained without it.

    Args:
        model: the trained model (not modified).
        forget_indices: ``(|F|,)`` training indices to forget (all among ``points``).
        train_data: ``(inputs, labels)`` tensors of the whole training set.
        oracle_logits: ``(n_points, n_classes)`` mean logits of models trained on ``S ∖ F``
            (the reference uses ~10 models).
        points: ``(n_points,)`` training indices of the rows of ``oracle_logits`` (default: all).
        settings: :class:`MatchingSettings`.
        seed: see :func:`match_logits`.

    Returns:
        The unlearned copy of ``model``, in eval mode.
    """
    return match_logits(
        model,
        forget_indices,
        train_data,
        oracle_logits,
        points=points,
        settings=settings,
        seed=seed,
    )


def gradient_ascent(
    model: nn.Module,
    forget_indices: Sequence[int] | np.ndarray,
    train_data: Any,
    *,
    settings: GradientAscentSettings | None = None,
    seed: int = 0,
) -> nn.Module:
    """Baseline: raise the cross-entropy of the forget set with SGD.

    Args:
        model: the trained model (not modified).
        forget_indices: ``(|F|,)`` training indices to forget.
        train_data: ``(inputs, labels)`` tensors of the whole training set.
        settings: :class:`GradientAscentSettings`.
        seed: seed of the order of examples and torch's random state.

    Returns:
        The unlearned copy, in eval mode.
    """
    settings = settings or GradientAscentSettings()
    settings.check()
    inputs, labels = _tensors(train_data)
    forget = torch.as_tensor(_indices(forget_indices, len(inputs), "forget_indices"))

    return _cross_entropy_tune(
        model,
        (inputs, labels),
        forget,
        -1.0,
        lambda parameters: torch.optim.SGD(parameters, lr=settings.lr, momentum=settings.momentum),
        settings,
        seed,
    )


def retain_finetune(
    model: nn.Module,
    forget_indices: Sequence[int] | np.ndarray,
    train_data: Any,
    *,
    settings: RetainFinetuneSettings | None = None,
    seed: int = 0,
) -> nn.Module:
    """Baseline: keep training on the retained examples only (cross-entropy, Adam).

    Args:
        model: the trained model (not modified).
        forget_indices: ``(|F|,)`` training indices to forget.
        train_data: ``(inputs, labels)`` tensors of the whole training set.
        settings: :class:`RetainFinetuneSettings`.
        seed: seed of the order of examples and torch's random state.

    Returns:
        The unlearned copy, in eval mode.
    """
    settings = settings or RetainFinetuneSettings()
    settings.check()
    inputs, labels = _tensors(train_data)
    forget = _indices(forget_indices, len(inputs), "forget_indices")
    retain = torch.as_tensor(np.setdiff1d(np.arange(len(inputs)), forget))

    return _cross_entropy_tune(
        model,
        (inputs, labels),
        retain,
        1.0,
        lambda parameters: torch.optim.Adam(parameters, lr=settings.lr),
        settings,
        seed,
    )


# -- KLoM -------------------------------------------------------------------------------------


def klom(
    unlearned_margins: np.ndarray,
    oracle_margins: np.ndarray,
    *,
    bins: int = KLOM_BINS,
    clip: float = KLOM_CLIP,
    floor: float = KLOM_FLOOR,
) -> np.ndarray:
    """KL divergence of margins, unlearned models against retrained ones, for every point (KLoM).

    For each point ``j``: the margins of the ``n_unlearned`` unlearned models and of the
    ``n_oracle`` models retrained without the forget set are clipped to ``[−clip, clip]``; the
    range from the smallest to the largest of both sets is cut into ``bins`` equal bins (each
    half-open ``[e_k, e_{k+1})``, the last closed, so the largest value counts — one of the
    reference's versions drops it); the histograms become probabilities ``p`` (unlearned) and
    ``q`` (oracle), empty oracle bins get probability ``floor``, and

        KLoM_j = KL(p ‖ q) = Σ_{k: p_k > 0} p_k log(p_k / max(q_k, floor))

    in nats. **Direction**: KL(unlearned ‖ oracle): large where unlearned models put margins
    where retrained models never do (e.g. forget points still fit as if trained on). It is 0
    when the histograms agree, and where every margin of both sets is the same value. Even two
    sets of models retrained alike get a positive value from sampling noise (about
    ``(occupied bins − 1) / (2 n)`` for ``n`` models each): measure that floor with a second set
    of retrained models. The bins span both sets, so a few unlearned models with wild margins
    on a point (diverged fine-tuning) squeeze every other margin of that point into one or two
    bins and make its KLoM *smaller*: count such models beside the KLoM (docs/unlearning.md).

    Args:
        unlearned_margins: ``(n_unlearned, n_points)`` margins of unlearned models.
        oracle_margins: ``(n_oracle, n_points)`` margins of models retrained without ``F``.
        bins: number of histogram bins.
        clip: margins are clipped to ``[−clip, clip]``.
        floor: probability given to empty bins of the oracle histogram.

    Returns:
        ``(n_points,)`` KLoM of every point.
    """
    unlearned = _margins(unlearned_margins, "unlearned_margins")
    oracle = _margins(oracle_margins, "oracle_margins")
    if unlearned.shape[1] != oracle.shape[1]:
        raise ValueError(
            f"unlearned_margins have {unlearned.shape[1]} points, oracle_margins "
            f"{oracle.shape[1]}: both are (n_models, n_points) over the same points"
        )
    positive_integer("bins", bins)
    if not (clip > 0 and 0 < floor < 1):
        raise ValueError(f"need clip > 0 and 0 < floor < 1; got {clip} and {floor}")
    unlearned = np.clip(unlearned, -clip, clip)
    oracle = np.clip(oracle, -clip, clip)
    low = np.minimum(unlearned.min(axis=0), oracle.min(axis=0))
    high = np.maximum(unlearned.max(axis=0), oracle.max(axis=0))
    # The inner edges of np.linspace(low, high, bins + 1) for every point, (bins - 1, n_points).
    step = (high - low) / bins
    inner = low + step * np.arange(1, bins)[:, None]
    p = _histogram(unlearned, inner, bins)
    q = _histogram(oracle, inner, bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / np.maximum(q, floor)), 0.0)
    values = terms.sum(axis=0)
    values[high == low] = 0.0  # one value in both sets: identical distributions
    return values


def _margins(values: Any, what: str) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{what} must be numbers (margins), got dtype {values.dtype}")
    values = values.astype(np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] < 1:
        raise ValueError(f"{what} must be (n_models, n_points), got shape {values.shape}")
    if np.isnan(values).any():
        raise ValueError(f"{what} hold NaN margins: drop the models that did not finish")
    return values


def _histogram(values: np.ndarray, inner: np.ndarray, bins: int) -> np.ndarray:
    """Bin probabilities ``(bins, n_points)`` of ``values`` ``(n_models, n_points)``."""
    index = (values[None, :, :] >= inner[:, None, :]).sum(axis=0)  # bin of each value
    n_models, n_points = values.shape
    flat = index * n_points + np.arange(n_points)
    counts = np.bincount(flat.ravel(), minlength=bins * n_points).reshape(bins, n_points)
    return counts / n_models


def klom_summary(values: np.ndarray) -> dict[str, float]:
    """Median, 95th percentile and mean of per-point KLoM values."""
    values = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(values)),
        "p95": float(np.percentile(values, 95)),
        "mean": float(values.mean()),
    }
