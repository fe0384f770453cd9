"""A deterministic training run as a sequence of pure steps, with per-example data weights.

A run is described by a :class:`TrainingRecipe` (optimiser, learning rate and its schedule,
epochs, batch size, seed) and a training set. Everything random is drawn up front from the
seed: the data order is a fixed list of minibatch index arrays (one permutation per epoch, last
batch kept even when short), and the model's initial parameters are whatever the model holds when
the run starts. Each step is then a pure function of tensors::

    (params, slots)_{t+1} = step_t((params, slots)_t, w[batch_t])

where ``slots`` is the optimiser's state (SGD: the momentum buffer; Adam: both moment estimates;
the step count is ``t`` itself) and ``w`` holds one weight per training example: the training
loss of step ``t`` is ``Σ_{i ∈ batch_t} w_i ℓ_i / |batch_t|``, with ``|batch_t|`` the batch's size
in the full run. ``w = 1`` is ordinary training; ``w_i = 0`` removes example ``i`` from every batch
it appears in while keeping the data order of the full run, which is how the small-drop LDS
protocol retrains (:func:`train_subset`). Because each step is pure, ``torch.func.vjp`` can
differentiate through it, which is what :class:`~datatrace.methods.metagradients.Metagradients`
does.

The optimisers follow ``torch.optim.SGD`` (momentum, dampening 0, L2 weight decay added to the
gradient) and ``torch.optim.Adam`` (L2 weight decay, bias-corrected moments) step for step.
Models must compute the same function every call: no dropout, no BatchNorm in training mode
(buffers are held fixed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad

from datatrace.data import Examples, map_tensors
from datatrace.grads.per_example import _Bound

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "linear", "cosine")

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def cross_entropy_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Per-example cross-entropy of a classifier on ``(inputs, labels)``, ``(batch_size,)``."""
    inputs, labels = batch
    logits = model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
    return nn.functional.cross_entropy(logits, labels, reduction="none")


