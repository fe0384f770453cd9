"""Featurizing: projected per-example gradients and out-to-loss weights, chunk by chunk.

Shared by TRAK and the gradient baselines, so that they all read the same stored features.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from datatrace._arguments import named_device, non_negative_integer, positive_integer
from datatrace.data import Examples, all_finite, batch_to
from datatrace.grads.checkpoints import Checkpoint, load_checkpoint, uncompiled
from datatrace.grads.factorized import PILOT_EXAMPLES, FactorizedProjector, SplitMismatchError
from datatrace.grads.factors import full_precision
from datatrace.grads.heap import steady_heap
from datatrace.grads.memory import (
    ACTIVATION_FACTOR,
    FEATURE_FACTOR,
    PER_EXAMPLE_GRADIENT_FACTOR,
    PRODUCT_FACTOR,
    activation_bytes,
    choose_batch_size,
    default_budget,
)
from datatrace.grads.per_example import PerExampleGradients, task_for_checkpoint
from datatrace.grads.projectors import Projector, derive_seed
from datatrace.grads.selection import ParamSelection, select_parameters
from datatrace.progress import progress_bar
from datatrace.store import CheckpointFeatures, Store, StoreMismatchError
from datatrace.store.provenance import (
    architecture_fingerprint,
    batch_fingerprint,
    example_fingerprints,
    tensors_fingerprint,
)
from datatrace.store.store import partial_gram
from datatrace.tasks._checks import examples_from
from datatrace.tasks.base import Task

# Training examples whose values are hashed into the provenance to recognise the training set
# at once; every example is also hashed into its chunk (example_fingerprints) as it is featurized.
FINGERPRINT_EXAMPLES = 16
# The 16-bit dtypes the forward and backward passes may run in (GradientFeatures' precision).
PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Batch of the pilot pass when batch_size="auto" is not chosen yet (it needs the fitted split).
AUTO_PILOT_BATCH = 8
# Offending examples named in a NonFiniteError (the count is always given).
SHOWN_EXAMPLES = 10


class NonFiniteError(ValueError):
    """Gradients or out-to-loss weights that are NaN or infinite: nothing of them was stored."""


def check_finite(
    features: torch.Tensor, out_to_loss: torch.Tensor, first: int, what: str, where: str
) -> None:
    """Raise :class:`NonFiniteError` naming the examples whose features or ``Q`` are not
    finite; ``first`` is the index of the first row, ``what`` names the examples."""
    if all_finite(features) and all_finite(out_to_loss):
        return
    bad_features = ~torch.isfinite(features).all(dim=1)
    bad = bad_features | ~torch.isfinite(out_to_loss)
    if not bad.any():
        return
    rows = (torch.nonzero(bad).flatten() + first).tolist()
    shown = ", ".join(map(str, rows[:SHOWN_EXAMPLES])) + (
        ", ..." if len(rows) > SHOWN_EXAMPLES else ""
    )
    kinds = []
    if bad_features.any():
        kinds.append("projected gradients")
    if (~torch.isfinite(out_to_loss)).any():
        kinds.append("out-to-loss weights Q")
    raise NonFiniteError(
        f"the {' and '.join(kinds)} of {len(rows)} {what} are NaN or infinite {where}: "
        f"{what} {shown}. The model's output (or loss) is not finite there; nothing of them was "
        "stored. Fix the model or those examples (e.g. an overflow in float16, a log of 0, a "
        "division by zero in the task) and run again: what is already stored is kept."
    )


def default_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def check_training_examples(
    train: Examples, features: CheckpointFeatures, checked: set[int], where: str
) -> None:
    """Refuse a store whose finished chunks were featurized from other training examples.

    Each finished chunk keeps a hash of each of its examples, written when it was featurized.
    The chunks of ``features`` that are finished and not in ``checked`` are read now (read, not
    featurized), hashed and compared; the first example that differs is named. ``checked``
    collects the chunks verified (or featurized) in this run, so each is read at most once.
    Chunks written before these hashes existed are not checked (the provenance's hash of the
    first examples and the training set's size still are).

    Raises:
        StoreMismatchError: an example differs; nothing has been written.
    """
    done = features.completed()
    for chunk in range(features.n_chunks):
        if not done[chunk] or chunk in checked:
            continue
        stored = features.example_hashes(chunk)
        if stored is None:
            continue
        start, stop = features.rows(chunk)
        now = example_fingerprints(train.read(start, stop), stop - start)
        differs = np.flatnonzero(now != stored)
        if differs.size:
            first = start + int(differs[0])
            raise StoreMismatchError(
                f"training example {first} differs from the one featurized into the store at "
                f"{where} ({differs.size} of rows {start}–{stop - 1} differ): this is another "
                "training set (or another order of it). Use a new store location for it, or pass "
                "the training data the store was built from."
            )
        checked.add(chunk)


class GradientFeatures:
    """Projected gradients ``φ = Pᵀ∇_θ f(z; θ_c)`` and weights ``Q(z; θ_c)`` for each checkpoint.

    Args:
        model: the module whose outputs are attributed.
        task: defines ``f`` and ``Q``.
        projector: the random projection (see :mod:`datatrace.grads.projectors`).
        params: which parameters to differentiate (see :data:`ParamSelection`).
        seed: base seed; checkpoint ``c`` is projected with ``derive_seed(seed, "checkpoint", c)``.
        batch_size: examples per batch, or ``"auto"``: the largest batch whose estimated memory
            fits ``memory_budget`` (:mod:`datatrace.grads.memory`), chosen on the first examples
            featurized (:meth:`resolve_batch_size`).
        chunk_rows: training examples per stored chunk (the unit of resumption).
        device: where gradients are computed; defaults to the model's device.
        progress: show progress bars.
        memory_budget: bytes that ``batch_size="auto"`` sizes a batch to (default: half the
            free memory of a CUDA device; on the CPU a quarter of the free RAM, at most 4 GiB).
        precision: ``None`` (the model's own dtype), ``"bfloat16"`` or ``"float16"``: the
            forward and backward passes run under ``torch.autocast`` in that dtype, and the
            projections, features and kernel stay in float32/float64. Recorded in the store's
            provenance (a store is featurized in one precision). ``"float16"``'s narrow range
            can overflow or flush small gradients to zero (no loss scaling is applied: the
            attributed output, not a loss, is differentiated); ``"bfloat16"`` has float32's.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        projector: Projector,
        params: ParamSelection = None,
        seed: int = 0,
        batch_size: int = 32,
        chunk_rows: int = 512,
        device: torch.device | str | None = None,
        progress: bool = True,
        memory_budget: int | None = None,
        precision: str | None = None,
    ):
        if batch_size != "auto":
            batch_size = positive_integer("batch_size", batch_size, " or 'auto'")
        chunk_rows = positive_integer("chunk_size", chunk_rows)
        if memory_budget is not None and not memory_budget > 0:
            raise ValueError(f"memory_budget must be a positive byte count, got {memory_budget}")
        model = uncompiled(model)
        self.model = model
        self.task = task
        self.projector = projector
        self.params = params
        self.seed = non_negative_integer("seed", seed)
        self._batch_size = None if batch_size == "auto" else batch_size
        self.memory_budget = memory_budget
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision must be None, 'bfloat16' or 'float16', got {precision!r}")
        self.precision = precision
        self.chunk_rows = chunk_rows
        self.device = named_device(device) if device is not None else default_device(model)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"device {str(self.device)!r} was asked for, but this torch sees no CUDA device "
                f"(torch {torch.__version__}, built with CUDA: {torch.version.cuda or 'no'}): "
                "pass device='cpu', or install a CUDA build of torch on a machine with a GPU"
            )
        self.progress = progress
        self.param_names = select_parameters(model, params)
        self._gradients = PerExampleGradients(model, task, self.param_names)
        # (checkpoint, state, gradients) of the checkpoint last prepared (see gradients_for).
        self._prepared: tuple[int, dict, PerExampleGradients] | None = None
        named = dict(model.named_parameters())
        self.sizes = [named[name].numel() for name in self.param_names]
        if not isinstance(projector, FactorizedProjector):
            projector.check_sizes(self.sizes)

    @property
    def batch_size(self) -> int:
        """Examples per batch (``"auto"``: once :meth:`resolve_batch_size` has chosen it)."""
        if self._batch_size is None:
            raise RuntimeError(
                "batch_size='auto' is chosen on the first examples featurized: call "
                "resolve_batch_size(examples, checkpoint) (fit and score do) first"
            )
        return self._batch_size

    def resolve_batch_size(self, examples: Examples, checkpoint: Checkpoint) -> int:
        """Choose ``batch_size="auto"`` (nothing to do for a number) from probes of the first
        two of ``examples`` under ``checkpoint`` and the memory budget
        (:mod:`datatrace.grads.memory`); returns the batch size."""
        if self._batch_size is not None:
            return self._batch_size
        state = self.load(checkpoint)
        with examples_from(0):
            probe = self._checked_batch(examples.read(0, min(examples.n, 2)))
        task = self.gradients_for(state, 0).task
        fixed, per_example = activation_bytes(self.model, task, self.param_names, state, probe)
        per_example *= ACTIVATION_FACTOR
        itemsize = next(iter(state.values())).element_size() if state else 4
        named = dict(self.model.named_parameters())
        if isinstance(self.projector, FactorizedProjector):
            plan = self.projector.plan(self.model, self.param_names)
            vmap_names = [n for b in plan.blocks if b.name in plan.moved for n in b.params]
            vmap_names += plan.vmap_names()
            products = sum(
                b.k_rows * b.k_cols for b in plan.blocks if b.sparse_jl and b.name not in plan.moved
            )
            per_example += PRODUCT_FACTOR * products * itemsize
        else:
            vmap_names = self.param_names
        vmap_size = sum(named[name].numel() for name in vmap_names)
        per_example += PER_EXAMPLE_GRADIENT_FACTOR * vmap_size * itemsize
        per_example += FEATURE_FACTOR * self.dim * 4
        fixed += sum(t.numel() * t.element_size() for t in state.values())
        budget = self.memory_budget or default_budget(self.device)
        self._batch_size = choose_batch_size(fixed, per_example, budget, examples.n)
        self.batch_estimate_ = {
            "budget": int(budget),
            "fixed": int(fixed),
            "per_example": int(per_example),
            "batch_size": self._batch_size,
        }
        self._prepared = None
        return self._batch_size

    @property
    def dim(self) -> int:
        """The number of features ``k`` (a factorized projector's plan: its split must be
        fitted, see :meth:`fit_split`)."""
        if isinstance(self.projector, FactorizedProjector):
            return self.projector.plan(self.model, self.param_names).output_dim
        return self.projector.output_dim(self.sizes)

    def _dim_or_none(self) -> int | None:
        """:attr:`dim`, or ``None`` where a split adopted from a store serves other parameters
        (the provenance then differs in ``params`` and is refused as such)."""
        try:
            return self.dim
        except SplitMismatchError:
            return None

    def fit_split(
        self,
        train: Examples,
        checkpoint: Checkpoint,
        index: int = 0,
        recorded: dict[str, Any] | None = None,
    ) -> None:
        """Fit a :class:`~datatrace.grads.factorized.FactorizedProjector`'s ``"gradient"``
        split if it is not set (nothing to do for other projectors): adopt the one recorded in
        ``recorded`` (a store's provenance) if it was made with the same projector settings,
        else measure it by a pilot pass over the first ``min(n, PILOT_EXAMPLES)`` examples of
        ``train`` under ``checkpoint`` (index ``index``, whose seed projects them). Then
        choose ``batch_size="auto"`` (:meth:`resolve_batch_size`)."""
        projector = self.projector
        if isinstance(projector, FactorizedProjector) and not projector.split_fitted:
            if not self._adopt_split(recorded):
                self._pilot(train, checkpoint, index)
        self.resolve_batch_size(train, checkpoint)

    def _adopt_split(self, recorded: dict[str, Any] | None) -> bool:
        projector = self.projector
        if recorded is None or not projector.adopt_split(recorded.get("projector")):
            return False
        try:
            projector.plan(self.model, self.param_names)
            return True
        except SplitMismatchError:  # recorded for other parameters: the provenance refuses
            projector.reset_split()
            return False

    def _pilot(self, train: Examples, checkpoint: Checkpoint, index: int) -> None:
        state = self.load(checkpoint)
        count = min(train.n, PILOT_EXAMPLES)
        step = self._batch_size or AUTO_PILOT_BATCH  # "auto" is chosen after the split

        def batches():
            for lo in range(0, count, step):
                with examples_from(lo):
                    batch = self._checked_batch(train.read(lo, min(lo + step, count)))
                yield batch

        task = self.gradients_for(state, index).task
        self.projector.fit_split(
            self.model, task, self.param_names, state, batches(), self.projection_seed(index)
        )
        self._prepared = None  # let the pilot's checkpoint go

    def _checked_batch(self, batch: Any) -> Any:
        # Outside vmap, where bad labels and dtypes can still be named (Task.check_batch).
        return batch_to(self.task.check_batch(self.model, batch), self.device)

    def projection_seed(self, checkpoint: int) -> int:
        return derive_seed(self.seed, "checkpoint", checkpoint)

    def load(self, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        return load_checkpoint(checkpoint, self.model, self.device)

    def provenance(self, train: Examples) -> dict[str, Any]:
        return {
            "model": architecture_fingerprint(self.model),
            "params": {
                "count": len(self.param_names),
                "size": int(sum(self.sizes)),
                "names": batch_fingerprint(self.param_names),
            },
            "task": self.task.config(),
            "projector": self.projector.config(),
            "feature_dim": self._dim_or_none(),
            "seed": self.seed,
            "n_train": train.n,
            "train_data": batch_fingerprint(train.read(0, min(train.n, FINGERPRINT_EXAMPLES))),
            "chunk_rows": self.chunk_rows,
        } | ({"precision": self.precision} if self.precision is not None else {})

    def gradients_for(self, state: dict[str, torch.Tensor], checkpoint: int) -> PerExampleGradients:
        """The gradient computation under checkpoint ``checkpoint`` (whose parameters and buffers
        are ``state``), with the task that ``Task.for_checkpoint`` gives for it. The last one is
        kept, so that the task is prepared once per checkpoint, not once per batch."""
        cached = self._prepared
        if cached is not None and cached[0] == checkpoint and cached[1] is state:
            return cached[2]
        task = task_for_checkpoint(self.model, self.task, state, checkpoint)
        gradients = (
            self._gradients
            if task is self.task
            else PerExampleGradients(self.model, task, self.param_names)
        )
        self._prepared = (checkpoint, state, gradients)
        return gradients

    def featurize(
        self, state: dict[str, torch.Tensor], batch: Any, checkpoint: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``(batch_size, k)`` and out-to-loss weights ``(batch_size,)`` of one batch,
        on the CPU in float32. The batch is checked first (``Task.check_batch``). A
        :class:`~datatrace.grads.factorized.FactorizedProjector` computes the features from the
        model and the batch directly, without per-example gradients, and ``Q`` from the same
        forward pass where the task allows it (``Task.output_and_out_to_loss``)."""
        gradients = self.gradients_for(state, checkpoint)
        batch = self._checked_batch(batch)
        seed = self.projection_seed(checkpoint)
        out_to_loss = None
        with self._forward_precision():
            if isinstance(self.projector, FactorizedProjector):
                features, out_to_loss = self.projector.features_and_out_to_loss(
                    self.model, gradients.task, self.param_names, state, batch, seed
                )
            else:
                grads = gradients.gradients(state, batch)
            if out_to_loss is None:
                out_to_loss = gradients.out_to_loss(state, batch)
        if not isinstance(self.projector, FactorizedProjector):
            grads = [full_precision(grads[name]) for name in self.param_names]
            features = self.projector.project(grads, seed)
        return features.float().cpu(), out_to_loss.float().cpu()

    def _forward_precision(self):
        """Autocast to ``precision`` for the forward and backward passes (not the projections:
        :mod:`datatrace.grads.factorized` turns it off for them)."""
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def featurize_all(
        self, data: Any, checkpoint: Checkpoint, index: int, description: str = "featurizing"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and weights of all of ``data`` under checkpoint ``index``, in memory (a
        factorized projector's split, if not fitted, is fitted on ``data``: :meth:`fit_split`)."""
        steady_heap()
        examples = Examples(data)
        self.fit_split(examples, checkpoint, index)
        state = self.load(checkpoint)
        features, weights = [], []
        with progress_bar(examples.n, description, self.progress) as advance:
            for lo in range(0, examples.n, self.batch_size):
                hi = min(lo + self.batch_size, examples.n)
                with examples_from(lo):
                    batch_features, batch_weights = self.featurize(
                        state, examples.read(lo, hi), index
                    )
                check_finite(
                    batch_features, batch_weights, lo, "examples", f"under checkpoint {index}"
                )
                features.append(batch_features)
                weights.append(batch_weights)
                advance(hi - lo)
        self._prepared = None  # let the checkpoint's tensors go
        return torch.cat(features), torch.cat(weights)

    def featurize_train(
        self,
        data: Any,
        checkpoints: Sequence[Checkpoint],
        store: Store,
        shard: tuple[int, int] | None = None,
        backend: Any = None,
        **run_options: Any,
    ) -> list[CheckpointFeatures]:
        """Featurize the training set under every checkpoint into ``store``, resuming what is done.

        A factorized projector's ``"gradient"`` split, if not set, is the one the store records
        when its other settings are the same (so shards and resumed fits use one map), else it
        is measured on the first training examples under the first checkpoint
        (:meth:`fit_split`) and recorded with the provenance. Shards that start on an empty store
        at the same moment each measure it, from the same examples, checkpoint and seed, so they
        record one split (a shard on other hardware whose rounding differed would be refused).

        Each row chunk is written with its features, weights, example hashes and (when
        ``k ≤ n``) its partial Gram ``Φ_chunkᵀΦ_chunk`` in float64 (see
        :mod:`datatrace.store.store`).

        Args:
            data: the training set.
            checkpoints: one per model in the ensemble.
            store: where features go; its provenance is checked first.
            shard: ``(index, count)`` to compute only the row chunks ``≡ index (mod count)``, so
                that ``count`` processes can share the work on one store.
            backend: ``None`` computes in this process; a
                :class:`~datatrace.subsets.LocalBackend`, :class:`~datatrace.subsets.RayBackend`
                or their name spreads the row chunks × checkpoints over its workers, with claims
                so that several drivers can share one store and a dead one's chunks are taken
                over (:func:`datatrace.grads.distributed.featurize_chunks`).
            **run_options: ``lease_s``, ``poll_s`` of
                :func:`~datatrace.grads.distributed.featurize_chunks` (with a backend).

        Returns:
            The stored features of each checkpoint.
        """
        # Imported here: distributed builds on this module (GradientFeatures, featurize_chunk).
        from datatrace.grads.distributed import featurize_chunks

        if shard is not None and not (0 <= shard[0] < shard[1]):
            raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
        train = Examples(data)
        steady_heap()
        stored = self.open_train_features(train, checkpoints, store)
        jobs = [
            (index, chunk) for index, part in enumerate(stored) for chunk in part.pending(shard)
        ]
        featurize_chunks(self, train, 0, checkpoints, stored, jobs, store, backend, **run_options)
        return stored

    def open_train_features(
        self, train: Examples, checkpoints: Sequence[Checkpoint], store: Store
    ) -> list[CheckpointFeatures]:
        """The stored features of each checkpoint, created on first use, after checking the
        provenance, each checkpoint's identity and the training examples of finished chunks
        (:func:`check_training_examples`)."""
        if checkpoints:
            self.fit_split(train, checkpoints[0], 0, store.provenance("features"))
        recorded = store.check_provenance("features", self.provenance(train), adopt=["chunk_rows"])
        chunk_rows = recorded["chunk_rows"]
        stored, checked = [], set()
        for index, checkpoint in enumerate(checkpoints):
            identity = {
                "checkpoint": tensors_fingerprint(self.load(checkpoint)),
                "projection_seed": self.projection_seed(index),
            }
            features = store.checkpoint_features(index, train.n, self.dim, chunk_rows, identity)
            check_training_examples(train, features, checked, store.where)
            stored.append(features)
        return stored


@dataclass(frozen=True)
class ChunkResult:
    """What featurizing one row chunk under one checkpoint gives, ready to be written.

    Attributes:
        features: ``(rows, k)`` float32 projected gradients.
        out_to_loss: ``(rows,)`` float32 weights ``Q``.
        example_hashes: ``(rows,)`` uint64 hash of each example.
        partial_gram: ``(k, k)`` float64 ``featuresᵀfeatures``, or ``None`` (dual case).
    """

    features: np.ndarray
    out_to_loss: np.ndarray
    example_hashes: np.ndarray
    partial_gram: np.ndarray | None


def featurize_chunk(
    features: GradientFeatures,
    state: dict[str, torch.Tensor],
    checkpoint: int,
    batches: Sequence[tuple[int, int, Any]],
    with_gram: bool,
) -> ChunkResult:
    """Featurize one row chunk under checkpoint ``checkpoint`` (whose tensors are ``state``).

    Args:
        features: the gradient features.
        state: the checkpoint's parameters and buffers (:meth:`GradientFeatures.load`).
        checkpoint: the checkpoint's index (its projection seed).
        batches: ``(first, past_last, batch)`` of each batch of the chunk, in order; the rows
            name the examples in error messages.
        with_gram: also compute the partial Gram (:func:`~datatrace.store.store.partial_gram`).

    Raises:
        NonFiniteError: a feature or weight is NaN or infinite (nothing is returned to store).
    """
    parts = []
    for lo, _, batch in batches:
        with examples_from(lo):
            parts.append(features.featurize(state, batch, checkpoint))
    chunk_features = torch.cat([part[0] for part in parts])
    chunk_weights = torch.cat([part[1] for part in parts])
    first = batches[0][0] if batches else 0
    check_finite(
        chunk_features, chunk_weights, first, "training examples", f"under checkpoint {checkpoint}"
    )
    hashes = np.concatenate([example_fingerprints(batch, hi - lo) for lo, hi, batch in batches])
    chunk_features = chunk_features.numpy()
    return ChunkResult(
        chunk_features,
        chunk_weights.numpy(),
        hashes,
        partial_gram(chunk_features) if with_gram else None,
    )
