"""How close featurizing comes to the limit, one training epoch, on four model sizes.

    python benchmarks/perf_featurize.py                      # MLP, 2-D CNN, ResNet-18, GPT-2 small
    python benchmarks/perf_featurize.py --models mlp cnn --repeats 2
    python benchmarks/perf_featurize.py --models resnet18 gpt2 --n-train resnet18=64 gpt2=16

For each model (deterministic random initialisation, random inputs and labels: the cost of the
arithmetic does not depend on what the model has learnt) one table, every row on the same
examples, batch size ``B`` and ``k``:

* ``epoch`` (the limit): one training epoch over the examples — forward, backward of the task's
  loss (mean cross-entropy of the batch; of its continuation tokens for the language model) and
  an SGD step, batch ``B``, the model in eval mode (BatchNorm uses its running statistics and
  dropout is off, as in the gradients TRAK takes);
* ``per-example grads``: ``torch.func`` ``vmap(grad)`` of the task's output over the same batches
  (datatrace's :class:`~datatrace.grads.PerExampleGradients`, the first stage of ``sparse``), the
  gradients discarded: a reference, not an attribution;
* ``sparse``, ``dense``, ``tensorsketch``, ``factgrass``, ``factorized``:
  ``datatrace.TRAK(model, task, projector=..., proj_dim=k, batch_size=B, progress=False).fit``
  with TRAK's default kernel (Gauss–Newton ``ΦᵀRΦ`` for these tasks; ``factgrass-plain``: the
  same fit with ``kernel_weights=None``, the plain ``ΦᵀΦ``),
  on one checkpoint (the model as it is) with an in-memory store: the features and the kernel.
  ``sparse`` and ``dense`` project per-example gradients; the other three are the per-layer
  factorised projections of ``datatrace.grads.factorized``. ``dense`` is
  ``DenseProjector(k, regenerate=True)``: above its 1 GiB cache (``4·p·k`` bytes) the matrix is
  generated again for every batch, which ``projector="dense"`` refuses;
* ``traker``: traker 0.3.2's ``featurize`` over the same batches then ``finalize_features`` (its
  kernel), with its CPU ``BasicProjector`` (dense Gaussian, float32, ``block_size=100``),
  ``use_half_precision=False``, task ``"image_classification"``; it has no causal-LM task.

Every row runs in a fresh subprocess (``--one MODEL ROW``), its BLAS (numpy's and scipy's) held
to ``--threads`` threads like torch, so that rows do not share allocator state or caches; in it
the model and data are built, ``ru_maxrss`` is read (the baseline), one warm-up call on
``min(WARMUP_EXAMPLES, B)`` examples takes the one-time costs (first vmap trace, lazy imports,
allocator growth), then the row is timed ``--repeats`` times and the fastest kept.
Reported: that wall time, the CPU time of the same call (≈ threads × wall when the cores were
free), the wall time over the epoch's, for the datatrace rows the part of it spent featurizing
(``GradientFeatures.featurize_train``: the split's pilot pass, the first batch's safety check,
features and ``Q`` of every example written to the store; the rest is the kernel: ``ΦᵀΦ`` or
``ΦΦᵀ`` in float64, its statistics and Cholesky factor) and that over the epoch's, and the peak
RSS above the baseline (``ru_maxrss`` at the end minus the baseline, the RSS after building
model and data, with the peak reset there on Linux; warm-up and every repeat included). Rows
whose estimated time exceeds ``--estimate-cap`` (the dense ones: ``p·k`` Gaussians generated per
batch and ``2·n·p·k`` multiply-adds, at rates measured on this machine, plus the
per-example-gradient row) are skipped with the estimate; every row is killed after
``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

ROWS = (
    "epoch", "grads", "sparse", "dense", "tensorsketch", "factgrass", "factgrass-plain",
    "factorized", "traker",
)  # fmt: skip
DATATRACE_PROJECTORS = (
    "sparse", "dense", "tensorsketch", "factgrass", "factgrass-plain", "factorized",
)  # fmt: skip
ROW_LABEL = {
    "epoch": "epoch (limit)",
    "grads": "per-example grads (vmap)",
    "sparse": "TRAK sparse",
    "dense": "TRAK dense",
    "tensorsketch": "TRAK tensorsketch",
    "factgrass": "TRAK factgrass",
    "factgrass-plain": "TRAK factgrass, plain kernel",
    "factorized": "TRAK factorized",
    "traker": "traker 0.3.2 BasicProjector",
}
# Examples of the warm-up call in each subprocess: enough to run every code path once.
WARMUP_EXAMPLES = 16
# traker's own default: its dense matrix is generated in blocks of this many columns.
TRAKER_BLOCK_SIZE = 100
# DenseProjector's default cache: above it the matrix is regenerated for every batch.
DENSE_CACHE_BYTES = 1 << 30
GPT2_SEQ_LEN = 128  # the sequence length (the runs before 2026-12-04 used 64)
RESULT_PREFIX = "RESULT "


def load_average() -> str:
    try:
        return ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- models and data


class ResidualBlock(nn.Module):
    """ResNet's basic block: two 3×3 convolutions with BatchNorm, identity or 1×1 shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.bn1(self.conv1(inputs)))
        return F.relu(self.bn2(self.conv2(hidden)) + self.shortcut(inputs))


