"""TRAK's damping across model families: the metric along a grid of λ, and what a rule picks.

    python benchmarks/damping_study.py --out runs/damping-study              # every family
    python benchmarks/damping_study.py --out runs/damping-study --families digits-mlp facts-gpt2

For each family of ``families.py`` and projection dimension, TRAK's features are computed once
per checkpoint (by TRAK's default projector: sparse JL until 2026-12-02, per-layer FactGraSS
since) and cached under ``--out``; then, for 1 checkpoint and for the whole
ensemble, the family's metric (LDS or MRR) is computed for λ on a grid of multiples of the mean
diagonal of ``ΦᵀΦ`` — the old default was 1.0 — and for the λ that
:func:`datatrace.methods.kernel.damping_from_features` picks from the features (the default). Scores
for every λ come from one eigendecomposition per checkpoint (``T(λ) = Φ'V (S + λ)⁻¹ VᵀΦᵀ``),
checked on every family against :class:`datatrace.methods.kernel.Kernel`, the solver TRAK uses
(to 1e-4 of the largest score: the eigendecomposition loses digits on ill-conditioned kernels).
With ``--kernel-weights auto`` (``TRAK(kernel_weights="auto")``, TRAK's default since
2026-12-03) the kernel of a family whose
task has a curvature (classifiers' margins and language models: ``families.MARGIN_FAMILIES``) is
the Gauss–Newton ``ΦᵀRΦ``, ``R = Q(1 − Q)`` scaled to the plain kernel's trace, and the grid's
unit its mean diagonal; ``none`` (this script's default, as ``kernel_weights=None``: the damping
table of docs/defaults.md) gives every family the plain ``ΦᵀΦ``. Each row also holds the metric
at multiples of the rule's per-target λ (``RULE_SCALES``), which
``benchmarks/damping_rule_fit.py`` reads to refit the rule's constant. Prints one table per
family and writes ``--out/study.json`` (``--out/study-auto.json`` with ``auto``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

import datatrace as dt
import families
from datatrace.methods.kernel import (
    Kernel,
    KernelStatistics,
    damping_from_features,
    neighbour_sample,
    normalised_weights,
    target_damping_factor,
    uses_dual,
    weighted_dual_gram,
    weighted_gram_and_statistics,
    weighted_statistics_of_gram,
)
from datatrace.tasks.classification import margin_curvature

# Multiples of the mean diagonal of ΦᵀΦ (the old relative damping) on the grid.
GRID = 10.0 ** np.arange(-5.0, 1.51, 0.25)

# Multiples of the default rule's per-target λ, for refitting the rule's constant: the metric
# at each, with every target's own factor kept (the grid above damps every target alike).
RULE_SCALES = 2.0 ** np.arange(-4.0, 2.01, 0.5)


def features(
    family: families.Family | None, proj_dim: int, cache: Path
) -> list[dict[str, np.ndarray]]:
    """Per checkpoint: training features ``phi`` (n, k), target features ``target`` (m, k),
    out-to-loss weights ``q`` (n,), float64; cached in ``cache``."""
    if cache.exists():
        with np.load(cache) as data:
            count = int(data["count"])
            return [
                {key: data[f"{key}{c}"] for key in ("phi", "target", "q")} for c in range(count)
            ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dt.SingularKernelWarning)
        trak = dt.TRAK(
            family.model, family.task, proj_dim=proj_dim, params=family.params, progress=False
        ).fit(family.train, family.checkpoints)
    parts = []
    for c, checkpoint in enumerate(trak.checkpoints_):
        phi = np.concatenate([block for _, _, block in trak._stored[c].iter_chunks()])
        target, _ = trak.features_.featurize_all(family.targets, checkpoint, c)
        parts.append({"phi": phi, "target": target.numpy(), "q": trak.out_to_loss_[c]})
    cache.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"{key}{c}": part[key] for c, part in enumerate(parts) for key in part}
    np.savez(cache, count=len(parts), **arrays)
    return [{k: v.astype(np.float64) for k, v in part.items()} for part in parts]


class SpectralScores:
    """``T(λ) = Φ'(ΦᵀRΦ + λI)⁻¹Φᵀ`` of one checkpoint for any λ (``R = diag(weights)``, the
    identity without), from one eigendecomposition: of ``ΦᵀRΦ`` when ``k ≤ n``; otherwise of
    ``R^½ΦΦᵀR^½ = USUᵀ``, whose eigenvectors ``V = ΦᵀR^½US^{-½}`` span the kernel's range and
    leave a null space where ``(ΦᵀRΦ + λI)⁻¹`` is ``1/λ``: ``T = Φ'V(S + λ)⁻¹VᵀΦᵀ + (Φ'Φᵀ −
    Φ'VVᵀΦᵀ)/λ`` (the second term vanishes without weights, where ``Φᵀ`` lies in that range)."""

    def __init__(self, phi: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None):
        n, k = phi.shape
        scale = np.ones(n) if weights is None else weights
        self.rest = None
        if k <= n:
            values, vectors = np.linalg.eigh(phi.T @ (phi * scale[:, None]))
            self.left, self.right = target @ vectors, (phi @ vectors).T
        elif weights is None:
            values, vectors = np.linalg.eigh(phi @ phi.T)
            self.left, self.right = (target @ phi.T) @ vectors, vectors.T
        else:
            root = np.sqrt(scale)
            values, vectors = np.linalg.eigh(weighted_dual_gram(phi @ phi.T, scale))
            kept = values > values.max() * 1e-13
            values, vectors = values[kept], vectors[:, kept]
            directions = (phi * root[:, None]).T @ vectors / np.sqrt(values)  # (k, r)
            self.left, self.right = target @ directions, (phi @ directions).T
            self.rest = target @ phi.T - self.left @ self.right
        self.eigenvalues = np.clip(values, 0, None)
        self.mean_diagonal = float(((phi**2).sum(axis=1) @ scale) / k)

        # Each target's coupling ‖R^½Φφ'‖²/‖φ'‖², which the default rule's per-target factor
        # reads.
        cross = target @ phi.T
        squared = (target**2).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            self.target_coupling = (cross**2 @ scale) / squared

    def __call__(self, damping) -> np.ndarray:
        """Scores for one ``λ``, or one per target ``(m,)``."""
        damping = np.asarray(damping, dtype=np.float64)
        if damping.ndim == 1:
            damping = damping[:, None]
        scores = (self.left / (self.eigenvalues + damping)) @ self.right
        return scores if self.rest is None else scores + self.rest / damping

    def rule(self, statistics: KernelStatistics, count: int) -> np.ndarray:
        """The default rule's per-target ``λ``: the checkpoint's times each target's factor."""
        factor = target_damping_factor(self.target_coupling, statistics.coupling)
        return damping_from_features(statistics, count) * factor


