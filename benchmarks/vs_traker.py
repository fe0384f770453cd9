"""datatrace's TRAK against MadryLab's ``traker`` 0.3.2 on the same checkpoints, data and ``k``.

Needs the reference implementation, which this script never installs itself::

    pip install "datatrace[bench]"        # or: pip install traker==0.3.2
    python benchmarks/vs_traker.py        # --help for the options

What runs. Checkpoints of a digits classifier (``datatrace.demo``: the bundled 8×8 digits, an MLP
by default, ``--model cnn`` for the CNN) are trained once; the same state dicts, training examples,
targets and batch size go to

* traker on the CPU: ``BasicProjector`` (dense Gaussian, float32, its default ``block_size``
  unless ``--traker-block-size``), ``use_half_precision=False``, the ``"image_classification"``
  task (the same margin and ``Q = 1 − p_y`` as ``datatrace.Classification``);
* datatrace with its default sparse JL projector and with its dense Gaussian projector (the same
  kind of matrix as traker's), each in an in-memory store;
* datatrace with ``projector="identity"``: the exact, un-projected kernel, which every projection
  approaches as ``k`` grows, and traker with its ``NoOpProjector`` (the same kernel, a check that
  the two libraries and the damping conversion below agree). They need a ``p × p`` kernel, so the
  default MLP is 48 units wide (``p`` = 5,962 parameters, a 0.28 GB float64 kernel, where the
  demo's default width of 128 has 26,122 parameters and would need 5.5 GB); wider models skip them
  (``MAX_EXACT_PARAMS``).

Damping, made equal. datatrace's features are ``φ = Pᵀg`` with ``E[PPᵀ] = I`` (entries of variance
``1/k``); traker's are ``Pᵀg/√p`` with standard normal entries (``TRAKer.normalize_factor = √p``),
i.e. ``c = √(k/p)`` times ours in distribution (``c = 1/√p`` without projection). Its kernel
``Φ_tᵀΦ_t + λ_t I`` is therefore ``c²(ΦᵀΦ + (λ_t/c²) I)``: the same matrix as ours up to the
factor ``c²`` (which cancels in the scores) when ``λ_t = c²λ``. The benchmark sets one absolute
``λ = r · mean_{c,i} ‖∇_θ f(z_i; θ_c)‖²`` (``r`` = ``--damping``; the mean diagonal of the
``n × n`` gradient Gram matrix, which does not depend on ``k``), passes it to datatrace as
``damping_absolute`` and ``c²λ`` to traker as ``lambda_reg``. A fixed absolute ``λ`` is also what
makes the projected scores converge to the exact scores as ``k`` grows, and keeps the kernel
invertible when ``k ≥ n_train``.

What is reported, per ``k`` and method: featurize + kernel + score wall time (all checkpoints,
after a warm-up run on a few examples), traker's time over the method's, and the median over
targets of the Spearman correlation between training-example scores (traker's ``(n_train,
n_targets)`` output is transposed) against traker at the same ``k`` and against the exact kernel,
for the first checkpoint alone and for the ensemble of all checkpoints. traker divides each
checkpoint's inverse kernel by its mean absolute entry, which weights its checkpoints unequally in
the ensemble; datatrace weights them equally. The weights traker used are printed below the table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

import datatrace as dt
from datatrace.demo import Split, accuracy, digits_split, make_model, train_checkpoints
from datatrace.grads import PerExampleGradients, load_checkpoint, select_parameters

try:
    import trak
    from trak import TRAKer
    from trak.projectors import BasicProjector, NoOpProjector, ProjectionType
except ImportError:
    trak = None

TRAKER_VERSION = "0.3.2"
INSTALL_HINT = (
    'this benchmark needs MadryLab\'s traker: pip install "datatrace[bench]" '
    f"(or pip install traker=={TRAKER_VERSION})"
)
# Width of each demo model by default: small enough for the exact p × p kernel to fit in memory.
DEFAULT_WIDTH = {"mlp": 48, "cnn": 16}
WIDTH_ARGUMENT = {"mlp": "hidden", "cnn": "channels"}
# The exact kernel is p × p float64, held about three times per checkpoint (Gram matrix, store
# copy, Cholesky factor): 12,000 parameters is ~3.5 GB.
MAX_EXACT_PARAMS = 12_000
# BasicProjector's own default: the dense matrix is regenerated in blocks of this many columns.
TRAKER_DEFAULT_BLOCK_SIZE = 100
# Examples used to warm up each implementation (imports, vmap tracing, allocators) before timing.
WARMUP_TRAIN = 64
WARMUP_TARGETS = 32
EXPERIMENT = "targets"
MISSING = "—"

_START = time.perf_counter()


def _load_average() -> str:
    """The 1-minute load average (other processes competing for the cores), if known."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def log(message: str) -> None:
    """Progress on stderr, with the time since the start."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", file=sys.stderr, flush=True)


class Stopwatch:
    """Wall and process CPU time since construction."""

    def __init__(self) -> None:
        self.wall_start = time.perf_counter()
        self.cpu_start = time.process_time()

    def read(self) -> tuple[float, float]:
        """``(wall seconds, CPU seconds)`` elapsed."""
        return time.perf_counter() - self.wall_start, time.process_time() - self.cpu_start


@dataclass
class Run:
    """Scores and timing of one implementation at one projection dimension.

    Attributes:
        method: what ran.
        proj_dim: ``k`` (``p`` for the exact kernel).
        damping: the absolute ``λ`` this implementation was given, on its own feature scale.
        seconds: featurize + kernel + score wall time over all checkpoints.
        cpu_seconds: CPU time of the process (all threads) over the same span: about ``threads ×
            seconds`` when the cores were not shared with other processes.
        scores: ``(n_targets, n_train)`` ensemble scores over all checkpoints.
        first_scores: ``(n_targets, n_train)`` scores of the first checkpoint alone.
        checkpoint_weights: relative weight of each checkpoint in the ensemble (mean 1).
    """

    method: str
    proj_dim: int
    damping: float
    seconds: float
    cpu_seconds: float
    scores: np.ndarray
    first_scores: np.ndarray
    checkpoint_weights: np.ndarray | None = None


def batches(split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` batches in order: the format traker's vmap gradient computer takes."""
    for start in range(0, len(split), batch_size):
        yield split.images[start : start + batch_size], split.labels[start : start + batch_size]


