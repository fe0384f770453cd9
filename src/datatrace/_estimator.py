"""Pieces shared by the estimators: the fitted-state check, checkpoint lists, feature settings,
the checks of data before anything is stored, and reopening a fitted store."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datatrace.data import Examples
from datatrace.grads.checkpoints import Checkpoint
from datatrace.grads.featurize import FINGERPRINT_EXAMPLES, GradientFeatures
from datatrace.grads.projectors import (
    DenseProjector,
    IdentityProjector,
    Projector,
    SparseJLProjector,
    make_projector,
)
from datatrace.store import CheckpointFeatures, Store, StoreMismatchError
from datatrace.store.provenance import json_normalise, tensors_fingerprint
from datatrace.store.store import ZARR_METADATA
from datatrace.tasks._checks import examples_from
from datatrace.tasks.base import Task

# The keys of the features' provenance that describe the model and the method (the others
# describe the training data and the layout), with what to do when one differs on reopening.
REOPEN_CHECKS = {
    "model": "another model architecture: pass the model the store was fitted with",
    "params": "another parameter selection: pass the params= the store was fitted with",
    "task": "another task or task settings: pass the task the store was fitted with",
    "projector": "another projector: leave projector= and proj_dim= out to use the stored one",
    "feature_dim": "another feature dimension",
    "seed": "another projection seed: leave seed= out to use the stored one",
}


class NotFittedError(RuntimeError):
    """A method that needs fitted state was called before ``fit``."""


def check_fitted(estimator: object, attribute: str) -> None:
    if not hasattr(estimator, attribute):
        raise NotFittedError(
            f"this {type(estimator).__name__} is not fitted yet: call fit(train_data, "
            "checkpoints) first"
        )


def checkpoint_list(
    model: nn.Module, checkpoints: Sequence[Checkpoint] | Checkpoint | None
) -> list[Checkpoint]:
    """The checkpoints to use: the given ones, or the model's current parameters."""
    if checkpoints is None:
        return [{name: t.detach().clone() for name, t in model.state_dict().items()}]
    if isinstance(checkpoints, (str, nn.Module)) or hasattr(checkpoints, "keys"):
        return [checkpoints]
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError(
            "checkpoints is empty: pass at least one checkpoint (or None for the "
            "model's current parameters)"
        )
    return checkpoints


def gradient_features(
    estimator: Any, task: Task | None = None, projector: Projector | None = None
) -> GradientFeatures:
    """The gradient features an estimator's settings describe (``model``, ``task``,
    ``projector``/``proj_dim``, ``params``, ``seed``, ``batch_size``, ``chunk_size``,
    ``device``, ``progress``); ``task`` replaces its task (targets scored with another output),
    ``projector`` reuses a projector object (and the matrices it keeps)."""
    if projector is None:
        projector = stored_projector(estimator) or make_projector(
            estimator.projector, estimator.proj_dim
        )
    return GradientFeatures(
        estimator.model,
        estimator.task if task is None else task,
        projector,
        params=estimator.params,
        seed=estimator.seed,
        batch_size=estimator.batch_size,
        chunk_rows=estimator.chunk_size,
        device=estimator.device,
        progress=estimator.progress,
        # TRAK's settings; the gradient baselines keep the defaults
        memory_budget=getattr(estimator, "memory_budget", None),
        precision=getattr(estimator, "precision", None),
    )


def stored_projector(estimator: Any) -> Projector | None:
    """For ``projector="auto"``, the per-example projector (sparse JL, dense, identity) an existing
    store's features were made with when its ``k`` is the estimator's: resuming or extending a
    store keeps its projection although the default has changed since (sparse JL was the default
    below a million parameters). ``None`` where there is no store, its features were factorised
    (the default's own; a fitted split is adopted as usual), or its projector is not one this
    version rebuilds."""
    location = getattr(estimator, "store", None)
    if estimator.projector != "auto" or location is None:
        return None
    try:
        recorded = open_existing_store(location, read_only=True).provenance("features")
    except (FileNotFoundError, ValueError, OSError):
        return None
    config = (recorded or {}).get("projector")
    if not isinstance(config, dict) or config.get("proj_dim") != estimator.proj_dim:
        return None
    if config.get("name") == "factorized":  # the default's own: its split is adopted as usual
        return None
    try:
        return projector_from_config(config)
    except (ValueError, KeyError):  # another version's map: the provenance check says so
        return None


