"""Queries past RAM: streamed exact top-k over a million stored training examples, FAISS
recall@10 against it and its speed-up, and a streamed score matrix written to the store.

Synthetic features stand in for a model's (the model is not the point here): low-rank plus
noise, ``Φ = Z W + σ E`` with ``Z`` ``(n, rank)`` (around one of ``--clusters`` centres, as
gradients group by class), ``W`` ``(rank, k)`` and ``E`` Gaussian, written
chunk by chunk into a datatrace store as featurization would; ``Q`` uniform in
``[0.05, 1]``. Targets are drawn the same way. The kernel is built from the stored features as
``TRAK.fit`` builds it (the Gram ``ΦᵀΦ`` from the stored chunks, the default damping rule), and
the queries are the library's (:mod:`datatrace.methods.retrieval`,
:mod:`datatrace.methods.faiss_index`): what
``TRAK.top_k``, ``TRAK.faiss_index`` and ``TRAK.score(out=...)`` run once the targets are
featurized.

Each measured phase runs in a fresh process, so that its peak resident memory
(``getrusage``) is its own; ``tracemalloc`` adds the peak of numpy's allocations (torch's are
not traced). On a shared machine wall time depends on the other jobs: each phase also reports
its CPU seconds and the 1-minute load average at its end.

Usage: .venv/bin/python benchmarks/scale.py [--n-train 1000000] [--n-targets 10000]
           [--proj-dim 1024] [--store DIR --keep | --reuse-store] [--nprobe 8 32]
           [--write-targets 256] [--no-faiss] [--reuse-exact]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Chunks of features generated (and written) at once: rows of the store's chunks.
GENERATE_ROWS = 4096


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=1_000_000)
    parser.add_argument("--n-targets", type=int, default=10_000)
    parser.add_argument("--proj-dim", type=int, default=1024, help="k")
    parser.add_argument("--rank", type=int, default=64, help="rank of the shared structure")
    parser.add_argument("--noise", type=float, default=0.5, help="σ, against unit-scale structure")
    parser.add_argument(
        "--clusters", type=int, default=100, help="groups of similar examples (classes)"
    )
    parser.add_argument(
        "--spread", type=float, default=0.5, help="spread within a group, against its centre's"
    )
    parser.add_argument("--chunk-rows", type=int, default=512, help="rows per stored chunk")
    parser.add_argument("--k", type=int, default=10, help="top-k")
    parser.add_argument("--memory-budget", type=int, default=None, help="bytes (default 1 GiB)")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: auto)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32], help="lists probed")
    parser.add_argument(
        "--write-targets",
        type=int,
        default=256,
        help="targets whose full score rows are streamed into the store (0: skip)",
    )
    parser.add_argument("--store", default=None, help="store directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    parser.add_argument(
        "--reuse-store", action="store_true", help="use the features already in --store"
    )
    parser.add_argument("--no-faiss", action="store_true", help="skip the FAISS rows")
    parser.add_argument(
        "--reuse-exact",
        action="store_true",
        help="take the exact top-k (and its timing) of an earlier run on the same --store",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


# -- the phases, each in its own process ---------------------------------------------------------


def in_child(function, *args) -> dict[str, Any]:
    """Run ``function(*args)`` in a fresh process; its result dict plus its peak memory."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_measured, (function, *args))


def _measured(function, *args) -> dict[str, Any]:
    torch.set_num_threads(args[0].threads)
    import datatrace.methods.retrieval  # noqa: F401  (imports counted in the baseline, not the phase)

    before = resource.getrusage(resource.RUSAGE_SELF)
    baseline = before.ru_maxrss * 1024
    tracemalloc.start()
    result = function(*args)
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    after = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    result["load"] = os.getloadavg()[0]
    result["peak_rss"] = after.ru_maxrss * 1024
    result["baseline_rss"] = baseline
    result["numpy_peak"] = traced
    return result


def structure(args: argparse.Namespace) -> np.ndarray:
    """``W`` ``(rank, k)``: the directions shared by training examples and targets."""
    generator = np.random.default_rng([args.seed, 0])
    return generator.standard_normal((args.rank, args.proj_dim)).astype(np.float32) / np.sqrt(
        args.rank
    )