class ResNet18(nn.Module):
    """The CIFAR ResNet-18 (3×3 stem, no max-pool, 2-2-2-2 blocks of 64-128-256-512 channels):
    11.2M parameters for 10 classes."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64))
        blocks, in_channels = [], 64
        for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [
                ResidualBlock(in_channels, channels, stride),
                ResidualBlock(channels, channels, 1),
            ]
            in_channels = channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(512, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.blocks(F.relu(self.stem(images)))
        return self.head(F.adaptive_avg_pool2d(hidden, 1).flatten(1))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
        nn.Linear(1024, 10),
    )  # fmt: skip


def cnn() -> nn.Module:
    """Two 3×3 convolutions (32, 64 channels, each followed by 2×2 max-pooling), two linear
    layers: 421,642 parameters on 1×28×28."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def gpt2_small() -> nn.Module:
    """GPT-2 small (GPT2Config's default sizes: 124M parameters), eager attention for vmap."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(attn_implementation="eager"))


def image_examples(n: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn((n, *shape), generator=generator)
    return images, torch.randint(0, 10, (n,), generator=generator)


def token_examples(n: int) -> dict[str, torch.Tensor]:
    """``n`` sequences of ``GPT2_SEQ_LEN`` tokens: a BOS prompt, then random tokens to attribute."""
    from datatrace.tasks import causal_lm_examples

    generator = torch.Generator().manual_seed(1)
    bos = 50256
    continuations = torch.randint(0, bos, (n, GPT2_SEQ_LEN - 1), generator=generator).tolist()
    return causal_lm_examples([[bos]] * n, continuations, pad_token_id=bos)


def classification_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def causal_lm_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())


@dataclass
class ModelSpec:
    """A model family: how to build it, its examples, task and loss, and default sizes."""

    title: str
    build: Callable[[], nn.Module]
    examples: Callable[[int], Any]
    language_model: bool
    n_train: int
    batch_size: int


MODELS = {
    "mlp": ModelSpec("MLP 784-1024-1024-10", mlp, lambda n: image_examples(n, (1, 28, 28)),
                     False, 2000, 256),
    "cnn": ModelSpec("2-D CNN (2 conv + 2 linear) on 1×28×28", cnn,
                     lambda n: image_examples(n, (1, 28, 28)), False, 2000, 256),
    "resnet18": ModelSpec("ResNet-18 (CIFAR layout, BatchNorm in eval mode) on 3×32×32",
                          ResNet18, lambda n: image_examples(n, (3, 32, 32)), False, 256, 32),
    "gpt2": ModelSpec(f"GPT-2 small (random init), CausalLM on {GPT2_SEQ_LEN}-token sequences",
                      gpt2_small, token_examples, True, 64, 8),
}  # fmt: skip


def subset(examples: Any, stop: int) -> Any:
    if isinstance(examples, dict):
        return {key: value[:stop] for key, value in examples.items()}
    return tuple(value[:stop] for value in examples)


def batches(examples: Any, batch_size: int):
    n = len(examples["input_ids"]) if isinstance(examples, dict) else len(examples[0])
    for lo in range(0, n, batch_size):
        if isinstance(examples, dict):
            yield {key: value[lo : lo + batch_size] for key, value in examples.items()}
        else:
            yield tuple(value[lo : lo + batch_size] for value in examples)


# ---------------------------------------------------------------- one row (in a subprocess)


def make_row(name: str, spec: ModelSpec, model: nn.Module, proj_dim: int) -> Callable[[Any], None]:
    """The work of row ``name``, as a function of the examples it runs on."""
    import datatrace as dt
    from datatrace.grads import DenseProjector, PerExampleGradients, select_parameters

    task = dt.CausalLM() if spec.language_model else dt.Classification()
    batch_size = spec.batch_size
    if name == "epoch":
        loss_of = causal_lm_loss if spec.language_model else classification_loss
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

        def epoch(examples: Any) -> None:
            for batch in batches(examples, batch_size):
                optimizer.zero_grad()
                loss_of(model, batch).backward()
                optimizer.step()

        return epoch
    if name == "grads":
        gradients = PerExampleGradients(model, task, select_parameters(model))
        state = model.state_dict()

        def per_example(examples: Any) -> None:
            for batch in batches(examples, batch_size):
                gradients.gradients(state, batch)

        return per_example
    if name in DATATRACE_PROJECTORS:
        from datatrace.grads.featurize import GradientFeatures

        projector = DenseProjector(proj_dim, regenerate=True) if name == "dense" else name
        # TRAK's default kernel (Gauss–Newton for these classification and LM tasks), or ΦᵀΦ
        kernel_weights = "auto"
        if name == "factgrass-plain":
            projector, kernel_weights = "factgrass", None
        featurize_train = GradientFeatures.featurize_train

        def timed_featurize_train(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return featurize_train(self, *args, **kwargs)
            finally:
                fit.feature_seconds = time.perf_counter() - start

        GradientFeatures.featurize_train = timed_featurize_train

        def fit(examples: Any) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dt.TRAK(
                    model, task, proj_dim=proj_dim, projector=projector,
                    kernel_weights=kernel_weights, batch_size=batch_size, progress=False,
                ).fit(examples)  # fmt: skip

        return fit
    if name == "traker":
        return traker_row(model, proj_dim, batch_size)
    raise ValueError(f"unknown row {name!r}")


def traker_row(model: nn.Module, proj_dim: int, batch_size: int) -> Callable[[Any], None]:
    import contextlib
    import io
    import logging

    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    n_params = sum(param.numel() for param in model.parameters())
    checkpoint = {key: value.clone() for key, value in model.state_dict().items()}

    def featurize(examples: tuple[torch.Tensor, torch.Tensor]) -> None:
        with tempfile.TemporaryDirectory() as save_dir:
            projector = BasicProjector(
                grad_dim=n_params, proj_dim=proj_dim, seed=0, proj_type=ProjectionType.normal,
                device="cpu", block_size=TRAKER_BLOCK_SIZE, dtype=torch.float32,
            )  # fmt: skip
            traker = TRAKer(
                model=model, task="image_classification", train_set_size=len(examples[1]),
                save_dir=save_dir, device="cpu", projector=projector,
                use_half_precision=False, logging_level=logging.WARNING,
            )  # fmt: skip
            traker.load_checkpoint(checkpoint, model_id=0)
            for batch in batches(examples, batch_size):
                traker.featurize(batch=batch, num_samples=len(batch[1]))
            with contextlib.redirect_stderr(io.StringIO()):  # its one-step progress bars
                traker.finalize_features()

    return featurize


def reset_peak_rss() -> None:
    """Lower ``ru_maxrss`` to the current RSS (Linux: ``5`` in ``/proc/self/clear_refs`` resets
    the peak), so that transient allocations of building the model and data are not in the
    baseline; elsewhere the baseline is the peak so far."""
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def run_one(model_name: str, row: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build, warm up, time row ``row`` of ``model_name``; the numbers the driver tabulates."""
    torch.set_num_threads(args.threads)
    spec = MODELS[model_name]
    spec.n_train, spec.batch_size = args.n_train[model_name], args.batch_size[model_name]
    torch.manual_seed(0)
    model = spec.build().eval()
    examples = spec.examples(spec.n_train)
    work = make_row(row, spec, model, args.proj_dim)
    reset_peak_rss()
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # At most one batch, so that a small n is not featurized twice over.
    work(subset(examples, min(WARMUP_EXAMPLES, spec.batch_size, spec.n_train)))
    best = None
    for _ in range(args.repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        work(examples)
        timing = (
            time.perf_counter() - wall,
            time.process_time() - cpu,
            getattr(work, "feature_seconds", None),
        )
        if best is None or timing[0] < best[0]:
            best = timing
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "seconds": best[0],
        "cpu_seconds": best[1],
        "feature_seconds": best[2],
        "peak_mib": (peak_kib - baseline_kib) / 1024,
        "baseline_mib": baseline_kib / 1024,
    }