def check_against_kernel(
    spectrum: SpectralScores,
    part: dict[str, np.ndarray],
    statistics: KernelStatistics,
    weights: np.ndarray | None = None,
) -> None:
    """The eigendecomposition's scores equal TRAK's solver at the mean diagonal, and at the
    default rule with each target's own damping."""
    phi, target = part["phi"], part["target"]
    n, k = phi.shape
    dual = uses_dual(k, n)
    plain = phi @ phi.T if dual else None
    if weights is None:
        gram = plain if dual else phi.T @ phi
    else:
        gram = weighted_dual_gram(plain, weights) if dual else phi.T @ (phi * weights[:, None])
    for damping, coupling, got in (
        (spectrum.mean_diagonal, None, spectrum(spectrum.mean_diagonal)),
        (
            damping_from_features(statistics),
            statistics.coupling,
            spectrum(spectrum.rule(statistics, 1)),
        ),
    ):
        kernel = Kernel(gram, damping, dual, coupling=coupling, weights=weights, plain_gram=plain)
        want = kernel.scores(torch.as_tensor(target), [(0, n, phi)], n)
        scale = np.abs(want).max()
        if not np.allclose(got / scale, want / scale, atol=1e-4):
            raise AssertionError("the eigendecomposition's scores differ from Kernel.scores")