def synthetic_rows(args: argparse.Namespace, stream: int, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of stream ``stream`` (0: training, 1: targets): the same rows
    however a query blocks them (generated in aligned blocks of :data:`GENERATE_ROWS`)."""
    blocks = []
    for first in range(start // GENERATE_ROWS * GENERATE_ROWS, stop, GENERATE_ROWS):
        block = _generated_block(args, stream, first)
        blocks.append(block[max(start - first, 0) : min(stop - first, GENERATE_ROWS)])
    return np.concatenate(blocks)


def _generated_block(args: argparse.Namespace, stream: int, first: int) -> np.ndarray:
    generator = np.random.default_rng([args.seed, stream + 1, first])
    centres = np.random.default_rng([args.seed, 1]).standard_normal((args.clusters, args.rank))
    members = generator.integers(0, args.clusters, GENERATE_ROWS)
    latent = centres[members] + args.spread * generator.standard_normal((GENERATE_ROWS, args.rank))
    latent = latent.astype(np.float32) / np.sqrt(1 + args.spread**2)
    noise = generator.standard_normal((GENERATE_ROWS, args.proj_dim), dtype=np.float32)
    return latent @ structure(args) + args.noise * noise / np.sqrt(args.proj_dim)


def build_store(args: argparse.Namespace) -> dict[str, Any]:
    """Write the synthetic training features into the store; build the Gram and statistics."""
    from datatrace.store import Store

    store = Store(args.store)
    part = store.checkpoint_features(
        0, args.n_train, args.proj_dim, args.chunk_rows, {"synthetic": args.seed}
    )
    generator = np.random.default_rng([args.seed, 9])
    out_to_loss = generator.uniform(0.05, 1.0, args.n_train).astype(np.float32)
    started = time.perf_counter()
    per_block = max(1, GENERATE_ROWS // args.chunk_rows)
    for first in range(0, part.n_chunks, per_block):
        chunks = range(first, min(first + per_block, part.n_chunks))
        start, stop = part.rows(chunks[0])[0], part.rows(chunks[-1])[1]
        features = synthetic_rows(args, 0, start, stop)
        for chunk in chunks:
            lo, hi = part.rows(chunk)
            part.write(chunk, features[lo - start : hi - start], out_to_loss[lo:hi])
    written = time.perf_counter() - started
    started = time.perf_counter()
    part.gram()
    part.statistics()
    kernel_time = time.perf_counter() - started
    size = sum(file.stat().st_size for file in Path(args.store).rglob("*") if file.is_file())
    return {"write_s": written, "kernel_s": kernel_time, "store_bytes": size}


def open_scores(args: argparse.Namespace):
    """The ensemble (one checkpoint) over the stored features, as TRAK builds it."""
    from datatrace.methods.kernel import Kernel, damping_from_features, uses_dual
    from datatrace.methods.retrieval import EnsembleScores
    from datatrace.store import Store

    store = Store(args.store)
    part = store.checkpoint_features(
        0, args.n_train, args.proj_dim, args.chunk_rows, {"synthetic": args.seed}
    )
    dual = uses_dual(args.proj_dim, args.n_train)
    kernel = Kernel(part.gram(dual), damping_from_features(part.statistics(), 1), dual)
    return EnsembleScores([kernel], [part], part.out_to_loss[:][None, :])


def featurizer(args: argparse.Namespace):
    def featurize(start: int, stop: int) -> list[torch.Tensor]:
        return [torch.from_numpy(synthetic_rows(args, 1, start, stop))]

    return featurize


def budget(args: argparse.Namespace) -> int:
    from datatrace.methods.retrieval import DEFAULT_MEMORY_BUDGET

    return DEFAULT_MEMORY_BUDGET if args.memory_budget is None else args.memory_budget


def exact_top_k(args: argparse.Namespace, out: str) -> dict[str, Any]:
    from datatrace.methods.retrieval import stream_top_k
    from datatrace.store.scores import score_chunks

    scores = open_scores(args)
    _, width = score_chunks(args.n_targets, args.n_train, args.chunk_rows)
    rows = scores.block_rows(budget(args), args.n_targets, width, top_k=args.k)
    started = time.perf_counter()
    top = stream_top_k(scores, featurizer(args), args.n_targets, args.k, width, budget(args))
    seconds = time.perf_counter() - started
    np.savez(out, pro=top.proponents.indices, opp=top.opponents.indices)
    return {
        "seconds": seconds,
        "block_rows": rows,
        "width": width,
        "estimate": scores.block_bytes(rows, width, top_k=args.k),
    }


def faiss_top_k(args: argparse.Namespace, exact: str) -> dict[str, Any]:
    from datatrace.methods.faiss_index import FaissIndex, faiss_top_k

    scores = open_scores(args)
    factory = "auto" if args.nlist is None else f"IVF{args.nlist},Flat"
    started, cpu_started = time.perf_counter(), cpu_seconds()
    index = FaissIndex(scores, factory, nprobe=args.nprobe[0], seed=args.seed)
    build = time.perf_counter() - started
    build_cpu = cpu_seconds() - cpu_started
    reference = np.load(exact)
    rows = []
    for nprobe in args.nprobe:
        import faiss

        faiss.extract_index_ivf(index.index).nprobe = nprobe
        started, cpu_started = time.perf_counter(), cpu_seconds()
        top = faiss_top_k(scores, index, featurizer(args), args.n_targets, args.k, budget(args))
        seconds = time.perf_counter() - started
        rows.append(
            {
                "nprobe": nprobe,
                "seconds": seconds,
                "cpu_s": cpu_seconds() - cpu_started,
                "load": os.getloadavg()[0],
                "recall_pro": recall(top.proponents.indices, reference["pro"]),
                "recall_opp": recall(top.opponents.indices, reference["opp"]),
            }
        )
    return {"build_s": build, "build_cpu_s": build_cpu, "factory": index.factory, "rows": rows}


def cpu_seconds() -> float:
    """CPU seconds of this process so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_scores(args: argparse.Namespace) -> dict[str, Any]:
    from datatrace.methods.retrieval import write_scores
    from datatrace.store import Store
    from datatrace.store.scores import ScoreMatrix, score_chunks

    scores = open_scores(args)
    n_targets = args.write_targets
    chunks = score_chunks(n_targets, args.n_train, args.chunk_rows)
    store = Store(args.store)
    name = f"streamed_{n_targets}"
    if f"scores/{name}" in store.root:
        del store.root[f"scores/{name}"]
    matrix = ScoreMatrix.create(
        store,
        name,
        (n_targets, args.n_train),
        chunks,
        {"synthetic": args.seed},
        scores.mean_out_to_loss,
        "TRAK",
    )
    started = time.perf_counter()
    write_scores(scores, matrix, featurizer(args), budget(args))
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    matrix.columns(0, chunks[1])
    column_read = time.perf_counter() - started
    started = time.perf_counter()
    matrix.rows(0, min(n_targets, chunks[0]))
    row_read = time.perf_counter() - started
    path = Path(args.store) / "scores" / name
    size = sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
    return {
        "seconds": seconds,
        "bytes": size,
        "chunks": chunks,
        "column_read_s": column_read,
        "row_read_s": row_read,
    }


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over targets of |found ∩ exact| / k."""
    hits = [len(np.intersect1d(f, e)) for f, e in zip(found, exact)]
    return float(np.mean(hits) / exact.shape[1])


# -- the report ----------------------------------------------------------------------------------


def gib(count: float) -> str:
    return f"{count / 2**30:.2f} GiB"


def cpu(phase: dict[str, Any]) -> str:
    return f"{phase['cpu_s']:.0f}, {phase['load']:.1f}"


def main() -> None:
    args = parse_args()
    temporary = args.store is None
    if temporary:
        args.store = tempfile.mkdtemp(prefix="datatrace-scale-") + "/store"
    load_before = os.getloadavg()
    print(
        f"n_train={args.n_train:,} n_targets={args.n_targets:,} k={args.proj_dim} "
        f"rank={args.rank} noise={args.noise} chunk_rows={args.chunk_rows} top-{args.k}, "
        f"{args.threads} threads; load average {load_before[0]:.2f} {load_before[1]:.2f} "
        f"{load_before[2]:.2f}",
        flush=True,
    )
    try:
        if args.reuse_store and Path(args.store).is_dir():
            built = {"write_s": float("nan"), "kernel_s": float("nan"), "store_bytes": 0}
            built["store_bytes"] = sum(
                file.stat().st_size for file in Path(args.store).rglob("*") if file.is_file()
            )
        else:
            built = in_child(build_store, args)
        print(
            f"store: {gib(built['store_bytes'])} written in {built['write_s']:.1f} s; Gram and "
            f"statistics {built['kernel_s']:.1f} s",
            flush=True,
        )
        reference = str(Path(args.store).parent / "exact_top_k.npz")
        timings = Path(args.store).parent / "exact_top_k.json"
        if args.reuse_exact and timings.is_file():
            exact = json.loads(timings.read_text())
        else:
            exact = in_child(exact_top_k, args, reference)
            timings.write_text(json.dumps(exact))
        print(f"exact streamed top-{args.k}: {exact['seconds']:.1f} s", flush=True)
        found = None
        try:
            import faiss  # noqa: F401

            if not args.no_faiss:
                found = in_child(faiss_top_k, args, reference)
        except ImportError:
            print("faiss is not installed (pip install 'datatrace[faiss]'): FAISS rows skipped")
        written = in_child(write_scores, args) if args.write_targets else None
    finally:
        load_after = os.getloadavg()
        if temporary and not args.keep:
            shutil.rmtree(Path(args.store).parent, ignore_errors=True)

    full_matrix = args.n_targets * args.n_train * 4
    print()
    print(
        "| query | wall (s) | ÷ exact | phase CPU (s), load | peak RSS (phase − imports) "
        "| recall@10 (pro / opp) |"
    )
    print("|---|---|---|---|---|---|")
    phase_memory = exact["peak_rss"] - exact["baseline_rss"]
    print(
        f"| exact streamed top-{args.k} (blocks of {exact['block_rows']} targets × "
        f"{exact['width']} columns) | {exact['seconds']:.1f} | 1.00 | {cpu(exact)} | "
        f"{gib(phase_memory)} (numpy peak {gib(exact['numpy_peak'])}; estimate "
        f"{gib(exact['estimate'])}) | 1 / 1 |"
    )
    if found is not None:
        faiss_memory = found["peak_rss"] - found["baseline_rss"]
        for row in found["rows"]:
            print(
                f"| FAISS {found['factory']} nprobe={row['nprobe']} | {row['seconds']:.1f} "
                f"| {row['seconds'] / exact['seconds']:.3f} | {cpu(row)} (CPU speed-up "
                f"{exact['cpu_s'] / row['cpu_s']:.0f}×) | {gib(faiss_memory)} (index) | "
                f"{row['recall_pro']:.3f} / {row['recall_opp']:.3f} |"
            )
        print(
            f"| FAISS index build (train + add) | {found['build_s']:.1f} | "
            f"{found['build_s'] / exact['seconds']:.2f} | {found['build_cpu_s']:.0f} | | |"
        )
    if written is not None:
        memory = written["peak_rss"] - written["baseline_rss"]
        per_target = written["seconds"] / args.write_targets
        print(
            f"| score(out=...) of {args.write_targets} targets × {args.n_train:,} "
            f"({gib(written['bytes'])} stored, chunks {tuple(written['chunks'])}) | "
            f"{written['seconds']:.1f} | {per_target * args.n_targets / exact['seconds']:.2f} "
            f"(per target, scaled to {args.n_targets:,}) | {cpu(written)} | {gib(memory)} | |"
        )
        print(
            f"| read back: one column chunk / one row chunk | {written['column_read_s']:.2f} / "
            f"{written['row_read_s']:.2f} | | | | |"
        )
    print()
    print(
        f"The in-memory score matrix would need {gib(full_matrix)} (n_targets × n_train × 4 "
        f"bytes). Store: {gib(built['store_bytes'])}, written in {built['write_s']:.1f} s, "
        f"kernel {built['kernel_s']:.1f} s. Load average after: {load_after[0]:.2f} "
        f"{load_after[1]:.2f} {load_after[2]:.2f}."
    )


if __name__ == "__main__":
    main()
