"""An HTML page showing the journey of generated samples and what shaped each step of it.

One card per generated sample: the final image, then one column per attributed step with the
predicted clean image ``x̂_0(t)`` at that step above its top training images. The page is
self-contained (images embedded as base64 PNGs), in the style of :mod:`datatrace.report`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datatrace.applications.diffusion.journey import TrajectoryAttributions
from datatrace.applications.diffusion.sampling import Trajectory
from datatrace.report.html import Section, format_value, render_page
from datatrace.report.images import as_image_batch, data_uri, image_png

TEMPLATE = "trajectory.html.j2"
# Samples shown when none are chosen (each card holds n_steps × (k + 1) pictures).
DEFAULT_SHOWN_SAMPLES = 8
# Significant digits of scores on the page.
SCORE_DIGITS = 3


def top_overlap(journey: TrajectoryAttributions, k: int) -> list[dict[str, Any]]:
    """How much each step's top-``k`` proponents share with the last step's, over all samples.

    Returns:
        One dict per step with ``step`` and ``overlap``: the mean over generated samples of
        ``|top_k(step) ∩ top_k(last step)| / k``.
    """
    top = journey.top(k)
    last = top[-1]
    rows = []
    for index, step in enumerate(journey.steps):
        shared = [
            len(np.intersect1d(top[index, j], last[j])) / top.shape[2]
            for j in range(journey.n_generated)
        ]
        rows.append({"step": step, "overlap": float(np.mean(shared))})
    return rows


def write_trajectory_report(
    path: str | Path,
    journey: TrajectoryAttributions,
    trajectory: Trajectory,
    train_images: Any,
    *,
    samples: Sequence[int] | None = None,
    k: int = 4,
    train_labels: Any = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    summary: Mapping[str, Any] | None = None,
    sections: Sequence[Section] = (),
    title: str = "datatrace: the journey of generated samples",
    cmap: str = "gray",
    image_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """Write a self-contained HTML page of a trajectory's attributions.

    Args:
        path: the HTML file to write (parent directories are created).
        journey: attributions ``(n_steps, n_generated, n_train)`` of ``trajectory``.
        trajectory: the sampled trajectory (for ``x̂_0(t)`` and the final samples).
        train_images: ``(n_train, C, H, W)`` training images as they should be shown (pixels,
            also for latent diffusion).
        samples: indices of the generated samples to show (default: the first
            :data:`DEFAULT_SHOWN_SAMPLES`).
        k: top training images shown per step.
        train_labels: optional ``(n_train,)`` labels shown under the training images (and the
            sample's class label, when the trajectory is class-conditional).
        decode: optional map from the model's sample space to pixels (latent diffusion: the VAE
            decoder), applied to ``x̂_0(t)`` and the samples before drawing them.
        summary: run settings for the header.
        sections: extra sections (e.g. an LDS table) appended at the end.
        title: the page title.
        cmap: matplotlib colour map for grey images.
        image_range: values mapped to the ends of ``cmap`` (diffusion data is usually in
            ``[-1, 1]``).

    Returns:
        The path written.
    """
    train = as_image_batch(np.asarray(torch.as_tensor(train_images).cpu()))
    if len(train) != journey.n_train:
        raise ValueError(f"train_images has {len(train)} images, expected {journey.n_train}")
    if trajectory.n_samples != journey.n_generated:
        raise ValueError(
            f"the trajectory has {trajectory.n_samples} samples but the attributions "
            f"{journey.n_generated}: pass the trajectory that was attributed"
        )
    labels = None if train_labels is None else np.asarray(train_labels).reshape(-1)
    if samples is None:
        samples = range(min(journey.n_generated, DEFAULT_SHOWN_SAMPLES))
    samples = [int(j) for j in samples]
    for j in samples:
        if not 0 <= j < journey.n_generated:
            raise IndexError(f"sample {j} out of range for {journey.n_generated} samples")

    def picture(image: np.ndarray) -> str:
        return data_uri(image_png(image, cmap, image_range))

    def shown(images: torch.Tensor) -> np.ndarray:
        if decode is not None:
            with torch.no_grad():
                images = decode(images)
        return as_image_batch(np.asarray(torch.as_tensor(images).detach().cpu()))

    finals = shown(trajectory.samples[samples])
    predicted = {step: shown(trajectory.pred_original_at(step)[samples]) for step in journey.steps}
    train_uris: dict[int, str] = {}

    def train_cell(index: int, score: float, largest: float) -> dict[str, Any]:
        if index not in train_uris:
            train_uris[index] = picture(train[index])
        return {
            "index": index,
            "image": train_uris[index],
            "label": None if labels is None else format_value(labels[index]),
            "score": f"{score:+.{SCORE_DIGITS}g}",
            "bar": round(100 * abs(score) / largest, 1),
        }

    class_labels = trajectory.condition.get("class_labels")
    cards = []
    for position, j in enumerate(samples):
        columns = []
        for step_index, step in enumerate(journey.steps):
            row = journey.scores[step_index, j]
            largest = float(np.abs(row).max()) or 1.0
            order = np.argsort(-row, kind="stable")[: min(k, journey.n_train)]
            columns.append(
                {
                    "step": step,
                    "predicted": picture(predicted[step][position]),
                    "top": [train_cell(int(i), float(row[i]), largest) for i in order],
                }
            )
        cards.append(
            {
                "index": j,
                "image": picture(finals[position]),
                "label": None if class_labels is None else format_value(class_labels[j].item()),
                "columns": columns,
            }
        )
    settings = {
        "method": journey.method or "unknown",
        "n_train": journey.n_train,
        "generated samples": journey.n_generated,
        "attributed steps": ", ".join(str(step) for step in journey.steps),
        "sampling steps": trajectory.n_steps,
        **{key: journey.info[key] for key in ("n_draws",) if key in journey.info},
        **(summary or {}),
    }
    context = {
        "title": title,
        "settings": [(key, format_value(value)) for key, value in settings.items()],
        "cards": cards,
        "k": k,
        "n_steps": len(journey.steps),
        "overlap": top_overlap(journey, k),
    }
    return render_page(TEMPLATE, context, sections, path)
