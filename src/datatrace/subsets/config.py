"""A subset experiment as a config file: what ``datatrace subsets run CONFIG.json`` runs.

The user's code is named by import paths ``"package.module:attribute"``: either a factory
(``experiment``) whose result has ``train``, ``evaluate``, ``n_train`` and ``n_outputs`` (and
optionally ``description()``), or a ``train``/``evaluate`` pair with ``n_train``/``n_outputs``.
The default is the bundled digits (:class:`datatrace.demo.subsets.DigitsSubsets`), so an empty
config ``{}`` runs out of the box.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datatrace._arguments import positive_integer, real_number, thread_count
from datatrace._settings import JsonSettings, setting
from datatrace.subsets.backends import Backend, LocalBackend, RayBackend
from datatrace.subsets.experiment import DEFAULT_LEASE_S, SubsetExperiment
from datatrace.subsets.masks import DEFAULT_DROP_FRACTION, SEED_POLICIES, check_alpha

DIGITS_FACTORY = "datatrace.demo.subsets:DigitsSubsets"
BACKENDS = ("local", "processes", "ray")
# LDS protocols a subset table can serve: random subsets of a fraction alpha with fresh seeds
# (TRAK, datamodels), or small drops (MAGIC, Bergson; see docs/evaluation.md).
PROTOCOLS = ("classic", "small-drop")


@dataclass
class SubsetRunConfig(JsonSettings):
    """Settings of a subset run; saved in the store beside its results (``config/`` attrs)."""

    KIND = "subset config"

    @classmethod
    def missing_hint(cls, path: Path) -> str:
        return f" (write one with: datatrace subsets init {path})"

    store: str = setting("the datatrace store: a directory or an fsspec URL", "datatrace-subsets")
    name: str = setting("name of the subset experiment in the store", "digits")
    n_masks: int = setting("random subsets (rows); rerun with more to extend the experiment", 100)
    alpha: float = setting("fraction of the training set in each subset", 0.5)
    seed: int = setting("seed of the masks and of the training seeds", 0)
    n_seeds: int = setting("models trained per subset, each with its own seed", 1)
    protocol: str = setting(
        "LDS protocol of the masks: classic (random subsets of alpha) or small-drop (each subset "
        "leaves out drop_fraction of the data)",
        "classic",
    )
    drop_fraction: float = setting(
        "small-drop: fraction of the training set each subset leaves out", DEFAULT_DROP_FRACTION
    )
    seed_policy: str | None = setting(
        "per-row (fresh seeds per subset) or fixed (row 0's seeds for every subset: "
        "deterministic); null: per-row for classic, fixed for small-drop"
    )
    experiment: str | None = setting(
        "import path 'package.module:factory' of an object with train(train_indices, seed), "
        "evaluate(model), n_train and n_outputs; null to give train/evaluate instead",
        DIGITS_FACTORY,
    )
    experiment_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": 'keyword arguments of the factory, e.g. {"epochs": 30}'},
    )
    train: str | None = setting("import path of train(train_indices, seed) -> model", None)
    evaluate: str | None = setting("import path of evaluate(model) -> (n_outputs,) outputs", None)
    n_train: int | None = setting("training-set size (with train/evaluate; else the factory's)")
    n_outputs: int | None = setting("outputs per model (with train/evaluate; else the factory's)")
    backend: str = setting("where models train: local (this process), processes, ray", "local")
    processes: int = setting("worker processes of the 'processes' backend", 2)
    max_retries: int | None = setting("retries of a failed row (default: local 0, ray 3)", None)
    ray_address: str | None = setting(
        "Ray cluster address ('auto', 'ray://host:10001'); null: local"
    )
    ray_num_cpus: float = setting("CPUs requested per Ray task", 1.0)
    ray_num_gpus: float = setting("GPUs requested per Ray task", 0.0)
    lease_s: float = setting(
        "seconds after which a silent runner's claim is taken over", DEFAULT_LEASE_S
    )
    threads: int = setting("torch CPU threads of this process (0: leave torch's setting)", 1)
    progress: bool = setting("show a progress bar", True)

    def check(self) -> SubsetRunConfig:
        """``self`` if its settings are consistent, else a ValueError saying what to change."""
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.seed_policy is not None and self.seed_policy not in SEED_POLICIES:
            raise ValueError(
                f"seed_policy must be one of {SEED_POLICIES} or null, got {self.seed_policy!r}"
            )
        if self.protocol == "small-drop":
            if not 0.0 < real_number("drop_fraction", self.drop_fraction) < 1.0:
                raise ValueError(f"drop_fraction must be in (0, 1), got {self.drop_fraction}")
        pair = (self.train, self.evaluate)
        if self.experiment is None and None in pair:
            raise ValueError("give experiment (a factory) or both train and evaluate")
        if self.experiment is not None and pair != (None, None):
            raise ValueError("give experiment or train/evaluate, not both (set experiment: null)")
        if self.experiment is None and (self.n_train is None or self.n_outputs is None):
            raise ValueError("with train/evaluate, give n_train and n_outputs too")
        for name in ("n_masks", "n_seeds", "processes"):
            positive_integer(name, getattr(self, name))
        for name in ("n_train", "n_outputs"):
            if getattr(self, name) is not None:
                positive_integer(name, getattr(self, name), " or null")
        check_alpha(self.alpha)
        thread_count(self.threads)
        real_number("lease_s", self.lease_s, "positive")
        real_number("ray_num_cpus", self.ray_num_cpus)
        real_number("ray_num_gpus", self.ray_num_gpus)
        return self

    def resolved_seed_policy(self) -> str:
        """The seed policy in force: the one given, else the protocol's default."""
        if self.seed_policy is not None:
            return self.seed_policy
        return "fixed" if self.protocol == "small-drop" else "per-row"

    def make_backend(self) -> Backend:
        """The backend these settings describe."""
        retries = {} if self.max_retries is None else {"max_retries": self.max_retries}
        if self.backend == "ray":
            return RayBackend(
                num_cpus=self.ray_num_cpus,
                num_gpus=self.ray_num_gpus,
                address=self.ray_address,
                **retries,
            )
        processes = self.processes if self.backend == "processes" else 0
        return LocalBackend(processes=processes, **retries)


