"""A TRAK fit as a config file: what ``datatrace fit CONFIG.json`` runs, so that a cluster job is
one command.

The user's code is named by import paths ``"package.module:function"``: a model factory, a
training-data factory, optionally a checkpoints factory (or a list of checkpoint files), and the
task. The default is the bundled digits with a small MLP, so ``datatrace fit --init f.json``
then ``datatrace fit f.json`` runs out of the box. The config is saved in the store beside the
features (``features`` group, attribute ``fit_config``), so any store can be refitted, extended or
inspected from the file next to its results (``datatrace fit --config-out``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from datatrace._arguments import positive_integer, real_number, thread_count
from datatrace._settings import JsonSettings, setting
from datatrace.subsets.backends import Backend, LocalBackend, RayBackend
from datatrace.subsets.config import BACKENDS, load_object

CONFIG_ATTRIBUTE = "fit_config"
DIGITS_MODEL = "datatrace.demo.models:make_model"
DIGITS_DATA = "datatrace.fit_config:digits_train"
CLASSIFICATION = "datatrace.tasks:Classification"


def digits_train(n_train: int | None = None) -> tuple[Any, Any]:
    """The bundled digits' training split ``(images, labels)`` (the first ``n_train``)."""
    from datatrace.demo import digits_split

    images, labels = digits_split()[0].as_tuple()
    return (images, labels) if n_train is None else (images[:n_train], labels[:n_train])


@dataclass
class FitRunConfig(JsonSettings):
    """Settings of a TRAK fit; saved in the store beside its features."""

    KIND = "fit config"

    @classmethod
    def missing_hint(cls, path: Path) -> str:
        return f" (write one with: datatrace fit --init {path})"

    store: str = setting("the datatrace store: a directory or an fsspec URL", "datatrace-fit")
    model: str = setting("import path 'package.module:factory' of the model", DIGITS_MODEL)
    model_kwargs: dict[str, Any] = field(
        default_factory=lambda: {"name": "mlp", "hidden": 32},
        metadata={"help": "keyword arguments of the model factory"},
    )
    data: str = setting("import path of a factory returning the training data", DIGITS_DATA)
    data_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "keyword arguments of the data factory"}
    )
    checkpoints: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "checkpoint files (torch.save'd state dicts), an import path of a factory "
            "returning the checkpoints, or null for the model as built"
        },
    )
    task: str = setting("import path of the task class (or factory)", CLASSIFICATION)
    task_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "keyword arguments of the task"}
    )
    proj_dim: int = setting("projection dimension k", 2048)
    projector: str = setting(
        "projector name (see TRAK): auto, sparse, factgrass, dense, ...", "auto"
    )
    damping: float | str = setting("damping: 'auto' or relative to the mean diagonal", "auto")
    kernel_weights: str | None = setting(
        "kernel: null (ΦᵀΦ, as traker) or 'auto' (Gauss–Newton ΦᵀRΦ where the task has a "
        "curvature, the default; docs/trak.md)",
        "auto",
    )
    seed: int = setting("seed of the projections", 0)
    batch_size: int = setting("examples per gradient batch", 32)
    chunk_size: int = setting("training examples per stored chunk (the unit of work)", 512)
    device: str | None = setting("where gradients are computed (null: the model's device)", None)
    backend: str = setting("where to featurize: local (this process), processes, ray", "local")
    processes: int = setting("worker processes of the 'processes' backend", 2)
    max_retries: int | None = setting("retries of a failed chunk (default: local 0, ray 3)", None)
    ray_address: str | None = setting(
        "Ray cluster address ('auto', 'ray://host:10001'); null: local"
    )
    ray_num_cpus: float = setting("CPUs requested per Ray task", 1.0)
    ray_num_gpus: float = setting("GPUs requested per Ray task (its worker computes on it)", 0.0)
    lease_s: float = setting("seconds after which a silent driver's claim is taken over", 600.0)
    threads: int = setting("torch CPU threads of this process (0: leave torch's setting)", 0)
    progress: bool = setting("show a progress bar", True)

    def check(self) -> FitRunConfig:
        """``self`` if its settings are consistent, else a ValueError saying what to change."""
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("proj_dim", "batch_size", "chunk_size", "processes"):
            positive_integer(name, getattr(self, name))
        thread_count(self.threads)
        real_number("lease_s", self.lease_s, "positive")
        real_number("ray_num_cpus", self.ray_num_cpus)
        real_number("ray_num_gpus", self.ray_num_gpus)
        return self

    def make_backend(self) -> Backend | None:
        """The backend these settings describe (``None``: in this process, without claims)."""
        retries = {} if self.max_retries is None else {"max_retries": self.max_retries}
        if self.backend == "ray":
            return RayBackend(
                num_cpus=self.ray_num_cpus,
                num_gpus=self.ray_num_gpus,
                address=self.ray_address,
                **retries,
            )
        if self.backend == "processes":
            return LocalBackend(processes=self.processes, **retries)
        return None

    def make_checkpoints(self) -> list[Any] | None:
        """The checkpoints: loaded files, a factory's result, or ``None``."""
        if self.checkpoints is None:
            return None
        if isinstance(self.checkpoints, str):
            return list(load_object(self.checkpoints)())
        missing = [path for path in self.checkpoints if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(f"no checkpoint file at {', '.join(missing)}")
        return list(self.checkpoints)  # paths: loaded by the featurization (and its workers)

    def make_trak(self):
        """The (unfitted) :class:`~datatrace.TRAK` these settings describe."""
        from datatrace.methods.trak import TRAK

        model = load_object(self.model)(**self.model_kwargs)
        task = load_object(self.task)(**self.task_kwargs)
        return TRAK(
            model,
            task,
            proj_dim=self.proj_dim,
            projector=self.projector,
            damping=self.damping,
            kernel_weights=self.kernel_weights,
            store=self.store,
            seed=self.seed,
            batch_size=self.batch_size,
            chunk_size=self.chunk_size,
            device=self.device,
            progress=self.progress,
        )


def run_fit_config(config: FitRunConfig):
    """Fit the TRAK a config describes into its store and save the config there.

    Returns:
        The fitted (or, if other drivers still hold chunks, partly fitted) :class:`~datatrace.TRAK`.
    """
    import torch

    config.check()
    trak = config.make_trak()
    data = load_object(config.data)(**config.data_kwargs)
    checkpoints = config.make_checkpoints()
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        trak.fit(data, checkpoints, backend=config.make_backend())
    finally:
        torch.set_num_threads(threads)
    store = trak.store_ if hasattr(trak, "store_") else None
    if store is None:
        from datatrace.store import Store

        store = Store(config.store)
    store.root["features"].attrs[CONFIG_ATTRIBUTE] = asdict(config)
    return trak


def saved_fit_config(store) -> dict[str, Any] | None:
    """The config saved with the features of ``store`` (a :class:`~datatrace.store.Store`)."""
    if "features" not in store.root:
        return None
    return store.root["features"].attrs.get(CONFIG_ATTRIBUTE)