@dataclass(frozen=True)
class TrainingRecipe:
    """Settings of a deterministic training run (JSON-serialisable with :meth:`config`).

    Attributes:
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"`` (with ``betas``, ``eps``).
        lr: peak learning rate.
        momentum: SGD momentum (0: plain SGD).
        weight_decay: L2 penalty added to the gradient (as ``torch.optim`` does).
        betas: Adam's decay rates of the first and second moments.
        eps: Adam's term added to the root of the second moment.
        schedule: learning rate over the ``T`` steps: ``"constant"``, ``"linear"`` (from ``lr``
            down to ``lr / T``) or ``"cosine"`` (half a cosine from ``lr`` towards 0).
        epochs: passes over the training set.
        batch_size: examples per step (the last batch of an epoch may be shorter).
        seed: seed of the data order.
    """

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "constant"
    epochs: int = 1
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"epochs and batch_size must be at least 1, got {self.epochs} and {self.batch_size}"
            )
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def config(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict."""
        settings = asdict(self)
        settings["betas"] = list(self.betas)
        return settings

    def data_order(self, n_train: int) -> list[np.ndarray]:
        """The minibatches of the run: ``epochs · ⌈n_train / batch_size⌉`` int64 index arrays.

        Epoch ``e`` visits the examples in the order of the ``e``-th permutation drawn from
        ``numpy.random.default_rng(seed)``.
        """
        generator = np.random.default_rng(self.seed)
        order = []
        for _ in range(self.epochs):
            permutation = generator.permutation(n_train)
            order.extend(
                permutation[lo : lo + self.batch_size] for lo in range(0, n_train, self.batch_size)
            )
        return order

    def learning_rates(self, n_steps: int) -> np.ndarray:
        """``(n_steps,)`` learning rate of each step."""
        steps = np.arange(n_steps, dtype=np.float64)
        if self.schedule == "linear":
            return self.lr * (1 - steps / n_steps)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + np.cos(math.pi * steps / n_steps))
        return np.full(n_steps, self.lr)


class TrainState(NamedTuple):
    """The state of a run between steps.

    Attributes:
        params: the model's parameters, in ``named_parameters`` order.
        slots: the optimiser's state per parameter: ``(momentum,)`` for SGD (``()`` without
            momentum), ``(first_moment, second_moment)`` for Adam.
    """

    params: tuple[torch.Tensor, ...]
    slots: tuple[tuple[torch.Tensor, ...], ...]


def _safe_sqrt(values: torch.Tensor) -> torch.Tensor:
    """``sqrt`` whose derivative at 0 is 0 rather than ``inf`` (``inf · 0`` would turn Adam's
    backward pass into NaN for parameters whose gradient is exactly 0, e.g. the weights of an
    input pixel that is 0 in every example)."""
    positive = values > 0
    return torch.where(positive, torch.where(positive, values, 1).sqrt(), 0)


class DeterministicRun:
    """A training run of ``model`` on ``train_data`` as pure steps (see the module docstring).

    Args:
        model: the network; its current parameters are the run's initial parameters (they are
            copied, never modified).
        train_data: the training set (``(X, y)`` tensors, a dict of tensors or a Dataset), read
            into memory once.
        recipe: the run's settings.
        loss: ``loss(model, batch) -> (batch_size,)`` per-example training loss (default
            :func:`cross_entropy_loss`).

    Attributes:
        order: the minibatches, ``n_steps`` int64 index arrays.
        learning_rates: ``(n_steps,)``.
        names: the parameter names, the order of ``TrainState.params``.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Any,
        recipe: TrainingRecipe,
        loss: LossFn | None = None,
    ):
        examples = Examples(train_data)
        if examples.n == 0:
            raise ValueError("the training set is empty (0 examples): nothing to train on")
        self.model = model
        self.recipe = recipe
        self.n_train = examples.n
        self.data = examples.read(0, examples.n)
        self.order = recipe.data_order(examples.n)
        self.learning_rates = recipe.learning_rates(len(self.order))
        self.names = tuple(name for name, _ in model.named_parameters())
        self.dtype = next(model.parameters()).dtype
        self._loss = _Bound(model, loss or cross_entropy_loss)
        self._constants = {"model." + name: b for name, b in model.named_buffers()}

    @property
    def n_steps(self) -> int:
        return len(self.order)

    def initial_state(self) -> TrainState:
        """The state before the first step: the model's parameters, zero optimiser slots."""
        params = tuple(p.detach().clone() for p in self.model.parameters())
        n_slots = {"sgd": 1 if self.recipe.momentum else 0, "adam": 2}[self.recipe.optimizer]
        slots = tuple(tuple(torch.zeros_like(p) for _ in range(n_slots)) for p in params)
        return TrainState(params, slots)

    def batch(self, step: int) -> Any:
        """The examples of step ``step``."""
        index = torch.as_tensor(self.order[step])
        return map_tensors(lambda column: column[index], self.data)

    def batch_weights(self, weights: torch.Tensor, step: int) -> torch.Tensor:
        """``(|batch_step|,)`` the data weights of step ``step``'s examples."""
        return weights[torch.as_tensor(self.order[step])]

    def parameters_dict(self, params: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``params`` keyed as ``functional_call`` takes them for a :class:`_Bound` module."""
        return {**self._constants, **{"model." + n: p for n, p in zip(self.names, params)}}

    def call(self, fn: LossFn, params: Sequence[torch.Tensor], batch: Any) -> torch.Tensor:
        """``fn(model, batch)`` with ``params`` in place of the model's parameters."""
        return functional_call(_Bound(self.model, fn), self.parameters_dict(params), (batch,))

    def step(
        self,
        params: tuple[torch.Tensor, ...],
        slots: tuple[tuple[torch.Tensor, ...], ...],
        batch_weights: torch.Tensor,
        step: int,
    ) -> tuple[tuple[torch.Tensor, ...], tuple[tuple[torch.Tensor, ...], ...]]:
        """One optimiser step, a pure function of its tensor arguments.

        Args:
            params, slots: the state before the step (see :class:`TrainState`).
            batch_weights: ``(|batch_step|,)`` data weights of the step's examples.
            step: the step's number ``t`` (its batch, learning rate and Adam's bias correction).

        Returns:
            ``(params, slots)`` after the step.
        """
        recipe = self.recipe
        batch = self.batch(step)
        size = len(self.order[step])
        lr = float(self.learning_rates[step])

        def batch_loss(current: tuple[torch.Tensor, ...]) -> torch.Tensor:
            losses = functional_call(self._loss, self.parameters_dict(current), (batch,))
            return (batch_weights * losses).sum() / size

        gradients = grad(batch_loss)(params)
        if recipe.weight_decay:
            gradients = tuple(g + recipe.weight_decay * p for g, p in zip(gradients, params))
        if recipe.optimizer == "sgd":
            if not recipe.momentum:
                return tuple(p - lr * g for p, g in zip(params, gradients)), slots
            momenta = tuple(recipe.momentum * m + g for (m,), g in zip(slots, gradients))
            new_params = tuple(p - lr * m for p, m in zip(params, momenta))
            return new_params, tuple((m,) for m in momenta)
        beta1, beta2 = recipe.betas
        first = tuple(beta1 * m + (1 - beta1) * g for (m, _), g in zip(slots, gradients))
        second = tuple(beta2 * v + (1 - beta2) * g * g for (_, v), g in zip(slots, gradients))
        correction1 = 1 - beta1 ** (step + 1)
        root_correction2 = math.sqrt(1 - beta2 ** (step + 1))
        new_params = tuple(
            p - (lr / correction1) * m / (_safe_sqrt(v) / root_correction2 + recipe.eps)
            for p, m, v in zip(params, first, second)
        )
        return new_params, tuple(zip(first, second))

    def run(
        self,
        weights: torch.Tensor | None = None,
        *,
        start: int = 0,
        stop: int | None = None,
        state: TrainState | None = None,
        keep_every: int | None = None,
    ) -> tuple[TrainState, dict[int, TrainState]]:
        """Run steps ``start`` to ``stop - 1`` from ``state`` (default: the initial state).

        Args:
            weights: ``(n_train,)`` data weights (default all 1).
            start, stop: the steps to run (default: all).
            state: the state before step ``start``.
            keep_every: also return the state before every step ``t`` with
                ``t % keep_every == 0`` (and the one before ``start``).

        Returns:
            ``(final_state, kept)``: the state after step ``stop - 1``, and ``{t: state before
            step t}`` for the kept steps (empty when ``keep_every`` is None).
        """
        stop = self.n_steps if stop is None else stop
        weights = self.full_weights(weights)
        state = self.initial_state() if state is None else state
        kept: dict[int, TrainState] = {}
        with torch.no_grad():
            for t in range(start, stop):
                if keep_every is not None and (t % keep_every == 0 or t == start):
                    kept[t] = state
                state = TrainState(*self.step(*state, self.batch_weights(weights, t), t))
        return state, kept

    def full_weights(self, weights: Any = None) -> torch.Tensor:
        """``(n_train,)`` data weights in the model's dtype (default all 1)."""
        if weights is None:
            return torch.ones(self.n_train, dtype=self.dtype)
        weights = torch.as_tensor(weights, dtype=self.dtype)
        if weights.shape != (self.n_train,):
            raise ValueError(
                f"weights must hold one value per training example ({self.n_train},), got "
                f"shape {tuple(weights.shape)}"
            )
        return weights

    def trained_model(self, state: TrainState) -> nn.Module:
        """A copy of the model holding the parameters of ``state``, in eval mode."""
        import copy

        model = copy.deepcopy(self.model)
        with torch.no_grad():
            for parameter, value in zip(model.parameters(), state.params):
                parameter.copy_(value)
        return model.eval()


def train_subset(
    model: nn.Module,
    train_data: Any,
    recipe: TrainingRecipe,
    keep: Any,
    loss: LossFn | None = None,
) -> nn.Module:
    """``model`` trained on the examples ``keep`` selects, in the data order of the full run.

    The full run's minibatches are kept with the other examples removed (weight 0), so that two
    subsets differ only in the examples they drop: what the small-drop LDS protocol retrains.

    Args:
        model: the network at initialisation (not modified).
        train_data: the full training set.
        recipe: the full run's settings (its seed fixes the data order).
        keep: ``(n_train,)`` bool mask, or an int array of the kept indices.
        loss: per-example training loss (default :func:`cross_entropy_loss`).

    Returns:
        A trained copy of ``model``, in eval mode.
    """
    run = DeterministicRun(model, train_data, recipe, loss)
    keep = np.asarray(keep)
    if keep.dtype != bool:
        mask = np.zeros(run.n_train, dtype=bool)
        mask[keep] = True
        keep = mask
    final, _ = run.run(torch.as_tensor(keep, dtype=run.dtype))
    return run.trained_model(final)