def load_object(path: str) -> Any:
    """The object at import path ``"package.module:attribute"`` (dots after the colon nest).

    Raises:
        ValueError: the path is malformed, the module cannot be imported, or has no such name.
    """
    module_name, colon, attribute = path.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"{path!r} is not an import path of the form 'package.module:name'")
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import {module_name!r} (from {path!r}): {error}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{module_name!r} has no attribute {attribute!r} (from {path!r})")
        target = getattr(target, part)
    return target


@dataclass(frozen=True)
class ResolvedFunctions:
    """The user's code a config names, with what the table needs to know about it."""

    train: Any
    evaluate: Any
    n_train: int
    n_outputs: int
    description: dict[str, Any]


def resolve_functions(config: SubsetRunConfig) -> ResolvedFunctions:
    """Import the functions named by ``config``."""
    config.check()
    if config.experiment is not None:
        factory = load_object(config.experiment)
        made = factory(**config.experiment_kwargs)
        missing = [name for name in ("train", "evaluate") if not callable(getattr(made, name, 0))]
        if missing:
            raise ValueError(
                f"{config.experiment} returned {type(made).__name__}, which has no "
                f"{' or '.join(missing)} method"
            )
        for name in ("n_train", "n_outputs"):
            given, says = getattr(config, name), getattr(made, name, None)
            if given is not None and says is not None and given != says:
                raise ValueError(
                    f"the config's {name} is {given} but {config.experiment} has {says}: set "
                    f"{name} to null to take the experiment's (or fix one of them)"
                )
        n_train = config.n_train if config.n_train is not None else getattr(made, "n_train", None)
        n_outputs = (
            config.n_outputs if config.n_outputs is not None else getattr(made, "n_outputs", None)
        )
        if n_train is None or n_outputs is None:
            raise ValueError(
                f"{config.experiment} does not say n_train and n_outputs: give them in the config"
            )
        describe = getattr(made, "description", None)
        description = (
            describe()
            if callable(describe)
            else {"experiment": config.experiment, "kwargs": config.experiment_kwargs}
        )
        return ResolvedFunctions(made.train, made.evaluate, n_train, n_outputs, description)
    return ResolvedFunctions(
        load_object(config.train),
        load_object(config.evaluate),
        config.n_train,
        config.n_outputs,
        {"train": config.train, "evaluate": config.evaluate},
    )


def run_config(config: SubsetRunConfig) -> SubsetExperiment:
    """Create (or reopen) the experiment a config describes, save the config in it, run it."""
    import torch

    functions = resolve_functions(config)
    experiment = SubsetExperiment(
        config.store,
        config.name,
        n_train=functions.n_train,
        n_outputs=functions.n_outputs,
        n_masks=config.n_masks,
        alpha=config.alpha,
        seed=config.seed,
        n_seeds=config.n_seeds,
        description=functions.description,
        drop_fraction=config.drop_fraction if config.protocol == "small-drop" else None,
        seed_policy=config.resolved_seed_policy(),
    )
    experiment.save_config(asdict(config))
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return experiment.run(
            functions.train,
            functions.evaluate,
            backend=config.make_backend(),
            progress=config.progress,
            lease_s=config.lease_s,
        )
    finally:
        torch.set_num_threads(threads)