def mean_squared_gradient_norm(
    model: nn.Module, checkpoints: Sequence[dict], train: Split, batch_size: int
) -> float:
    """``mean_{c,i} ‖∇_θ f(z_i; θ_c)‖²`` of the classification margin, over all parameters."""
    gradients = PerExampleGradients(model, dt.Classification(), select_parameters(model))
    total = 0.0
    for checkpoint in checkpoints:
        state = load_checkpoint(checkpoint, model, "cpu")
        for batch in batches(train, batch_size):
            grads = gradients.gradients(state, batch)
            total += sum(g.flatten(1).double().pow(2).sum().item() for g in grads.values())
    return total / (len(checkpoints) * len(train))


def traker_feature_scale(proj_dim: int | None, n_params: int) -> float:
    """``c²``, where traker's features are ``c`` times datatrace's (in distribution).

    traker divides every projected gradient by ``√p``. Its ``BasicProjector`` has standard normal
    entries where datatrace's have variance ``1/k``, so ``c² = k/p``; without a projection
    (``NoOpProjector``, ``proj_dim=None`` here) only the division remains and ``c² = 1/p``.
    """
    return (1 if proj_dim is None else proj_dim) / n_params


def run_traker(
    model: nn.Module,
    checkpoints: Sequence[dict],
    train: Split,
    targets: Split,
    proj_dim: int | None,
    damping: float,
    batch_size: int,
    block_size: int,
    seed: int,
) -> Run:
    """traker 0.3.2 on the CPU in float32, featurizing and scoring every checkpoint.

    Args:
        proj_dim: ``k`` of the dense Gaussian ``BasicProjector``; ``None`` for no projection
            (``NoOpProjector``: the exact kernel).
        damping: traker's ``lambda_reg`` (on its own feature scale).
    """
    n_params = sum(param.numel() for param in model.parameters())
    with tempfile.TemporaryDirectory() as save_dir:
        stopwatch = Stopwatch()
        if proj_dim is None:
            projector = NoOpProjector(device="cpu")
            method = "traker none (NoOpProjector)"
        else:
            projector = BasicProjector(
                grad_dim=n_params,
                proj_dim=proj_dim,
                seed=seed,
                proj_type=ProjectionType.normal,
                device="cpu",
                block_size=block_size,
                dtype=torch.float32,
            )
            method = "traker dense (BasicProjector)"
        traker = TRAKer(
            model=model,
            task="image_classification",
            train_set_size=len(train),
            save_dir=save_dir,
            device="cpu",
            projector=projector,
            use_half_precision=False,
            lambda_reg=damping,
            logging_level=logging.WARNING,
        )
        for model_id, checkpoint in enumerate(checkpoints):
            traker.load_checkpoint(checkpoint, model_id=model_id)
            for batch in batches(train, batch_size):
                traker.featurize(batch=batch, num_samples=len(batch[1]))
        with _quiet_tqdm():
            traker.finalize_features()
        for model_id, checkpoint in enumerate(checkpoints):
            traker.start_scoring_checkpoint(
                EXPERIMENT, checkpoint, model_id=model_id, num_targets=len(targets)
            )
            for batch in batches(targets, batch_size):
                traker.score(batch=batch, num_samples=len(batch[1]))
        with _quiet_tqdm():
            scores = np.array(traker.finalize_scores(exp_name=EXPERIMENT)).T
        seconds, cpu_seconds = stopwatch.read()
        with _quiet_tqdm():
            first = np.array(traker.finalize_scores(exp_name=EXPERIMENT, model_ids=[0])).T
        weights = traker_checkpoint_weights(traker, len(checkpoints), damping)
    return Run(method, traker.proj_dim, damping, seconds, cpu_seconds, scores, first, weights)