def checked_examples(
    data: Any, role: str, task: Task, model: nn.Module, batch_size: int
) -> Examples:
    """``data`` as :class:`~datatrace.data.Examples`, refused with a clear error when it is
    empty or when its first batch is malformed (``task.check_batch``), before anything is
    computed or stored. Featurization checks every later batch.

    Args:
        role: ``"train"`` or ``"targets"``, for the messages.

    Raises:
        ValueError, TypeError: from the emptiness check or ``task.check_batch``.
    """
    examples = Examples(data)
    if examples.n == 0:
        if role == "train":
            raise ValueError(
                "the training set is empty (0 examples): fit needs at least one training example"
            )
        raise ValueError("no targets: the targets hold 0 examples; score needs at least one")
    # At least the examples the provenance fingerprints, so that a bad one among them is refused
    # before the store records it (and would then refuse the corrected data).
    size = batch_size if isinstance(batch_size, int) else FINGERPRINT_EXAMPLES  # or "auto"
    first = examples.read(0, min(examples.n, max(size, FINGERPRINT_EXAMPLES)))
    with examples_from(0):
        task.check_batch(model, first)
    return examples


def open_existing_store(location: str | Path | Store, read_only: bool = False) -> Store:
    """A store that must already exist: nothing is created where there is none.

    Raises:
        FileNotFoundError: nothing at ``location`` (``"no datatrace store at ..."``), or a
            directory that is not a store.
        ValueError: ``location`` is a Zarr group but not a datatrace store.
    """
    if isinstance(location, Store):
        return location
    text = str(location)
    if "://" not in text:
        path = Path(text)
        if not path.exists():
            raise FileNotFoundError(f"no datatrace store at {text}: the path does not exist")
        if not (path / ZARR_METADATA).is_file():
            hint = ""
            if (path / "store" / ZARR_METADATA).is_file():
                hint = f" (did you mean {path / 'store'}?)"
            raise FileNotFoundError(f"{text} is not a datatrace store{hint}")
    try:
        opened = Store(location, read_only=True)
    except FileNotFoundError:  # an fsspec URL with nothing there
        raise FileNotFoundError(f"no datatrace store at {text}") from None
    if "datatrace" not in opened.root.attrs:
        raise ValueError(f"{text} is a Zarr group but not a datatrace store")
    return opened if read_only else Store(location)


def projector_from_config(config: dict[str, Any]) -> Projector:
    """The built-in projector whose ``config()`` is ``config``.

    Raises:
        ValueError: the configuration is not that of a built-in projector.
    """
    # Imported here so that this change stays inside the function; there is no cycle.
    from datatrace.grads import factorized

    name = config.get("name")
    if name == "factorized":
        constants = {
            "min_layer_dim": factorized.MIN_LAYER_DIM,
            "sparse_blowup": factorized.SPARSE_BLOWUP,
        }
        if config.get("variant") in factorized.MASK_VARIANTS:
            constants.update(factorized.mask_constants(config["variant"]))
        differing = {
            key: config.get(key) for key, value in constants.items() if config.get(key) != value
        }
        if differing:
            raise ValueError(
                f"the store's features were projected with {config}, whose {differing} differ "
                f"from this version's {constants}: the same settings no longer give the same "
                "map, so reopen the store with the datatrace version that fitted it"
            )
        split, layer_dims = config.get("split", "params"), config.get("layer_dims")
        if split == "gradient" and layer_dims is None:
            raise ValueError(
                f"the store's features were projected with {config}, whose gradient split was "
                "not recorded: this store was not written by a completed featurization"
            )
        return factorized.FactorizedProjector(
            config["proj_dim"],
            variant=config["variant"],
            nnz=config["nnz"],
            split=split,
            layer_dims=layer_dims,
            layer_maps=config.get("layer_maps"),
        )
    if name == "sparse_jl":
        return SparseJLProjector(config["proj_dim"], config["nnz"])
    if name == "dense":
        return DenseProjector(config["proj_dim"], config["distribution"])
    if name == IdentityProjector.__name__:
        return IdentityProjector()
    raise ValueError(
        f"the store's features were projected with {config}, not a built-in projector: pass "
        "the projector object they were fitted with (projector=...)"
    )


