"""How well one constant multiple of TRAK's damping rule does across the families of a study.

    python benchmarks/damping_rule_fit.py --out runs/damping-study
    python benchmarks/damping_rule_fit.py --out runs/damping-study --kernel-weights none

Reads what ``benchmarks/damping_study.py`` wrote under ``--out``: ``study-auto.json`` (or
``study.json`` with ``--kernel-weights none``), whose rows hold the metric at each multiple
``s`` of the rule's per-target λ (``rule_curve``, each target's own factor kept), and, where
present, the other kernel's study. Only rows built with the kernel asked for are fitted (with
``auto``, the Gauss–Newton rows: the families whose task has a curvature). For each ``s`` and
projection dimension it prints how many rows come within ``--tolerance`` of the best (the
highest value of either kernel, on the grid of one λ for every target or along the rule's
multiples), the median and largest shortfall, and a leave-one-family-out check: for each
family, the ``s`` that brings the most *other* families' rows within the tolerance (ties: the
smaller summed shortfall), and that family's rows at it — what a constant fitted without the
family would have given it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def load(out: Path, mode: str) -> dict[str, list[dict]]:
    path = out / ("study.json" if mode == "none" else f"study-{mode}.json")
    return json.loads(path.read_text())


def best_of(row: dict, others: list[dict]) -> float:
    """The highest value of ``row``'s family, kernel and ensemble size, with either kernel."""
    values = [max(row["curve"]), max(row.get("rule_curve", [row["rule"]]))]
    for other in others:
        if other["proj_dim"] == row["proj_dim"] and other["checkpoints"] == row["checkpoints"]:
            values += [max(other["curve"]), max(other.get("rule_curve", [other["rule"]]))]
    return float(np.nanmax(values))


def shortfalls(
    study: dict[str, list[dict]], other: dict[str, list[dict]], proj_dim: int, kernel: str
) -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
    """``(rows, scales)`` shortfalls below the best of the rows whose kernel is ``kernel``
    (``"gauss-newton"`` or ``"none"``), their families and labels, and the scales."""
    gaps, names, labels, scales = [], [], [], None
    for family, rows in study.items():
        for row in rows:
            if row["proj_dim"] != proj_dim or "rule_curve" not in row:
                continue
            if row.get("kernel_weights", "none") != kernel:
                continue
            scales = row["rule_scales"] if scales is None else scales
            best = best_of(row, other.get(family, []))
            gaps.append(best - np.asarray(row["rule_curve"], dtype=np.float64))
            names.append(family)
            labels.append(f"{family} C={row['checkpoints']}")
    return np.array(gaps), names, labels, np.asarray(scales)


def fitted_scale(gaps: np.ndarray, tolerance: float) -> int:
    """The index of the scale that brings most rows within ``tolerance`` (ties: smaller sum)."""
    within = (gaps <= tolerance).sum(axis=0)
    total = np.nansum(gaps, axis=0)
    candidates = np.flatnonzero(within == within.max())
    return int(candidates[np.argmin(total[candidates])])


def report(study, other, proj_dim: int, tolerance: float, kernel: str) -> str:
    gaps, names, labels, scales = shortfalls(study, other, proj_dim, kernel)
    if not len(gaps):
        return f"k = {proj_dim}: no rows with rule_curve (rerun damping_study.py)"
    lines = [
        f"k = {proj_dim}: {len(gaps)} rows of {len(set(names))} families",
        "",
        "| × rule | within | median shortfall | largest (row) |",
        "|---:|---:|---:|---|",
    ]
    for j, scale in enumerate(scales):
        column = gaps[:, j]
        worst = int(np.nanargmax(column))
        lines.append(
            f"| {scale:.3g} | {(column <= tolerance).sum()}/{len(column)} | "
            f"{np.nanmedian(column):.3f} | {column[worst]:.3f} ({labels[worst]}) |"
        )
    lines += ["", "Leave one family out (the scale fitted on the others, the family's rows):", ""]
    kept_within, count = 0, 0
    for family in dict.fromkeys(names):
        mine = np.array([name == family for name in names])
        j = fitted_scale(gaps[~mine], tolerance)
        values = gaps[mine, j]
        kept_within += int((values <= tolerance).sum())
        count += len(values)
        shown = ", ".join(f"{v:.3f}" for v in values)
        lines.append(f"- {family}: × {scales[j]:.3g}, shortfall {shown}")
    lines.append(
        f"\nWithin {tolerance} with the constant fitted without them: {kept_within}/{count}"
    )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/damping-study"))
    parser.add_argument("--kernel-weights", choices=["none", "auto"], default="auto")
    parser.add_argument("--tolerance", type=float, default=0.02)
    args = parser.parse_args(argv)
    study = load(args.out, args.kernel_weights)
    other_mode = "none" if args.kernel_weights == "auto" else "auto"
    try:
        other = load(args.out, other_mode)
    except FileNotFoundError:
        other = {}
    dims = sorted({row["proj_dim"] for rows in study.values() for row in rows})
    kernel = "none" if args.kernel_weights == "none" else "gauss-newton"
    print("\n\n".join(report(study, other, k, args.tolerance, kernel) for k in dims))


if __name__ == "__main__":
    main()