def traker_checkpoint_weights(traker: TRAKer, n_checkpoints: int, damping: float) -> np.ndarray:
    """The relative weight traker gives each checkpoint in its ensemble, normalised to mean 1.

    traker divides each ``(XᵀX + λI)⁻¹`` by its mean absolute entry before averaging the
    checkpoints' scores, so checkpoint ``c`` is weighted by ``1 / mean|(X_cᵀX_c + λI)⁻¹|``.
    Recomputed here the way traker computes it (float32), from the features it stored.
    """
    inverse_scales = []
    for model_id in range(n_checkpoints):
        traker.saver.load_current_store(model_id)
        features = torch.as_tensor(np.asarray(traker.saver.current_store["grads"]))
        kernel = features.T @ features + damping * torch.eye(features.shape[1])
        inverse_scales.append(1.0 / torch.linalg.inv(kernel).abs().mean().item())
    weights = np.array(inverse_scales)
    return weights / weights.mean()


@contextlib.contextmanager
def _quiet_tqdm() -> Iterator[None]:
    """Hides the progress bars traker draws over one-step loops (they open on ``sys.stderr``)."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def run_datatrace(
    model: nn.Module,
    checkpoints: Sequence[dict],
    train: Split,
    targets: Split,
    projector: str,
    proj_dim: int | None,
    damping: float,
    batch_size: int,
    seed: int,
) -> Run:
    """datatrace's TRAK with an in-memory store; ``proj_dim=None`` for the identity projection."""
    store = dt.Store()

    def estimator() -> dt.TRAK:
        return dt.TRAK(
            model,
            dt.Classification(),
            proj_dim=proj_dim,
            projector=projector,
            damping_absolute=damping,
            store=store,
            seed=seed,
            batch_size=batch_size,
            progress=False,
        )

    with warnings.catch_warnings():
        # k ≥ n_train is intended here: the damping is positive and the same in every method.
        warnings.simplefilter("ignore", dt.SingularKernelWarning)
        stopwatch = Stopwatch()
        fitted = estimator().fit(train.as_tuple(), checkpoints)
        scores = fitted.score(targets.as_tuple()).scores
        seconds, cpu_seconds = stopwatch.read()
        # The first checkpoint's features are already in the store: only its kernel is redone.
        first = estimator().fit(train.as_tuple(), checkpoints[:1]).score(targets.as_tuple())
    method = f"datatrace {projector}"
    return Run(method, fitted.feature_dim_, damping, seconds, cpu_seconds, scores, first.scores)


def fastest(repeats: int, run: Callable[..., Run], *args: Any) -> Run:
    """The fastest of ``repeats`` calls of ``run(*args)``.

    Every call computes the same scores; they differ only in how much other processes on the
    machine slowed them down, which the minimum filters out best (as ``timeit`` does).
    """
    best = None
    for _ in range(repeats):
        result = run(*args)
        if best is None or result.seconds < best.seconds:
            best = result
    return best


