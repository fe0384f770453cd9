"""Metagradients (MAGIC, Ilyas & Engstrom 2025): exact ``∂ output / ∂ w_i`` through training.

For a deterministic run ``state_{t+1} = step_t(state_t, w)`` (:mod:`datatrace.methods.training`:
model,
optimiser with its state, fixed data order, learning-rate schedule), where the training loss of
step ``t`` is ``Σ_{i ∈ batch_t} w_i ℓ_i / |batch_t|``, the attribution of target output
``f_j(θ_T)`` to training example ``i`` is ``∂f_j(θ_T)/∂w_i`` at ``w = 1``: positive when
upweighting the example raises the target's output, as everywhere in datatrace. It is computed
exactly by reverse mode through the whole run: the cotangent of the final state (the gradient of
the targets' outputs) is pulled back through every step with ``torch.func.vjp``, and each step's
pull-back onto its batch's weights is added to their scores.

**Checkpointed replay.** The backward pass needs the state before every step, in reverse order.
``fit`` trains once and keeps the state before every ``segment``-th step (default
``⌈√T⌉``); ``score`` walks the segments from the last to the first, recomputes the states of
each from its checkpoint, and pulls the cotangent back through them. Memory: ``T / segment``
checkpoints plus ``segment`` states of the segment being replayed — ``O(√T)`` states at the
default, against ``O(T)`` for keeping them all. Compute: the replay is one more forward pass
(``segment = 1`` keeps every state and replays nothing: ``O(T)`` memory, no extra forward),
plus the vector-Jacobian products, each about the cost of a Hessian-vector product.

**Targets.** All targets of a chunk of ``target_batch`` share one replay: the cotangents of the
chunk are stacked and each step's ``vjp`` is ``vmap``-ed over them, so the memory of cotangents
grows with the chunk (``target_batch × (parameters + optimiser slots)``) and each further chunk
costs one more replay.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import jacrev, vjp, vmap

from datatrace._arguments import non_negative_integer
from datatrace.attributions import Attributions
from datatrace.data import Examples
from datatrace.methods.training import DeterministicRun, LossFn, TrainingRecipe, TrainState
from datatrace.tasks.base import Task


class Metagradients:
    """Exact metagradients of target outputs with respect to per-example data weights.

    The constructor stores settings; :meth:`fit` trains the model deterministically (the trained
    model is ``model_``) keeping checkpoints for the replay; :meth:`score` returns the
    ``(n_targets, n_train)`` :class:`~datatrace.Attributions` of ``∂ output_j / ∂ w_i``.

    Args:
        model: the network at initialisation (copied, never modified), or a factory
            ``model(seed) -> nn.Module`` called with ``seed``.
        task: the output attributed on targets (e.g. :class:`~datatrace.Classification`'s
            margin); targets' batches are checked by ``task.check_batch``.
        loss: ``loss(model, batch) -> (batch_size,)`` per-example training loss (default:
            cross-entropy of ``(inputs, labels)`` batches).
        optimizer, lr, momentum, weight_decay, betas, eps, schedule, epochs, batch_size, seed:
            the training run (see :class:`~datatrace.methods.training.TrainingRecipe`).
        segment: steps per replay segment (default ``⌈√T⌉``; 1 keeps every state).
        target_batch: targets that share one replay.

    Attributes (after ``fit``):
        model_: the trained model (eval mode).
        run_: the :class:`~datatrace.methods.training.DeterministicRun`.
        checkpoints_: ``{t: state before step t}`` for ``t`` multiple of ``segment_``.
        final_state_: the state after the last step.
        segment_: the segment length in force.
        fit_seconds_: wall time of the training run.
    """

    def __init__(
        self,
        model: nn.Module | Any,
        task: Task,
        *,
        loss: LossFn | None = None,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        schedule: str = "constant",
        epochs: int = 1,
        batch_size: int = 32,
        seed: int = 0,
        segment: int | None = None,
        target_batch: int = 64,
    ):
        self.model = model
        self.task = task
        self.loss = loss
        self.optimizer = optimizer
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.betas = betas
        self.eps = eps
        self.schedule = schedule
        self.epochs = epochs
        self.batch_size = batch_size
        self.seed = seed
        self.segment = segment
        self.target_batch = target_batch

    def recipe(self) -> TrainingRecipe:
        """The training run these settings describe."""
        return TrainingRecipe(
            optimizer=self.optimizer,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            betas=tuple(self.betas),
            eps=self.eps,
            schedule=self.schedule,
            epochs=self.epochs,
            batch_size=self.batch_size,
            seed=self.seed,
        )

    def initial_model(self) -> nn.Module:
        """The network at initialisation: ``model``, or ``model(seed)`` for a factory."""
        if isinstance(self.model, nn.Module):
            return self.model
        if callable(self.model):
            made = self.model(self.seed)
            if not isinstance(made, nn.Module):
                raise TypeError(
                    f"the model factory returned a {type(made).__name__}, not an nn.Module"
                )
            return made
        raise TypeError(
            f"model must be an nn.Module or a factory model(seed) -> nn.Module, got a "
            f"{type(self.model).__name__}"
        )

    def fit(self, train_data: Any) -> Metagradients:
        """Train deterministically on ``train_data``, keeping the replay's checkpoints.

        Args:
            train_data: the training set (``(X, y)`` tensors of ``n_train`` rows, a dict of
                tensors, or a Dataset), in memory.

        Returns:
            ``self``.
        """
        non_negative_integer("seed", self.seed)
        if self.segment is not None and self.segment < 1:
            raise ValueError(f"segment must be at least 1 (or None for ⌈√T⌉), got {self.segment}")
        if self.target_batch < 1:
            raise ValueError(f"target_batch must be at least 1, got {self.target_batch}")
        started = time.perf_counter()
        run = DeterministicRun(self.initial_model(), train_data, self.recipe(), self.loss)
        segment = self.segment or math.ceil(math.sqrt(run.n_steps))
        final, kept = run.run(keep_every=segment)
        self.run_ = run
        self.segment_ = segment
        self.checkpoints_ = kept
        self.final_state_ = final
        self.model_ = run.trained_model(final)
        self.fit_seconds_ = time.perf_counter() - started
        return self

    def score(self, targets: Any) -> Attributions:
        """Metagradients of the task's output on each target.

        Args:
            targets: the target examples (same formats as the training data), ``n_targets``.

        Returns:
            :class:`~datatrace.Attributions` ``(n_targets, n_train)``: entry ``(j, i)`` is
            ``∂ output_j(θ_T) / ∂ w_i`` at ``w = 1`` (float64 for a float64 model).

        Raises:
            NotFittedError: called before :meth:`fit`.
        """
        if not hasattr(self, "run_"):
            from datatrace._estimator import NotFittedError

            raise NotFittedError("this Metagradients is not fitted yet: call fit(train_data) first")
        examples = Examples(targets)
        if examples.n == 0:
            raise ValueError("no targets: the targets hold 0 examples; score needs at least one")
        started = time.perf_counter()
        chunks = [
            self.task.check_batch(self.run_.model, chunk)
            for chunk in examples.batches(0, examples.n, self.target_batch)
        ]
        scores = torch.cat([self._metagradients(chunk) for chunk in chunks])
        seconds = time.perf_counter() - started
        return Attributions(
            scores.numpy(),
            method="metagradients",
            info={
                "recipe": self.recipe().config(),
                "n_steps": self.run_.n_steps,
                "segment": self.segment_,
                "fit_seconds": self.fit_seconds_,
                "score_seconds": seconds,
            },
        )

    def target_outputs(self, targets: Any) -> np.ndarray:
        """``(n_targets,)`` the task's output on ``targets`` under the trained model."""
        examples = Examples(targets)
        batch = self.task.check_batch(self.model_, examples.read(0, examples.n))
        with torch.no_grad():
            return self.task.output(self.model_, batch).numpy()

    def _metagradients(self, targets: Any) -> torch.Tensor:
        """``(n_chunk, n_train)`` metagradients of one chunk of targets (one replay)."""
        run = self.run_
        final = self.final_state_

        def outputs(params: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return run.call(self.task.output, params, targets)

        cotangent_params = jacrev(outputs)(final.params)  # each (n_chunk, *parameter shape)
        n_chunk = cotangent_params[0].shape[0]
        cotangent_slots = tuple(
            tuple(torch.zeros((n_chunk, *slot.shape), dtype=slot.dtype) for slot in slots)
            for slots in final.slots
        )
        scores = torch.zeros(n_chunk, run.n_train, dtype=run.dtype)
        weights = run.full_weights()
        for start in sorted(self.checkpoints_, reverse=True):
            stop = min(start + self.segment_, run.n_steps)
            states = self._replay(start, stop, weights)
            for t in range(stop - 1, start - 1, -1):
                state = states[t - start]
                _, pull_back = vjp(
                    lambda params, slots, batch_weights, t=t: run.step(
                        params, slots, batch_weights, t
                    ),
                    state.params,
                    state.slots,
                    run.batch_weights(weights, t),
                )
                cotangent_params, cotangent_slots, batch_scores = vmap(pull_back)(
                    (cotangent_params, cotangent_slots)
                )
                scores.index_add_(1, torch.as_tensor(run.order[t]), batch_scores.detach())
        return scores

    def _replay(self, start: int, stop: int, weights: torch.Tensor) -> list[TrainState]:
        """The states before steps ``start`` to ``stop - 1``, recomputed from the checkpoint."""
        run = self.run_
        states = [self.checkpoints_[start]]
        for t in range(start, stop - 1):
            states.append(run.run(weights, start=t, stop=t + 1, state=states[-1])[0])
        return states
