"""An HTML page of ModelDiff's distinguishing directions, with the data they point to.

One card per direction, for A against B and then B against A: the explained variance of A's and
B's attributions along it, the training examples at both of its extremes and the targets most
aligned with it, each shown as an image or a text snippet with its index and label. Self-contained
(images embedded as base64 PNGs), in the style of :mod:`datatrace.report`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datatrace.applications.modeldiff import A_VS_B, B_VS_A, Direction, ModelDiff
from datatrace.report.html import Section, format_value, render_page
from datatrace.report.images import as_image_batch, data_uri, image_png

TEMPLATE = "modeldiff.html.j2"
# Characters of a text example shown on the page (the full text is in the tooltip).
TEXT_CHARS = 90
# Significant digits of coordinates and projections on the page.
VALUE_DIGITS = 2


class _Examples:
    """How to show the examples of one side (training set or targets): image, text or index."""

    def __init__(self, images, texts, labels, n, what, cmap, image_range, class_names):
        self.images = as_image_batch(None if images is None else np.asarray(images))
        self.texts = None if texts is None else [str(text) for text in texts]
        self.labels = None if labels is None else np.asarray(labels).reshape(-1)
        for values, kind in (
            (self.images, "images"),
            (self.texts, "texts"),
            (self.labels, "labels"),
        ):
            if values is not None and len(values) != n:
                raise ValueError(f"{what} {kind} has {len(values)} entries, expected {n}")
        self.cmap = cmap
        self.range = image_range
        self.class_names = class_names
        self._uris: dict[int, str] = {}

    def label(self, index: int) -> str | None:
        if self.labels is None:
            return None
        value = self.labels[index]
        if self.class_names is not None:
            return str(self.class_names[int(value)])
        return format_value(value.item() if hasattr(value, "item") else value)

    def cell(self, index: int, value: float) -> dict[str, Any]:
        image = None
        if self.images is not None:
            if index not in self._uris:
                self._uris[index] = data_uri(image_png(self.images[index], self.cmap, self.range))
            image = self._uris[index]
        text = None if self.texts is None else self.texts[index]
        return {
            "index": index,
            "image": image,
            "text": None if text is None else _shorten(text),
            "full_text": text,
            "label": self.label(index),
            "value": f"{value:+.{VALUE_DIGITS}g}",
            "positive": bool(value > 0),
        }


def _shorten(text: str) -> str:
    return text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 1] + "…"


def _image_range(*batches: np.ndarray | None) -> tuple[float, float] | None:
    given = [batch for batch in batches if batch is not None]
    if not given:
        return None
    return float(min(b.min() for b in given)), float(max(b.max() for b in given))


def write_modeldiff_report(
    path: str | Path,
    diff: ModelDiff,
    *,
    train_images: Any = None,
    target_images: Any = None,
    train_texts: Sequence[str] | None = None,
    target_texts: Sequence[str] | None = None,
    train_labels: Any = None,
    target_labels: Any = None,
    names: tuple[str, str] = ("A", "B"),
    n_directions: int = 3,
    summary: Mapping[str, Any] | None = None,
    sections: Sequence[Section] = (),
    title: str = "datatrace: ModelDiff",
    class_names: Sequence[str] | None = None,
    cmap: str = "gray",
    image_range: tuple[float, float] | None = None,
) -> Path:
    """Write a self-contained HTML page of a fitted
    :class:`~datatrace.applications.modeldiff.ModelDiff`.

    Args:
        path: the HTML file to write (parent directories are created).
        diff: the fitted ModelDiff.
        train_images: optional ``(n_train, ...)`` images (layouts as in
            :func:`datatrace.report.write_report`); without images or texts examples are shown
            by index and label.
        target_images: optional ``(n_targets, ...)`` images.
        train_texts: optional ``n_train`` strings, shown instead of images.
        target_texts: optional ``n_targets`` strings.
        train_labels: optional ``(n_train,)`` labels.
        target_labels: optional ``(n_targets,)`` labels.
        names: what algorithms A and B are called on the page.
        n_directions: directions shown per comparison.
        summary: run settings for the header.
        sections: extra sections appended at the end (e.g. a counterfactual check).
        title: the page title.
        class_names: optional name of each integer label.
        cmap: matplotlib colour map for grey images.
        image_range: values mapped to the ends of ``cmap`` (default: the range of all images).

    Returns:
        The path written.
    """
    directions = {which: diff.directions(which) for which in (A_VS_B, B_VS_A)}
    train_batch = as_image_batch(None if train_images is None else np.asarray(train_images))
    target_batch = as_image_batch(None if target_images is None else np.asarray(target_images))
    image_range = image_range or _image_range(train_batch, target_batch)
    train = _Examples(
        train_batch, train_texts, train_labels, diff.n_train_, "train", cmap, image_range,
        class_names,
    )  # fmt: skip
    targets = _Examples(
        target_batch, target_texts, target_labels, diff.n_targets_, "target", cmap, image_range,
        class_names,
    )  # fmt: skip
    name_a, name_b = names
    largest = max(
        [max(d.variance_a, d.variance_b) for group in directions.values() for d in group] or [1.0]
    )

    def card(direction: Direction) -> dict[str, Any]:
        own, other = (name_a, name_b) if direction.algorithm == "A" else (name_b, name_a)
        return {
            "rank": direction.rank + 1,
            "own": own,
            "other": other,
            "variance_a": f"{100 * direction.variance_a:.2f}%",
            "variance_b": f"{100 * direction.variance_b:.2f}%",
            "bar_a": round(100 * direction.variance_a / largest, 1),
            "bar_b": round(100 * direction.variance_b / largest, 1),
            "residual": f"{100 * direction.residual_variance:.1f}%",
            "pca_index": direction.pca_index + 1,
            "distinguishing": direction.variance_gap > 0,
            "positive": [
                train.cell(int(i), float(direction.component[i])) for i in direction.train_positive
            ],
            "negative": [
                train.cell(int(i), float(direction.component[i])) for i in direction.train_negative
            ],
            "targets": [
                targets.cell(int(j), float(direction.target_projections[j]))
                for j in direction.targets
            ],
        }

    comparisons = [
        {
            "title": f"What {name_a} uses and {name_b} does not ({name_a} vs {name_b})",
            "cards": [card(d) for d in directions[A_VS_B][:n_directions]],
        },
        {
            "title": f"What {name_b} uses and {name_a} does not ({name_b} vs {name_a})",
            "cards": [card(d) for d in directions[B_VS_A][:n_directions]],
        },
    ]
    settings = {
        "A": name_a,
        "B": name_b,
        "targets": diff.n_targets_,
        "training examples": diff.n_train_,
        "directions ranked by": diff.rank_by.replace("_", " "),
        "Q divided out": ("yes" if diff.divided_out_to_loss_ else "no")
        + (" (auto)" if diff.divide_out_to_loss == "auto" else ""),
        **(summary or {}),
    }
    k = max((len(d.train_positive) for group in directions.values() for d in group), default=1)
    context = {
        "title": title,
        "name_a": name_a,
        "name_b": name_b,
        "settings": [(key, format_value(value)) for key, value in settings.items()],
        "out_to_loss_note": diff.out_to_loss_note_,
        "comparisons": comparisons,
        "k": k,
    }
    return render_page(TEMPLATE, context, sections, path)