def median_spearman(scores: np.ndarray, reference: np.ndarray) -> float:
    """Median over targets (rows) of the Spearman correlation between two ``(n_targets,
    n_train)`` score matrices, each row ranked over the training examples."""
    ranks = rankdata(scores, axis=1)
    reference_ranks = rankdata(reference, axis=1)
    ranks -= ranks.mean(axis=1, keepdims=True)
    reference_ranks -= reference_ranks.mean(axis=1, keepdims=True)
    covariance = (ranks * reference_ranks).sum(axis=1)
    norms = np.sqrt((ranks**2).sum(axis=1) * (reference_ranks**2).sum(axis=1))
    return float(np.nanmedian(covariance / norms))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first two columns left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(cell).ljust(width) if index < 2 else str(cell).rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths))
        )

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="TRAK featurize+score time and score agreement: datatrace vs traker "
        f"{TRAKER_VERSION}, on the same digits checkpoints, data and projection dimensions.",
    )
    parser.add_argument("--model", choices=sorted(DEFAULT_WIDTH), default="mlp")
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        help="MLP hidden units or CNN channels (default: "
        + ", ".join(f"{name} {width}" for name, width in DEFAULT_WIDTH.items())
        + ")",
    )
    parser.add_argument("--models", type=int, default=3, help="checkpoints (models trained)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per checkpoint")
    parser.add_argument(
        "--proj-dims", type=int, nargs="+", default=[512, 1024, 4096], help="values of k"
    )
    parser.add_argument("--n-train", type=int, default=1000, help="training examples (≤ 1500)")
    parser.add_argument("--n-targets", type=int, default=200, help="target examples (≤ 297)")
    parser.add_argument("--batch-size", type=int, default=32, help="same for both libraries")
    parser.add_argument(
        "--damping",
        type=float,
        default=0.01,
        help="λ relative to the mean squared gradient norm (the mean diagonal of the n × n "
        "gradient Gram matrix)",
    )
    parser.add_argument(
        "--traker-block-size",
        type=int,
        default=TRAKER_DEFAULT_BLOCK_SIZE,
        help="columns of traker's projection generated at a time (default: its own; must be "
        "below every k)",
    )
    parser.add_argument("--no-exact", action="store_true", help="skip the identity projection")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="time each run this many times and keep the fastest (for a machine shared with "
        "other processes)",
    )
    parser.add_argument("--seed", type=int, default=0, help="training and projection seed")
    args = parser.parse_args(argv)
    if args.width is None:
        args.width = DEFAULT_WIDTH[args.model]
    train, test = digits_split()
    if not 0 < args.n_train <= len(train) or not 0 < args.n_targets <= len(test):
        parser.error(
            f"--n-train must be in 1..{len(train)} and --n-targets in 1..{len(test)} "
            "(the bundled digits split)"
        )
    if args.models < 1 or args.repeats < 1 or min(args.proj_dims) < 1:
        parser.error("--models, --repeats and every --proj-dims value must be positive")
    if not 0 < args.traker_block_size < min(args.proj_dims):
        # With one block, BasicProjector keeps its matrix, but finalize_features frees it and
        # the one-block path of project() never regenerates it: scoring raises AttributeError.
        parser.error(
            "--traker-block-size must be positive and smaller than every --proj-dims value: "
            "traker 0.3.2's BasicProjector with a single block crashes when scoring after "
            "finalize_features"
        )
    return args