def ensemble(spectra: list[SpectralScores], qs: list[np.ndarray], dampings) -> np.ndarray:
    scores = sum(s(d) for s, d in zip(spectra, dampings)) / len(spectra)
    return scores * np.mean(qs, axis=0)[None, :]


def save_truth(family: families.Family, path: Path) -> None:
    """The family's ground truth, for studies of other rules that need no model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if family.metric == "LDS":
        np.savez(path, metric="LDS", masks=family.truth["masks"], outputs=family.truth["outputs"])
    else:
        relevant = family.truth["relevant"]
        flat = np.concatenate(relevant)
        offsets = np.cumsum([0] + [len(r) for r in relevant])
        np.savez(path, metric="MRR", relevant=flat, offsets=offsets)


def load_truth(path: Path) -> tuple[str, dict]:
    with np.load(path) as data:
        metric = str(data["metric"])
        if metric == "LDS":
            return metric, {"masks": data["masks"], "outputs": data["outputs"]}
        offsets, flat = data["offsets"], data["relevant"]
        return metric, {"relevant": [flat[a:b] for a, b in itertools.pairwise(offsets)]}


def prepare(family: families.Family, out: Path) -> None:
    """Cache the family's features, ground truth and description under ``out``."""
    save_truth(family, out / "truth" / f"{family.name}.npz")
    for proj_dim in family.proj_dims:
        features(family, proj_dim, out / "features" / f"{family.name}-k{proj_dim}.npz")
    meta = {"description": family.description, "held_out": family.held_out,
            "proj_dims": list(family.proj_dims)}  # fmt: skip
    (out / "truth" / f"{family.name}.json").write_text(json.dumps(meta))


def kernel_weights(name: str, phi: np.ndarray, q: np.ndarray, mode: str) -> np.ndarray | None:
    """The Gauss–Newton weights TRAK's ``kernel_weights=mode`` gives family ``name``, scaled as
    TRAK scales them (``tr(ΦᵀRΦ) = tr(ΦᵀΦ)``)."""
    if mode == "none" or name not in families.MARGIN_FAMILIES:
        return None
    squared = (phi**2).sum(axis=1)
    return normalised_weights(margin_curvature(q), squared, float(squared.sum()))


def statistics_of(phi: np.ndarray, weights: np.ndarray | None) -> KernelStatistics:
    """The statistics TRAK's rule reads: of ``ΦᵀRΦ`` with weights (``ρ`` from ``ΦᵀΦ``)."""
    plain = KernelStatistics.of(phi)
    if weights is None:
        return plain
    n, k = phi.shape
    if uses_dual(k, n):
        return weighted_statistics_of_gram(phi @ phi.T, weights, plain)
    rows = neighbour_sample(n)
    return weighted_gram_and_statistics([(0, n, phi)], weights, plain, phi[rows], rows)[1]