def reopen_features(
    cls: type,
    store: str | Path | Store,
    model: nn.Module,
    task: Task,
    checkpoints: Sequence[Checkpoint] | Checkpoint | None,
    settings: dict[str, Any],
) -> tuple[Any, list[CheckpointFeatures]]:
    """An estimator of class ``cls`` on the features a complete store holds, verified.

    The projector, its seed and the chunk size come from the store's provenance unless given in
    ``settings`` (then they must match it); the other ``settings`` are constructor arguments of
    ``cls``. The model's architecture, the parameter selection, the task and the projection are
    checked against the provenance, and each checkpoint's fingerprint against the one recorded
    when it was featurized.

    Returns:
        ``(estimator, stored)``: the estimator with ``features_``, ``checkpoints_`` and
        ``store_`` set, and the stored features of each checkpoint.

    Raises:
        FileNotFoundError: no store at ``store``.
        StoreMismatchError: the model, parameters, task, projection or a checkpoint differ from
            what the store was fitted with, or more checkpoints are given than it holds.
        StoreCorruptionError: the store holds features but has lost their provenance.
        ValueError: the store holds no features, or not all of them yet.
    """
    opened = open_existing_store(store)
    recorded = opened.recorded_provenance("features")
    if recorded is None:
        raise ValueError(
            f"the store at {opened.where} holds no features: fit an estimator with store=... first"
        )
    defaults: dict[str, Any] = {"seed": recorded["seed"], "chunk_size": recorded["chunk_rows"]}
    if "projector" not in settings and "proj_dim" not in settings:
        defaults["projector"] = projector_from_config(recorded["projector"])
        defaults["proj_dim"] = recorded["projector"].get("proj_dim")
    estimator = cls(model, task, store=opened, **{**defaults, **settings})
    features = gradient_features(estimator)
    # Imported here, as in projector_from_config, so that this change stays inside the function.
    from datatrace.grads.factorized import FactorizedProjector

    # A projector named in settings takes the split the store recorded if its settings match.
    projector = features.projector
    if isinstance(projector, FactorizedProjector):
        projector.adopt_split(recorded.get("projector"))
        if not projector.split_fitted:
            raise StoreMismatchError(
                f"the store at {opened.where} holds features of a different run:\n  projector: "
                f"stored {recorded.get('projector')!r}, now {projector.config()!r} "
                f"({REOPEN_CHECKS['projector']})"
            )
    # Only the model-side entries are compared: the training data is not at hand.
    expected = json_normalise(features.provenance(Examples((torch.zeros(0),))))
    differing = [key for key in REOPEN_CHECKS if recorded.get(key) != expected.get(key)]
    if "model" in differing:  # the parameters of another architecture differ as a consequence
        differing = ["model"]
    differences = [
        f"  {key}: stored {recorded.get(key)!r}, now {expected.get(key)!r} ({REOPEN_CHECKS[key]})"
        for key in differing
    ]
    if differences:
        raise StoreMismatchError(
            f"the store at {opened.where} holds features of a different run:\n"
            + "\n".join(differences)
        )
    checkpoints = checkpoint_list(model, checkpoints)
    held = sum(name.isdigit() for name in opened.groups("features"))
    if len(checkpoints) > held:
        raise StoreMismatchError(
            f"{len(checkpoints)} checkpoints given, but the store at {opened.where} holds the "
            f"features of {held}: pass the checkpoints it was fitted with, in the same order"
        )
    stored = [
        _verified_checkpoint(opened, features, recorded, index, checkpoint)
        for index, checkpoint in enumerate(checkpoints)
    ]
    estimator.features_ = features
    estimator.checkpoints_ = checkpoints
    estimator.store_ = opened
    return estimator, stored


def _verified_checkpoint(
    store: Store,
    features: GradientFeatures,
    recorded: dict[str, Any],
    index: int,
    checkpoint: Checkpoint,
) -> CheckpointFeatures:
    """The stored features of checkpoint ``index``, after checking that ``checkpoint`` is the
    one they were computed from and that every row chunk is written."""
    identity = dict(store.root[f"features/{index}"].attrs.get("identity", {}))
    now = {
        "checkpoint": tensors_fingerprint(features.load(checkpoint)),
        "projection_seed": features.projection_seed(index),
    }
    differences = [
        f"  {key}: stored {identity.get(key)!r}, now {value!r}"
        for key, value in now.items()
        if identity.get(key) != value
    ]
    if differences:
        raise StoreMismatchError(
            f"checkpoint {index} is not the one whose features the store at {store.where} "
            "holds:\n" + "\n".join(differences) + "\nPass the checkpoints the store was fitted "
            "with, in the same order."
        )
    part = store.checkpoint_features(
        index, recorded["n_train"], features.dim, recorded["chunk_rows"], identity
    )
    if not part.is_complete():
        missing = int((~part.completed()).sum())
        raise ValueError(
            f"the store at {store.where} is incomplete: checkpoint {index} has {missing} of "
            f"{part.n_chunks} row chunks still to featurize. Finish fitting it (every shard) "
            "with the training data, then reopen it"
        )
    return part