@dataclass
class Benchmark:
    """What every run shares: settings, models, checkpoints, data and damping."""

    args: argparse.Namespace
    traker_model: nn.Module
    datatrace_model: nn.Module
    checkpoints: list[dict]
    train: Split
    targets: Split
    accuracies: list[float]
    n_params: int
    gradient_scale: float
    damping: float
    load_before: str

    @classmethod
    def prepare(cls, args: argparse.Namespace) -> Benchmark:
        """Train the checkpoints and compute the damping."""
        load_before = _load_average()
        model_kwargs = {WIDTH_ARGUMENT[args.model]: args.width}
        train, test = digits_split()
        train = train.subset(np.arange(args.n_train))
        log(f"training {args.models} {args.model} checkpoints on {len(train)} digits")
        checkpoints = train_checkpoints(
            train, args.models, model=args.model, epochs=args.epochs, seed=args.seed, **model_kwargs
        )
        accuracies = []
        for checkpoint in checkpoints:
            trained = make_model(args.model, **model_kwargs)
            trained.load_state_dict(checkpoint)
            accuracies.append(accuracy(trained, test))
        # Separate instances: traker loads each checkpoint into its model; datatrace never does.
        datatrace_model = make_model(args.model, **model_kwargs)
        gradient_scale = mean_squared_gradient_norm(
            datatrace_model, checkpoints, train, args.batch_size
        )
        return cls(
            args=args,
            traker_model=make_model(args.model, **model_kwargs),
            datatrace_model=datatrace_model,
            checkpoints=checkpoints,
            train=train,
            targets=test.subset(np.arange(args.n_targets)),
            accuracies=accuracies,
            n_params=sum(param.numel() for param in datatrace_model.parameters()),
            gradient_scale=gradient_scale,
            damping=args.damping * gradient_scale,
            load_before=load_before,
        )

    def traker(self, proj_dim: int | None, warm_up: bool = False) -> Run:
        """traker at ``k = proj_dim`` (``None``: no projection), with its damping ``c²λ``."""
        return fastest(
            1 if warm_up else self.args.repeats,
            run_traker,
            self.traker_model,
            *self._data(warm_up),
            proj_dim,
            self.damping * traker_feature_scale(proj_dim, self.n_params),
            self.args.batch_size,
            self.args.traker_block_size,
            self.args.seed,
        )

    def datatrace(self, projector: str, proj_dim: int | None, warm_up: bool = False) -> Run:
        """datatrace with ``projector`` at ``k = proj_dim``, with damping ``λ``."""
        return fastest(
            1 if warm_up else self.args.repeats,
            run_datatrace,
            self.datatrace_model,
            *self._data(warm_up),
            projector,
            proj_dim,
            self.damping,
            self.args.batch_size,
            self.args.seed,
        )

    def _data(self, warm_up: bool) -> tuple[list[dict], Split, Split]:
        """Checkpoints, training set and targets: all of them, or a few for a warm-up."""
        if not warm_up:
            return self.checkpoints, self.train, self.targets
        return (
            self.checkpoints[:1],
            self.train.subset(np.arange(min(WARMUP_TRAIN, len(self.train)))),
            self.targets.subset(np.arange(min(WARMUP_TARGETS, len(self.targets)))),
        )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if trak is None:
        sys.exit(INSTALL_HINT)
    if trak.__version__ != TRAKER_VERSION:
        log(f"warning: traker {trak.__version__} found; this benchmark targets {TRAKER_VERSION}")
    torch.set_num_threads(args.threads)
    bench = Benchmark.prepare(args)

    log("warm-up")
    bench.traker(min(args.proj_dims), warm_up=True)
    for projector in ("dense", "sparse"):
        bench.datatrace(projector, min(args.proj_dims), warm_up=True)

    runs: list[Run] = []
    for proj_dim in args.proj_dims:
        log(f"k={proj_dim}: traker")
        runs.append(bench.traker(proj_dim))
        for projector in ("dense", "sparse"):
            log(f"k={proj_dim}: datatrace {projector}")
            runs.append(bench.datatrace(projector, proj_dim))
        log(f"k={proj_dim}: done ({', '.join(f'{r.seconds:.1f} s' for r in runs[-3:])})")

    exact = None
    if args.no_exact:
        exact_note = "exact kernel skipped (--no-exact)"
    elif bench.n_params > MAX_EXACT_PARAMS:
        gigabytes = 8 * bench.n_params**2 / 1e9
        exact_note = (
            f"exact kernel skipped: p = {bench.n_params:,} > {MAX_EXACT_PARAMS:,} (a "
            f"{gigabytes:.1f} GB float64 kernel, held several times); use a smaller --width"
        )
    else:
        log(f"exact kernel (no projection, p = {bench.n_params:,}): traker")
        runs.append(bench.traker(None))
        log("exact kernel: datatrace")
        exact = bench.datatrace("identity", None)
        runs.append(exact)
        exact_note = (
            f"exact = datatrace with projector='identity' (k = p = {bench.n_params:,}); "
            "traker's NoOpProjector is the same kernel in traker, a check of the damping "
            "conversion"
        )
    log("done")
    print_report(bench, runs, exact, exact_note)


def print_report(bench: Benchmark, runs: Sequence[Run], exact: Run | None, exact_note: str) -> None:
    """The settings, one table of every run, and notes on reading it (stdout)."""
    traker_runs = {run.proj_dim: run for run in runs if run.method.startswith("traker")}
    print("\n".join(settings_lines(bench)))
    print()
    print(results_table(bench, runs, traker_runs, exact))
    print()
    print("\n".join(note_lines(bench, traker_runs, exact_note)))