def study(name: str, out: Path, mode: str = "auto") -> list[dict]:
    """The metric along the damping grid and at the default rule, from the cached features."""
    meta = json.loads((out / "truth" / f"{name}.json").read_text())
    metric, truth = load_truth(out / "truth" / f"{name}.npz")
    rows = []
    for proj_dim in meta["proj_dims"]:
        parts = features(None, proj_dim, out / "features" / f"{name}-k{proj_dim}.npz")
        weights = [kernel_weights(name, p["phi"], p["q"], mode) for p in parts]
        spectra = [SpectralScores(p["phi"], p["target"], w) for p, w in zip(parts, weights)]
        qs = [p["q"] for p in parts]
        statistics = [statistics_of(p["phi"], w) for p, w in zip(parts, weights)]
        check_against_kernel(spectra[0], parts[0], statistics[0], weights[0])
        for count in sorted({1, len(parts)}):
            chosen = [sp.rule(st, count) for sp, st in zip(spectra, statistics[:count])]
            curve = [
                families.evaluate(
                    metric,
                    truth,
                    ensemble(spectra[:count], qs[:count], [r * s.mean_diagonal for s in spectra]),
                )
                for r in GRID
            ]
            rule = families.evaluate(metric, truth, ensemble(spectra[:count], qs[:count], chosen))
            rule_curve = [
                families.evaluate(
                    metric, truth, ensemble(spectra[:count], qs[:count], [c * s for c in chosen])
                )
                for s in RULE_SCALES
            ]
            best = int(np.nanargmax(curve))
            old = int(np.argmin(np.abs(GRID - 1.0)))
            # the checkpoint's λ over its mean diagonal, and the targets' median factor
            relative = [
                damping_from_features(st, count) / sp.mean_diagonal
                for sp, st in zip(spectra, statistics[:count])
            ]
            factor = np.median(
                target_damping_factor(spectra[0].target_coupling, statistics[0].coupling)
            )
            rows.append(
                {
                    "family": name,
                    "description": meta["description"],
                    "metric": metric,
                    "held_out": meta["held_out"],
                    "n_train": len(parts[0]["phi"]),
                    "proj_dim": proj_dim,
                    "checkpoints": count,
                    "neighbour_cosine": statistics[0].neighbour_cosine,
                    "grid": GRID.tolist(),
                    "curve": curve,
                    "best_relative": float(GRID[best]),
                    "best": curve[best],
                    "old_default": curve[old],
                    "rule": rule,
                    "rule_relative": float(np.mean(relative)),
                    "rule_scales": RULE_SCALES.tolist(),
                    "rule_curve": rule_curve,
                    "target_factor": float(factor),
                    "kernel_weights": "none" if weights[0] is None else "gauss-newton",
                }
            )
            r = rows[-1]
            print(
                f"{name:28s} k={proj_dim:5d} C={count:2d} ρ={r['neighbour_cosine']:.2f}  old "
                f"{r['old_default']:.3f}  rule {r['rule']:.3f} (×{r['rule_relative']:.3g})  best "
                f"{r['best']:.3f} (×{r['best_relative']:.3g})",
                flush=True,
            )
    return rows


def table(results: dict[str, list[dict]], proj_dim: int) -> str:
    """Markdown: one line per family and ensemble size at ``proj_dim``."""
    lines = [
        "| family | metric | n | ρ | checkpoints | old (λ = 1 × mean diag) | new (λ / mean diag) | "
        "best on the grid (λ / mean diag) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for rows in results.values():
        for r in rows:
            if r["proj_dim"] != proj_dim:
                continue
            held = " (added as a check)" if r["held_out"] else ""
            lines.append(
                f"| {r['description']}{held} | {r['metric']} | {r['n_train']} | "
                f"{r['neighbour_cosine']:.2f} | {r['checkpoints']} | {r['old_default']:.3f} | "
                f"{r['rule']:.3f} ({r['rule_relative']:.2g}) | {r['best']:.3f} "
                f"({r['best_relative']:.2g}) |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/damping-study"))
    parser.add_argument("--families", nargs="+", default=list(families.BUILDERS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cached", action="store_true", help="only study families already cached under --out"
    )
    parser.add_argument(
        "--kernel-weights",
        choices=["none", "auto"],
        default="none",
        help="plain kernels (TRAK's default) or Gauss–Newton ones where the task has a curvature",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    suffix = "" if args.kernel_weights == "none" else f"-{args.kernel_weights}"
    results_path = args.out / f"study{suffix}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in args.families:
        tick = time.perf_counter()
        if not args.cached:
            prepare(families.BUILDERS[name](args.out / "families" / name), args.out)
        elif not (args.out / "truth" / f"{name}.json").exists():
            continue
        results[name] = study(name, args.out, args.kernel_weights)
        print(f"# {name}: {time.perf_counter() - tick:.0f} s", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))
    for proj_dim in sorted({r["proj_dim"] for rows in results.values() for r in rows}):
        print(f"\nk = {proj_dim}\n\n{table(results, proj_dim)}")


if __name__ == "__main__":
    main()