# ---------------------------------------------------------------- the driver


@dataclass
class Rates:
    """This machine's speed at the two operations that dominate a dense projection."""

    gaussians_per_s: float
    flops_per_s: float

    @classmethod
    def measure(cls, threads: int) -> Rates:
        torch.set_num_threads(threads)
        block = torch.empty(1 << 24)
        start = time.perf_counter()
        block.normal_(generator=torch.Generator().manual_seed(0))
        gaussians = block.numel() / (time.perf_counter() - start)
        left, right = torch.randn(256, 8192), torch.randn(8192, 2048)
        left @ right
        start = time.perf_counter()
        left @ right
        flops = 2 * 256 * 8192 * 2048 / (time.perf_counter() - start)
        return cls(gaussians, flops)

    def dense_seconds(self, n: int, batch_size: int, n_params: int, proj_dim: int) -> float:
        """Generating ``p·k`` Gaussians per batch and ``2·n·p·k`` multiply-add flops."""
        n_batches = -(-n // batch_size)
        return n_batches * n_params * proj_dim / self.gaussians_per_s + (
            2 * n * n_params * proj_dim / self.flops_per_s
        )


def count_parameters(model_name: str) -> int:
    torch.manual_seed(0)
    return sum(param.numel() for param in MODELS[model_name].build().parameters())


def child_command(model_name: str, row: str, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, os.path.abspath(__file__), "--one", model_name, row,
        "--proj-dim", str(args.proj_dim), "--repeats", str(args.repeats),
        "--threads", str(args.threads),
        "--n-train", f"{model_name}={args.n_train[model_name]}",
        "--batch-size", f"{model_name}={args.batch_size[model_name]}",
    ]  # fmt: skip


def blas_threads(threads: int) -> dict[str, str]:
    """Environment that holds numpy's and scipy's BLAS to ``threads`` threads, as torch is (the
    kernel's Gram and Cholesky factor are numpy/scipy calls, which would otherwise take every
    core while the epoch takes ``threads``): read when the child imports numpy."""
    return {
        name: str(threads)
        for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")
    }


def run_child(model_name: str, row: str, args: argparse.Namespace) -> dict[str, Any]:
    """Row ``row`` in a fresh interpreter; ``{"note": ...}`` if it failed or ran out of time."""
    try:
        done = subprocess.run(
            child_command(model_name, row, args), capture_output=True, text=True,
            timeout=args.timeout, env={**os.environ, **blas_threads(args.threads)},
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"note": f"did not finish in {args.timeout:.0f} s (with build and warm-up)"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    error = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"note": f"failed (exit {done.returncode}): {error[:200]}"}


def skip_reason(
    model_name: str, row: str, n_params: int, grads_seconds: float | None, args, rates: Rates
) -> str | None:
    """Why row ``row`` is not run, or ``None``."""
    spec_n, batch_size = args.n_train[model_name], args.batch_size[model_name]
    if row == "traker" and MODELS[model_name].language_model:
        return "not run: traker 0.3.2 has no causal-LM task"
    if row not in ("dense", "traker"):
        return None
    matrix_bytes = 4 * n_params * args.proj_dim
    if row == "dense" and matrix_bytes <= DENSE_CACHE_BYTES:
        return None  # generated once
    if row == "traker" and 4 * n_params * TRAKER_BLOCK_SIZE > args.traker_block_limit:
        return (
            f"not run: its p × {TRAKER_BLOCK_SIZE} float32 block is "
            f"{4 * n_params * TRAKER_BLOCK_SIZE / 2**30:.1f} GiB"
        )
    estimate = rates.dense_seconds(spec_n, batch_size, n_params, args.proj_dim)
    estimate += grads_seconds or 0.0
    if estimate > args.estimate_cap:
        return f"not run: estimated {estimate:,.0f} s > {args.estimate_cap:.0f} s"
    return None


def format_table(rows: list[dict[str, Any]], epoch_seconds: float | None) -> str:
    lines = [
        "| row | s | CPU s | ÷ epoch | features s | ÷ epoch | peak MiB | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]

    def ratio(seconds: float | None) -> str:
        return f"{seconds / epoch_seconds:.1f}×" if epoch_seconds and seconds else "—"

    for row in rows:
        if "seconds" in row:
            features = row.get("feature_seconds")
            lines.append(
                f"| {ROW_LABEL[row['row']]} | {row['seconds']:.2f} | {row['cpu_seconds']:.1f} | "
                f"{ratio(row['seconds'])} | {f'{features:.2f}' if features else '—'} | "
                f"{ratio(features)} | {row['peak_mib']:,.0f} | {row.get('note', '')} |"
            )
        else:
            lines.append(f"| {ROW_LABEL[row['row']]} | — | — | — | — | — | — | {row['note']} |")
    return "\n".join(lines)


def run_model(model_name: str, args: argparse.Namespace, rates: Rates) -> None:
    spec = MODELS[model_name]
    n, batch_size = args.n_train[model_name], args.batch_size[model_name]
    n_params = count_parameters(model_name)
    log(f"{model_name}: p = {n_params:,}, n = {n}, B = {batch_size}, load {load_average()}")
    results, grads_seconds, epoch_seconds, baseline = [], None, None, None
    for row in args.rows:
        reason = skip_reason(model_name, row, n_params, grads_seconds, args, rates)
        if reason:
            result = {"note": reason}
        else:
            log(f"{model_name}: {row}")
            result = run_child(model_name, row, args)
            log(f"{model_name}: {row}: {result}")
        if (
            row == "dense"
            and "seconds" in result
            and 4 * n_params * args.proj_dim > DENSE_CACHE_BYTES
        ):
            result["note"] = (
                f"p×k×4 = {4 * n_params * args.proj_dim / 2**30:.1f} GiB > 1 GiB: "
                "regenerated per batch (regenerate=True)"
            )
        if row == "grads" and "seconds" in result:
            grads_seconds = result["seconds"]
        if row == "epoch" and "seconds" in result:
            epoch_seconds = result["seconds"]
        baseline = result.get("baseline_mib", baseline)
        results.append({"row": row, **result})
    print(f"\n### {model_name}: {spec.title}\n")
    what = f"{n:,} {'sequences' if spec.language_model else 'examples'}"
    baseline_text = f"; baseline RSS {baseline:,.0f} MiB" if baseline else ""
    print(
        f"p = {n_params:,} parameters, {what}, batch {batch_size}, k = {args.proj_dim}, "
        f"{args.threads} threads{baseline_text}; load average at the end: {load_average()}\n"
    )
    print(format_table(results, epoch_seconds))
    sys.stdout.flush()


def model_values(text: Sequence[str], default: dict[str, int], flag: str) -> dict[str, int]:
    """``["256"]`` (every model) or ``["resnet18=64", "gpt2=16"]`` over the defaults."""
    values = dict(default)
    for item in text:
        name, _, value = item.rpartition("=")
        if name and name not in MODELS:
            raise SystemExit(f"{flag}: unknown model {name!r} (choose from {', '.join(MODELS)})")
        for key in [name] if name else list(MODELS):
            values[key] = int(value)
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument(
        "--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows to run (default: all)"
    )
    parser.add_argument(
        "--n-train",
        nargs="+",
        default=[],
        help="examples: one number for every model, or MODEL=N ... (defaults: "
        + ", ".join(f"{k} {v.n_train}" for k, v in MODELS.items())
        + ")",
    )
    parser.add_argument(
        "--batch-size",
        nargs="+",
        default=[],
        help="batch size B, as --n-train (defaults: "
        + ", ".join(f"{k} {v.batch_size}" for k, v in MODELS.items())
        + ")",
    )
    parser.add_argument("--proj-dim", type=int, default=2048, help="k")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed calls per row, the fastest kept (for a shared machine)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--timeout",
        type=float,
        default=600,
        help="seconds after which a row's subprocess is killed",
    )
    parser.add_argument(
        "--estimate-cap",
        type=float,
        default=300,
        help="skip a dense row (regenerated matrix, traker) estimated above this",
    )
    parser.add_argument(
        "--traker-block-limit",
        type=float,
        default=4 * 2**30,
        help="skip traker when its p × 100 block exceeds this many bytes",
    )
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "ROW"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)  # fmt: skip
    args.n_train = model_values(
        args.n_train, {k: v.n_train for k, v in MODELS.items()}, "--n-train"
    )
    args.batch_size = model_values(
        args.batch_size, {k: v.batch_size for k, v in MODELS.items()}, "--batch-size"
    )
    if args.repeats < 1 or args.proj_dim < 1:
        parser.error("--repeats and --proj-dim must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        model_name, row = args.one
        print(RESULT_PREFIX + json.dumps(run_one(model_name, row, args)), flush=True)
        return
    rates = Rates.measure(args.threads)
    print(
        f"perf_featurize.py, {datetime.date.today().isoformat()}, {platform.machine()} with "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} threads; "
        f"load average at the start: {load_average()}"
    )
    print(
        f"measured here: {rates.gaussians_per_s / 1e6:,.0f} M Gaussians/s, "
        f"{rates.flops_per_s / 1e9:,.0f} GFLOP/s (float32 matmul); fastest of {args.repeats}; "
        f"timeout {args.timeout:.0f} s per row, estimate cap {args.estimate_cap:.0f} s"
    )
    for model_name in args.models:
        run_model(model_name, args, rates)
    print(
        f"\nfit s: wall seconds of the row's call on all examples, in its own subprocess, after "
        f"a warm-up call on min({WARMUP_EXAMPLES}, B) examples (fastest of {args.repeats}); "
        f"CPU s: the process's CPU time over the same call (≈ {args.threads} × fit s on free "
        "cores); "
        "÷ epoch: fit s over the epoch row's; peak MiB: ru_maxrss at the end minus ru_maxrss "
        "after imports, model and data (the peak reset there).\n"
        f"load average at the end: {load_average()}"
    )


if __name__ == "__main__":
    main()
