"""Influence functions: ``g_targetᵀ (H + λI)⁻¹ g_train`` with a Kronecker-factored (K-FAC,
EK-FAC), diagonal or identity curvature, ensembled over checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from datatrace._arguments import named_device, non_negative_integer, positive_integer, real_number
from datatrace._estimator import check_fitted, checked_examples, checkpoint_list
from datatrace.attributions import Attributions
from datatrace.data import Examples, batch_to
from datatrace.grads.checkpoints import Checkpoint, load_checkpoint, uncompiled
from datatrace.grads.featurize import FINGERPRINT_EXAMPLES, default_device
from datatrace.grads.per_example import task_for_checkpoint
from datatrace.grads.selection import ParamSelection, select_parameters
from datatrace.methods.influence.curvature import (
    DEFAULT_DAMPING,
    HESSIANS,
    Curvature,
    fit_stages,
)
from datatrace.methods.influence.fisher import FISHERS, SampledLabels
from datatrace.methods.influence.gradients import (
    CHECK_EXAMPLES,
    GRADIENTS,
    MEASUREMENTS,
    LayoutGradients,
    hooked_layers,
    rotation_by_factors_is_cheaper,
)
from datatrace.methods.influence.layers import Layout, kronecker_layout
from datatrace.methods.influence.refine import refined_inverse_products
from datatrace.methods.influence.stages import SECTION, CurvatureStages
from datatrace.progress import progress_bar
from datatrace.store import Store
from datatrace.store.provenance import (
    architecture_fingerprint,
    batch_fingerprint,
    tensors_fingerprint,
)
from datatrace.tasks.base import Task

# What the stored Kronecker factors count (recorded in the provenance): 2, every call of every
# module holding a weight (before, a weight held by several modules counted its first holder's).
FACTORS_VERSION = 2


class InfluenceFunctions:
    """Influence functions (Koh & Liang 2017) with an EK-FAC, K-FAC, diagonal or identity
    Hessian (Grosse et al. 2023, George et al. 2018), for any differentiable model.

    For each checkpoint, the curvature ``H`` is the Fisher of the training loss
    ``(1/n) Σ_i ∇loss_i ∇loss_iᵀ`` (empirical: training labels; or with sampled labels),
    approximated block by block (:mod:`datatrace.methods.influence.curvature`): per
    ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layer by Kronecker factors (``"kfac"``) and their
    eigenvalue correction (``"ekfac"``), every other selected parameter by its diagonal. The
    score of training example ``i`` for target ``j`` is::

        τ_ji = mean_c  m_jᵀ (H_c + λ I)⁻¹ ∇loss_i

    with ``∇loss_i = −Q_i ∇f_i`` (the training loss's gradient, ``Q`` the task's out-to-loss
    weight) and ``m_j`` the target's *measurement* gradient: ``∇loss_j`` (``measurement="loss"``,
    kronfluence's default) or ``−∇f_j`` (``measurement="output"``). A positive score means that
    upweighting example ``i`` lowers target ``j``'s loss (raises its output): a proponent, as in
    every datatrace score. Scores are not divided by ``n`` (as kronfluence's and TRAK's).

    The training gradients are recomputed at every :meth:`score` (one pass over the training
    set per call, whatever the number of targets, streamed batch by batch: only the
    ``(n_targets, p)`` preconditioned target gradients are held). The Kronecker layers'
    per-example gradients ``Σ_t g_t a_tᵀ`` come from forward and backward hooks on one batched
    pass (:mod:`datatrace.methods.influence.hooks`), in K-FAC's or EK-FAC's eigenbasis straight
    from the rotated factors; every other parameter's from ``torch.func`` ``vmap``.

    Args:
        model: the module; it is never modified (checkpoints are swapped in functionally).
        task: the output and out-to-loss weight (e.g. :class:`~datatrace.tasks.Classification`).
        hessian: ``"ekfac"`` (default), ``"kfac"``, ``"diagonal"`` (diagonal empirical Fisher)
            or ``"identity"`` (gradient dot products, no damping).
        damping: relative damping: per block ``λ = damping · mean eigenvalue`` (default 0.1,
            kronfluence's heuristic).
        damping_absolute: if given, the absolute ``λ`` of every block (overrides ``damping``).
        measurement: ``"loss"`` (default) or ``"output"``: what the targets' gradient is of.
        fisher: ``"empirical"`` (default: the curvature's gradients use the training labels;
            every task) or ``"sampled"`` (labels drawn from the model's softmax, the "true"
            Fisher of kronfluence's default; :class:`~datatrace.tasks.Classification`, and
            :class:`~datatrace.tasks.Regression` with targets ``ŷ + N(0, 1)``,
            :mod:`datatrace.methods.influence.fisher`). The scored training gradients always use the
            training labels.
        seed: seed of the sampled labels (``fisher="sampled"``).
        refine_steps: preconditioned conjugate-gradient steps refining each target's
            ``(H + λI)⁻¹ m`` towards the exact damped inverse of the empirical Fisher, with the
            chosen Hessian as preconditioner (ASTRA's idea,
            :mod:`datatrace.methods.influence.refine`);
            each costs one more pass over the training set per :meth:`score`. Default 0.
        params: parameters to differentiate: name patterns or submodules (default: all).
        store: where the fitted curvature is kept: a directory (resumable stage by stage), an
            fsspec URL, a :class:`~datatrace.store.Store`, or ``None`` for memory.
        batch_size: examples per gradient batch.
        gradients: ``"hooks"`` (default): the Kronecker layers' per-example gradients from
            layer hooks, each layer first checked against vmap on a few examples (one that
            differs, e.g. a weight also used through a functional call, keeps vmap, with a
            :class:`~datatrace.methods.influence.gradients.HookWarning`); ``"vmap"``: every
            parameter's with ``torch.func`` ``vmap(grad)`` (slower; same scores to rounding).
        device: where gradients are computed (default: the model's device).
        progress: show progress bars.

    Attributes (after ``fit``):
        store_: the :class:`~datatrace.store.Store` holding the curvature.
        n_train_: number of training examples.
        layout_: the curvature blocks (:class:`~datatrace.methods.influence.layers.Layout`).
        layers_: names of the modules with a Kronecker block.
        fallback_params_: names of the parameters with a diagonal block.
        hooked_layers_: names of the Kronecker layers whose gradients come from hooks.
        vmap_params_: names of the parameters whose gradients come from vmap (the fallback
            parameters, and those of the layers not in ``hooked_layers_``).
        curvatures_: per checkpoint, the :class:`~datatrace.methods.influence.curvature.Curvature`.
        damping_: ``(n_checkpoints, n_blocks)`` the absolute ``λ`` of each block.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        *,
        hessian: str = "ekfac",
        damping: float = DEFAULT_DAMPING,
        damping_absolute: float | None = None,
        measurement: str = "loss",
        fisher: str = "empirical",
        seed: int = 0,
        refine_steps: int = 0,
        params: ParamSelection = None,
        store: str | Path | Store | None = None,
        batch_size: int = 32,
        gradients: str = "hooks",
        device: torch.device | str | None = None,
        progress: bool = True,
    ):
        self.model = uncompiled(model)
        self.task = task
        self.hessian = hessian
        self.damping = damping
        self.damping_absolute = damping_absolute
        self.measurement = measurement
        self.fisher = fisher
        self.seed = seed
        self.refine_steps = refine_steps
        self.params = params
        self.store = store
        self.batch_size = batch_size
        self.gradients = gradients
        self.device = device
        self.progress = progress

    def fit(
        self,
        train_data: Any,
        checkpoints: Sequence[Checkpoint] | Checkpoint | None = None,
    ) -> InfluenceFunctions:
        """Fit the curvature of every checkpoint, resuming what the store already holds.

        Stages, each written when done (a crash loses at most the one in flight): Kronecker
        factors (one pass), their eigendecomposition, then EK-FAC's corrected eigenvalues with
        the diagonal Fisher (one pass of per-example gradients). ``"kfac"`` skips the last pass
        unless some parameter is outside a Kronecker layer, ``"diagonal"`` needs only it, and
        ``"identity"`` none.

        Args:
            train_data: training examples (Dataset, ordered DataLoader, tuple or dict of tensors);
                kept (not copied) for :meth:`score`, which reads it again.
            checkpoints: state dicts, modules or file paths; ``None`` for the model as it is.

        Returns:
            ``self``.

        Raises:
            ValueError: an unknown ``hessian``, ``measurement`` or ``fisher`` (or
                ``fisher="sampled"`` with a task other than Classification), a negative
                damping, a bad ``refine_steps`` or ``batch_size``, an empty training set or a
                malformed first batch (before anything is stored).
            StoreMismatchError: the store holds the curvature of another model, task, parameter
                selection, training set or checkpoint.
        """
        self._check_settings()
        sampled = (
            SampledLabels(self.model, self.task, self.seed) if self.fisher == "sampled" else None
        )
        train = checked_examples(train_data, "train", self.task, self.model, self.batch_size)
        checkpoints = checkpoint_list(self.model, checkpoints)
        param_names = select_parameters(self.model, self.params)
        layout = kronecker_layout(self.model, param_names)
        device = named_device(self.device) if self.device else default_device(self.model)
        store = self.store if isinstance(self.store, Store) else Store(self.store)
        store.check_provenance(SECTION, self._provenance(train, param_names, layout))
        curvatures, hooked, rotated = [], [], []
        for index, checkpoint in enumerate(checkpoints):
            state = load_checkpoint(checkpoint, self.model, device)
            task = task_for_checkpoint(self.model, self.task, state, index)
            if index == 0:
                hooked, rotated = self._hooked(task, layout, param_names, device, state, train)
            gradients = LayoutGradients(
                self.model, task, layout, param_names, device, sampled, index, hooked
            )
            stages = CurvatureStages(store, index, {"checkpoint": tensors_fingerprint(state)})
            fitted = fit_stages(
                self.hessian,
                stages,
                self.model,
                gradients,
                state,
                train,
                self.batch_size,
                self.progress,
            )
            curvatures.append(
                Curvature(
                    layout, self.hessian, fitted, self.damping, self.damping_absolute, rotated
                )
            )
        self.store_ = store
        self.sampled_labels_ = sampled
        self.train_ = train
        self.checkpoints_ = checkpoints
        self.param_names_ = param_names
        self.device_ = device
        self.n_train_ = train.n
        self.layout_ = layout
        self.layers_ = [layer.name for layer in layout.layers]
        self.fallback_params_ = list(layout.fallback)
        self.hooked_ = hooked
        self.hooked_layers_ = [layout.layers[i].name for i in hooked]
        self.vmap_params_ = [
            name
            for i, layer in enumerate(layout.layers)
            if i not in hooked
            for name in (layer.weight, layer.bias)
            if name is not None
        ] + list(layout.fallback)
        self.curvatures_ = curvatures
        self.damping_ = np.stack([curvature.damping for curvature in curvatures])
        return self

    def _check_settings(self) -> None:
        if self.hessian not in HESSIANS:
            raise ValueError(f"hessian must be one of {HESSIANS}, got {self.hessian!r}")
        if self.fisher not in FISHERS:
            raise ValueError(
                f"fisher must be one of {FISHERS} (training labels, or labels sampled from the "
                f"model), got {self.fisher!r}"
            )
        if self.measurement not in MEASUREMENTS:
            raise ValueError(
                f"measurement must be one of {MEASUREMENTS} (what a target's gradient is of), "
                f"got {self.measurement!r}"
            )
        real_number("damping", self.damping, note=" (relative to each block's mean eigenvalue)")
        if self.damping_absolute is not None:
            real_number("damping_absolute", self.damping_absolute)
        if not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise ValueError(
                f"refine_steps must be a non-negative integer, got {self.refine_steps!r}"
            )
        if self.refine_steps and self.hessian == "identity":
            raise ValueError(
                "refine_steps needs a preconditioner: use hessian='ekfac', 'kfac' or "
                "'diagonal' with it (the identity has no curvature to refine)"
            )
        positive_integer("batch_size", self.batch_size)
        non_negative_integer("seed", self.seed)
        if self.gradients not in GRADIENTS:
            raise ValueError(
                f"gradients must be one of {GRADIENTS} (layer hooks where they apply, or vmap "
                f"for every parameter), got {self.gradients!r}"
            )

    def _hooked(
        self,
        task: Task,
        layout: Layout,
        param_names: list[str],
        device: torch.device,
        state: dict,
        examples: Examples,
        among: list[int] | None = None,
    ) -> tuple[list[int], list[int]]:
        """The layers (of ``among``, default all) whose hooked gradients pass the check on the
        first examples (none for ``gradients="vmap"``), and those of them whose gradients are
        best formed in the eigenbasis (:func:`rotation_by_factors_is_cheaper`)."""
        if self.gradients == "vmap" or not layout.layers:
            return [], []
        batch = examples.read(0, min(examples.n, CHECK_EXAMPLES))
        batch = batch_to(task.check_batch(self.model, batch), device)
        passed, _, positions = hooked_layers(self.model, task, layout, param_names, state, batch)
        if among is not None:
            passed = [index for index in passed if index in among]
        rotated = [
            index
            for index in passed
            if rotation_by_factors_is_cheaper(
                layout.layers[index].out_dim, layout.layers[index].in_dim, positions[index]
            )
        ]
        return passed, rotated

    def _provenance(self, train: Examples, param_names: list[str], layout: Layout) -> dict:
        return {
            "model": architecture_fingerprint(self.model),
            "params": batch_fingerprint(param_names),
            "layout": layout.config(),
            "factors": FACTORS_VERSION,  # an older store's factors are refused, not mixed in
            "task": self.task.config(),
            "fisher": self.fisher if self.fisher == "empirical" else [self.fisher, self.seed],
            "n_train": train.n,
            "train_data": batch_fingerprint(train.read(0, min(train.n, FINGERPRINT_EXAMPLES))),
        }

    def score(
        self,
        targets: Any,
        *,
        task: Task | None = None,
        name: str | None = None,
    ) -> Attributions:
        """Attribute each target to the training examples.

        Per checkpoint: the targets' measurement gradients are preconditioned, ``(n_targets,
        p)``, then multiplied by the training-loss gradients of each training batch as it is
        computed (one pass over the training set).

        Args:
            targets: target examples, in any form accepted for training data.
            task: another task for the targets only (e.g. :class:`~datatrace.tasks.ClassLogit`);
                default: the task the estimator was fitted with.
            name: if given, also save the result in the store under ``scores/<name>``.

        Returns:
            :class:`~datatrace.Attributions` with ``scores`` of shape ``(n_targets, n_train)``
            (float64 for a float64 model, else float32), and ``out_to_loss`` the training
            examples' mean ``Q`` over checkpoints (it multiplies their loss gradients, so that
            reports can show when a tiny ``Q`` dominates).

        Raises:
            NotFittedError: called before :meth:`fit`.
            ValueError, TypeError: no targets, or their first batch is malformed.
        """
        check_fitted(self, "curvatures_")
        target_task = self.task if task is None else task
        targets = checked_examples(targets, "targets", target_task, self.model, self.batch_size)
        total, total_out_to_loss = 0.0, 0.0
        count = len(self.checkpoints_)
        for index, checkpoint in enumerate(self.checkpoints_):
            state = load_checkpoint(checkpoint, self.model, self.device_)
            scores, out_to_loss = self._score_checkpoint(index, state, targets, target_task, count)
            total, total_out_to_loss = total + scores, total_out_to_loss + out_to_loss
        dtype = np.float64 if _model_dtype(self.model) == torch.float64 else np.float32
        attributions = Attributions(
            (total / count).astype(dtype),
            "InfluenceFunctions",
            (total_out_to_loss / count).astype(dtype),
            self._info(),
        )
        if name is not None:
            self.store_.save_attributions(name, attributions)
        return attributions

    def _score_checkpoint(
        self, index: int, state: dict, targets: Examples, target_task: Task, count: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(n_targets, n_train)`` float64 scores under checkpoint ``index``, and the training
        examples' ``Q`` ``(n_train,)`` (a factor of their loss gradients)."""
        curvature = self.curvatures_[index]
        bases = curvature.gradient_bases
        train_task = task_for_checkpoint(self.model, self.task, state, index)
        target_hooked = self.hooked_
        if target_task is self.task:
            target_task = train_task
        else:
            target_task = task_for_checkpoint(self.model, target_task, state, index)
            target_hooked, _ = self._hooked(
                target_task, self.layout_, self.param_names_, self.device_, state, targets,
                self.hooked_,
            )  # fmt: skip
        train_gradients = LayoutGradients(
            self.model,
            train_task,
            self.layout_,
            self.param_names_,
            self.device_,
            self.sampled_labels_,
            index,
            self.hooked_,
            bases,
        )
        target_gradients = LayoutGradients(
            self.model,
            target_task,
            self.layout_,
            self.param_names_,
            self.device_,
            hooked=target_hooked,
            bases=bases,
        )
        # m_j: the gradient of what a proponent lowers (the loss, or minus the output)
        sign = 1.0 if self.measurement == "loss" else -1.0
        measured = []
        where = f"checkpoint {index + 1}/{count}"
        with progress_bar(targets.n, f"targets, {where}", self.progress) as advance:
            for batch in targets.batches(0, targets.n, self.batch_size):
                batch = target_gradients.prepare(batch)
                gradients = target_gradients.gradients(state, batch, self.measurement)
                measured.append(sign * gradients.double())
                advance(gradients.shape[0])
        preconditioned = refined_inverse_products(
            curvature,
            torch.cat(measured),
            self.refine_steps,
            train_gradients,
            state,
            self.train_,
            self.batch_size,
            self.progress,
        )
        scores = np.empty((targets.n, self.n_train_), dtype=np.float64)
        out_to_loss = np.empty(self.n_train_, dtype=np.float64)
        start = 0
        with progress_bar(self.n_train_, f"training gradients, {where}", self.progress) as advance:
            for batch in self.train_.batches(0, self.n_train_, self.batch_size):
                batch = train_gradients.prepare(batch)
                train, weights = train_gradients.gradients_and_out_to_loss(state, batch, "loss")
                stop = start + train.shape[0]
                scores[:, start:stop] = (preconditioned @ train.double().T).cpu().numpy()
                out_to_loss[start:stop] = weights.double().cpu().numpy()
                start = stop
                advance(train.shape[0])
        return scores, out_to_loss

    def _info(self) -> dict[str, Any]:
        return {
            "hessian": self.hessian,
            "fisher": self.fisher,
            "measurement": self.measurement,
            "refine_steps": self.refine_steps,
            "damping": None if self.damping_absolute is not None else self.damping,
            "damping_absolute": self.damping_.tolist(),
            "layers": self.layers_,
            "fallback_params": self.fallback_params_,
            "gradients": self.gradients,
            "hooked_layers": self.hooked_layers_,
            "n_checkpoints": len(self.checkpoints_),
            "n_params": self.layout_.dim,
        }


def _model_dtype(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        return param.dtype
    return torch.float32
