"""TRAK's damping across model families: the metric along a grid of λ, and what a rule picks.

    python benchmarks/damping_study.py --out runs/damping-study              # every family
    python benchmarks/damping_study.py --out runs/damping-study --families digits-mlp facts-gpt2

For each family of ``families.py`` and projection dimension, TRAK's features are computed once
per checkpoint (sparse JL) and cached under ``--out``; then, for 1 checkpoint and for the whole
ensemble, the family's metric (LDS or MRR) is computed for λ on a grid of multiples of the mean
diagonal of ``ΦᵀΦ`` — the old default was 1.0 — and for the λ that
:func:`datatrace.kernel.damping_from_features` picks from the features (the default). Scores
for every λ come from one eigendecomposition per checkpoint (``T(λ) = Φ'V (S + λ)⁻¹ VᵀΦᵀ``),
checked on every family against :class:`datatrace.kernel.Kernel`, the solver TRAK uses. Prints
one table per family and writes ``--out/study.json``.
"""

from __future__ import annotations

import argparse
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
from datatrace.kernel import Kernel, KernelStatistics, damping_from_features, uses_dual

# Multiples of the mean diagonal of ΦᵀΦ (the old relative damping) on the grid.
GRID = 10.0 ** np.arange(-5.0, 1.51, 0.25)


def features(family: families.Family, proj_dim: int, cache: Path) -> list[dict[str, np.ndarray]]:
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
    """``T(λ) = Φ'(ΦᵀΦ + λI)⁻¹Φᵀ`` of one checkpoint for any λ, from one eigendecomposition
    (of ``ΦᵀΦ`` when ``k ≤ n``, of ``ΦΦᵀ`` otherwise)."""

    def __init__(self, phi: np.ndarray, target: np.ndarray):
        n, k = phi.shape
        if k <= n:
            values, vectors = np.linalg.eigh(phi.T @ phi)
            self.left, self.right = target @ vectors, (phi @ vectors).T
        else:
            values, vectors = np.linalg.eigh(phi @ phi.T)
            self.left, self.right = (target @ phi.T) @ vectors, vectors.T
        self.eigenvalues = np.clip(values, 0, None)
        self.mean_diagonal = float((phi**2).sum() / k)

    def __call__(self, damping: float) -> np.ndarray:
        return (self.left / (self.eigenvalues + damping)) @ self.right


def check_against_kernel(spectrum: SpectralScores, part: dict[str, np.ndarray]) -> None:
    """The eigendecomposition's scores equal TRAK's solver at the mean diagonal."""
    phi, target = part["phi"], part["target"]
    n, k = phi.shape
    damping = spectrum.mean_diagonal
    dual = uses_dual(k, n)
    kernel = Kernel(phi @ phi.T if dual else phi.T @ phi, damping, dual)
    want = kernel.scores(torch.as_tensor(target), [(0, n, phi)], n)
    got = spectrum(damping)
    scale = np.abs(want).max()
    if not np.allclose(got / scale, want / scale, atol=1e-5):
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


def study(family: families.Family, out: Path) -> list[dict]:
    save_truth(family, out / "truth" / f"{family.name}.npz")
    rows = []
    for proj_dim in family.proj_dims:
        parts = features(family, proj_dim, out / "features" / f"{family.name}-k{proj_dim}.npz")
        spectra = [SpectralScores(p["phi"], p["target"]) for p in parts]
        check_against_kernel(spectra[0], parts[0])
        qs = [p["q"] for p in parts]
        statistics = [KernelStatistics.of(p["phi"]) for p in parts]
        for count in sorted({1, len(parts)}):
            chosen = [damping_from_features(s, count) for s in statistics]
            curve = [
                family.evaluate(
                    ensemble(spectra[:count], qs[:count], [r * s.mean_diagonal for s in spectra])
                )
                for r in GRID
            ]
            rule = family.evaluate(ensemble(spectra[:count], qs[:count], chosen[:count]))
            best = int(np.nanargmax(curve))
            old = int(np.argmin(np.abs(GRID - 1.0)))
            rows.append(
                {
                    "family": family.name,
                    "description": family.description,
                    "metric": family.metric,
                    "held_out": family.held_out,
                    "n_train": len(parts[0]["phi"]),
                    "proj_dim": proj_dim,
                    "checkpoints": count,
                    "grid": GRID.tolist(),
                    "curve": curve,
                    "best_relative": float(GRID[best]),
                    "best": curve[best],
                    "old_default": curve[old],
                    "rule": rule,
                    "rule_relative": float(
                        np.mean([c / s.mean_diagonal for c, s in zip(chosen, spectra)])
                    ),
                }
            )
            r = rows[-1]
            print(
                f"{family.name:28s} k={proj_dim:5d} C={count:2d}  old {r['old_default']:.3f}  "
                f"rule {r['rule']:.3f} (×{r['rule_relative']:.3g})  best {r['best']:.3f} "
                f"(×{r['best_relative']:.3g})",
                flush=True,
            )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/damping-study"))
    parser.add_argument("--families", nargs="+", default=list(families.BUILDERS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results_path = args.out / "study.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in args.families:
        tick = time.perf_counter()
        family = families.BUILDERS[name](args.out / "families" / name)
        results[name] = study(family, args.out)
        print(f"# {name}: {time.perf_counter() - tick:.0f} s", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