def settings_lines(bench: Benchmark) -> list[str]:
    """What ran, on what: machine, model, data, damping."""
    args = bench.args
    last_seed = args.seed + args.models - 1
    return [
        f"datatrace {dt.__version__} vs traker {trak.__version__}: TRAK on CPU, "
        f"{datetime.date.today().isoformat()}, {platform.machine()} with {os.cpu_count()} CPU "
        f"cores, torch {torch.__version__} with {torch.get_num_threads()} threads",
        f"model: digits {args.model} ({WIDTH_ARGUMENT[args.model]}={args.width}), "
        f"p = {bench.n_params:,} parameters; {args.models} checkpoints ({args.epochs} epochs, "
        f"seeds {args.seed}..{last_seed}, test accuracy "
        f"{min(bench.accuracies):.3f}–{max(bench.accuracies):.3f})",
        f"data: n_train = {args.n_train}, n_targets = {args.n_targets}, batch size "
        f"{args.batch_size}; traker: BasicProjector(normal, float32, block_size="
        f"{args.traker_block_size}), use_half_precision=False",
        f"damping: λ = {args.damping:g} · mean‖∇f‖² = {args.damping:g} · "
        f"{bench.gradient_scale:.4g} = {bench.damping:.4g} on datatrace's features "
        "(E[PPᵀ] = I), as damping_absolute; traker's features are √(k/p) times ours (1/√p "
        "without projection), so its lambda_reg = λ·k/p (λ/p)",
    ]


def results_table(
    bench: Benchmark, runs: Sequence[Run], traker_runs: dict[int, Run], exact: Run | None
) -> str:
    """One row per run: damping, times, and the median Spearman correlations."""

    def correlation(run: Run, reference: Run | None, first: bool) -> str:
        if reference is None or reference is run:
            return MISSING
        if first:
            return f"{median_spearman(run.first_scores, reference.first_scores):.3f}"
        return f"{median_spearman(run.scores, reference.scores):.3f}"

    rows = []
    for run in runs:
        same_k = traker_runs.get(run.proj_dim)
        rows.append(
            [
                str(run.proj_dim),
                run.method,
                f"{run.damping:.4g}",
                f"{run.seconds:.1f}",
                f"{run.cpu_seconds:.1f}",
                f"{same_k.seconds / run.seconds:.1f}×" if same_k else MISSING,
                correlation(run, same_k, first=True),
                correlation(run, same_k, first=False),
                correlation(run, exact, first=True),
                correlation(run, exact, first=False),
            ]
        )
    n_ckpts = bench.args.models
    headers = [
        "k",
        "method",
        "λ given",
        "time [s]",
        "cpu [s]",
        "traker/this",
        "ρ traker 1 ckpt",
        f"ρ traker {n_ckpts} ckpt",
        "ρ exact 1 ckpt",
        f"ρ exact {n_ckpts} ckpt",
    ]
    return format_table(headers, rows)


def note_lines(bench: Benchmark, traker_runs: dict[int, Run], exact_note: str) -> list[str]:
    """How to read the table, and the checkpoint weights traker used."""
    n_ckpts = bench.args.models
    lines = [
        "time: featurize + kernel + score of all checkpoints (wall clock, after a warm-up, "
        f"fastest of {bench.args.repeats}); traker/this: traker's time at the same k over this "
        f"row's; cpu: CPU time of the process over the same span (≈ {torch.get_num_threads()} × "
        "time when no other process shares the cores; load average "
        f"{bench.load_before} at the start, {_load_average()} at the end).",
        "ρ: median over targets of the Spearman correlation of the training examples' scores, "
        f"against traker at the same k or the exact kernel; {exact_note}.",
        f"1 ckpt: the first checkpoint alone; {n_ckpts} ckpt: the ensemble. datatrace weights "
        "checkpoints equally; traker divides each inverse kernel by its mean |entry|, i.e. "
        "weights checkpoint c by 1/mean|(X_cᵀX_c + λI)⁻¹|. Its weights (mean 1):",
    ]
    for proj_dim, run in traker_runs.items():
        weights = ", ".join(f"{weight:.2f}" for weight in run.checkpoint_weights)
        lines.append(f"  k={proj_dim}: {weights}")
    return lines


if __name__ == "__main__":
    main()
