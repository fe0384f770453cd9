"""One self-contained HTML file that shows what attributions say about a few targets.

The report embeds every picture as a base64 PNG and carries its own CSS, so it can be mailed,
archived next to the run, or opened offline. It is built from an :class:`~datatrace.Attributions`
plus the data needed to show examples (labels, optionally images); callers add their own sections
(e.g. an LDS table comparing methods) through :class:`Section`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from datatrace.attributions import Attributions
from datatrace.report.images import as_image_batch, data_uri, image_png, log_histogram_png

TEMPLATE = "report.html.j2"
# Top proponents whose median Q is this many times the training set's median Q are flagged:
# their rank then comes mostly from Q (how badly the models fit them), not from the kernel term.
Q_DOMINANCE_RATIO = 10.0
# Smallest Q drawn on the log-scale histogram (Q of very confident examples underflows to 0).
Q_FLOOR = 1e-12
# Significant digits of scores and Q in the report.
SCORE_DIGITS = 3
Q_DIGITS = 2


@dataclass(frozen=True)
class Section:
    """An extra section of a report, shown after the built-in ones.

    Attributes:
        title: heading of the section.
        caption: a paragraph of plain text under the heading.
        html: trusted HTML inserted as is (e.g. a figure made with :mod:`datatrace.report.images`).
        columns: header of an optional table.
        rows: rows of the table, each with one value per column (floats get 4 significant digits).
    """

    title: str
    caption: str = ""
    html: str = ""
    columns: Sequence[str] = ()
    rows: Sequence[Sequence[Any]] = ()


def format_value(value: Any) -> str:
    """A table or header value as text: floats with 4 significant digits, the rest with ``str``."""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(item) for item in value)
    return str(value)


def label_agreement(
    attributions: Attributions,
    train_labels: np.ndarray,
    target_labels: np.ndarray,
    k: int,
    predictions: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Per target class, how often the top-``k`` proponents and opponents share its label.

    A sanity check of attributions for classifiers: proponents of a correct prediction usually
    come from the same class, opponents from other classes.

    Args:
        attributions: scores ``(n_targets, n_train)``.
        train_labels: ``(n_train,)`` integer labels of the training examples.
        target_labels: ``(n_targets,)`` integer labels of the targets.
        k: ranking depth.
        predictions: optional ``(n_targets,)`` predicted labels, for the per-class accuracy.

    Returns:
        One dict per class present among the targets, then one for all targets (``label`` is
        ``"all"``), with keys ``label``, ``targets``, ``accuracy`` (``None`` without
        predictions), ``proponents_same`` and ``opponents_same`` (fractions in ``[0, 1]``).
    """
    train_labels = np.asarray(train_labels)
    target_labels = np.asarray(target_labels)
    proponents = attributions.top(k).indices
    opponents = Attributions(-attributions.scores).top(k).indices
    proponents_same = (train_labels[proponents] == target_labels[:, None]).mean(axis=1)
    opponents_same = (train_labels[opponents] == target_labels[:, None]).mean(axis=1)
    correct = None if predictions is None else np.asarray(predictions) == target_labels
    groups = [(label, target_labels == label) for label in np.unique(target_labels)]
    groups.append(("all", np.ones(len(target_labels), dtype=bool)))
    return [
        {
            "label": label,
            "targets": int(members.sum()),
            "accuracy": None if correct is None else float(correct[members].mean()),
            "proponents_same": float(proponents_same[members].mean()),
            "opponents_same": float(opponents_same[members].mean()),
        }
        for label, members in groups
    ]


def q_dominance(
    attributions: Attributions,
    train_labels: np.ndarray,
    target_labels: np.ndarray,
    k: int,
) -> dict[str, Any] | None:
    """Whether the out-to-loss weight ``Q`` decides the top-``k`` proponents.

    TRAK's scores are ``T ⊙ Q``; ``Q`` spans orders of magnitude on well-fit models, so the
    examples the models fit worst can fill every top list. This compares the median ``Q`` of the
    top-``k`` proponents (over all targets) with the training set's, and the label agreement of
    the top-``k`` by ``τ`` with the one by ``τ / Q`` (the ranking ``Q`` would give without it).

    Returns:
        ``None`` without ``Q`` (or with a zero ``Q``, where ``τ / Q`` is undefined), else a dict
        with ``median_all``, ``median_top``, ``ratio``, ``dominates`` (``ratio ≥``
        :data:`Q_DOMINANCE_RATIO`), ``same_label`` and ``same_label_without_q``.
    """
    out_to_loss = attributions.out_to_loss
    if out_to_loss is None or not np.all(out_to_loss > 0):
        return None
    top = attributions.top(k).indices
    median_all = float(np.median(out_to_loss))
    median_top = float(np.median(out_to_loss[top]))
    without_q = Attributions(attributions.scores / out_to_loss[None, :]).top(k).indices
    labels = np.asarray(train_labels)
    wanted = np.asarray(target_labels)[:, None]
    ratio = median_top / median_all
    return {
        "median_all": median_all,
        "median_top": median_top,
        "ratio": ratio,
        "dominates": ratio >= Q_DOMINANCE_RATIO,
        "same_label": float((labels[top] == wanted).mean()),
        "same_label_without_q": float((labels[without_q] == wanted).mean()),
    }


def write_report(
    path: str | Path,
    attributions: Attributions,
    *,
    train_labels: np.ndarray,
    target_labels: np.ndarray,
    train_images: np.ndarray | None = None,
    target_images: np.ndarray | None = None,
    predictions: np.ndarray | None = None,
    targets: Sequence[int] | None = None,
    k: int = 5,
    summary: Mapping[str, Any] | None = None,
    sections: Sequence[Section] = (),
    title: str = "datatrace report",
    class_names: Sequence[str] | None = None,
    cmap: str = "gray",
    image_range: tuple[float, float] | None = None,
) -> Path:
    """Write a self-contained HTML report of ``attributions`` to ``path``.

    For each shown target: its image, label and predicted label, beside its top-``k``
    proponents and top-``k`` opponents (image, training index, label, score and out-to-loss
    weight ``Q``). Then a histogram of ``Q`` over the training set, a per-class summary of label
    agreement over all targets, and the extra ``sections``.

    Args:
        path: the HTML file to write (parent directories are created).
        attributions: scores ``(n_targets, n_train)``; row ``j`` explains target ``j``.
        train_labels: ``(n_train,)`` integer labels of the training examples.
        target_labels: ``(n_targets,)`` integer labels of the targets.
        train_images: optional ``(n_train, H, W)``, ``(n_train, C, H, W)`` or
            ``(n_train, H, W, C)`` images (without images, examples are shown by index and label).
        target_images: optional ``(n_targets, ...)`` images, same layout.
        predictions: optional ``(n_targets,)`` predicted labels.
        targets: indices of the targets to show (default: the first 6).
        k: proponents and opponents shown per target, and the depth of the label summary.
        summary: run settings for the header (e.g. method, model, checkpoints, ``proj_dim``);
            ``method``, ``n_train`` and ``n_targets`` are filled in from ``attributions`` when
            missing.
        sections: extra sections appended after the built-in ones.
        title: the page title.
        class_names: optional name of each integer label.
        cmap: matplotlib colour map for grey images.
        image_range: ``(low, high)`` values mapped to the ends of ``cmap`` (default: the range
            of all images given).

    Returns:
        The path written.
    """
    train_labels = _labels(train_labels, attributions.n_train, "train_labels")
    target_labels = _labels(target_labels, attributions.n_targets, "target_labels")
    if predictions is not None:
        predictions = _labels(predictions, attributions.n_targets, "predictions")
    if targets is None:
        targets = range(min(attributions.n_targets, 6))
    targets = [int(j) for j in targets]
    for j in targets:
        if not 0 <= j < attributions.n_targets:
            raise IndexError(f"target {j} out of range for {attributions.n_targets} targets")
    pictures = _Pictures(train_images, target_images, cmap, image_range, attributions)

    def name(label: int) -> str:
        return class_names[label] if class_names is not None else str(label)

    shown = [
        _target_view(attributions, j, k, train_labels, target_labels, predictions, pictures, name)
        for j in targets
    ]
    agreement = label_agreement(attributions, train_labels, target_labels, k, predictions)
    for row in agreement:
        row["name"] = "all targets" if row["label"] == "all" else name(int(row["label"]))
    settings = {
        "method": attributions.method or "unknown",
        "n_train": attributions.n_train,
        "n_targets": attributions.n_targets,
        **(summary or {}),
    }
    context = {
        "title": title,
        "settings": [(key, format_value(value)) for key, value in settings.items()],
        "targets": shown,
        "k": k,
        "agreement": agreement,
        "q": _q_view(attributions, train_labels, target_labels, k),
    }
    return render_page(TEMPLATE, context, sections, path)


def render_page(
    template: str, context: dict[str, Any], sections: Sequence[Section], path: str | Path
) -> Path:
    """Render ``templates/<template>`` with ``context``, the extra ``sections`` and the version,
    and write the self-contained page to ``path`` (parent directories created).

    Every report (attributions, ModelDiff, diffusion trajectories) is written through here.
    """
    context = {
        **context,
        "sections": [
            {
                "title": section.title,
                "caption": section.caption,
                "html": section.html,
                "columns": list(section.columns),
                "rows": [[format_value(value) for value in row] for row in section.rows],
            }
            for section in sections
        ],
        "version": _version(),
    }
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("datatrace.report", "templates"),
        autoescape=True,  # the templates' names end in .j2, which select_autoescape would miss
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    html = environment.get_template(template).render(**context)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


class _Pictures:
    """Data URIs of training and target images, each encoded once."""

    def __init__(self, train_images, target_images, cmap, image_range, attributions):
        self.train = as_image_batch(train_images)
        self.target = as_image_batch(target_images)
        for images, expected, what in (
            (self.train, attributions.n_train, "train_images"),
            (self.target, attributions.n_targets, "target_images"),
        ):
            if images is not None and len(images) != expected:
                raise ValueError(f"{what} has {len(images)} images, expected {expected}")
        given = [images for images in (self.train, self.target) if images is not None]
        if image_range is None and given:
            image_range = (
                float(min(images.min() for images in given)),
                float(max(images.max() for images in given)),
            )
        self.cmap = cmap
        self.range = image_range
        self._cache: dict[tuple[str, int], str] = {}

    def uri(self, kind: str, index: int) -> str | None:
        images = self.train if kind == "train" else self.target
        if images is None:
            return None
        key = (kind, index)
        if key not in self._cache:
            self._cache[key] = data_uri(image_png(images[index], self.cmap, self.range))
        return self._cache[key]


def _labels(values: Any, expected: int, what: str) -> np.ndarray:
    values = np.asarray(values).reshape(-1)
    if len(values) != expected:
        raise ValueError(f"{what} has {len(values)} entries, expected {expected}")
    return values.astype(np.int64)


def _target_view(attributions, j, k, train_labels, target_labels, predictions, pictures, name):
    row = attributions.scores[j]
    largest = float(np.abs(row).max()) or 1.0
    out_to_loss = attributions.out_to_loss

    def cells(ranking) -> list[dict[str, Any]]:
        return [
            {
                "index": int(i),
                "image": pictures.uri("train", int(i)),
                "label": name(int(train_labels[i])),
                "same_label": bool(train_labels[i] == target_labels[j]),
                "score": f"{score:+.{SCORE_DIGITS}g}",
                "bar": round(100 * abs(float(score)) / largest, 1),
                "positive": bool(score > 0),
                "q": None if out_to_loss is None else f"{out_to_loss[i]:.{Q_DIGITS}g}",
            }
            for i, score in zip(ranking.indices, ranking.scores)
        ]

    predicted = None if predictions is None else int(predictions[j])
    return {
        "index": j,
        "image": pictures.uri("target", j),
        "label": name(int(target_labels[j])),
        "predicted": None if predicted is None else name(predicted),
        "misclassified": predicted is not None and predicted != int(target_labels[j]),
        "proponents": cells(attributions.proponents(j, k)),
        "opponents": cells(attributions.opponents(j, k)),
    }


def _q_view(attributions, train_labels, target_labels, k) -> dict[str, Any] | None:
    out_to_loss = attributions.out_to_loss
    if out_to_loss is None:
        return None
    top = attributions.top(k).indices.reshape(-1)
    histogram = log_histogram_png(
        [
            ("all training examples", out_to_loss),
            (f"top-{k} proponents of every target, with repeats", out_to_loss[top]),
        ],
        xlabel="out-to-loss weight Q (log scale)",
        floor=Q_FLOOR,
    )
    return {
        "histogram": data_uri(histogram),
        "min": f"{out_to_loss.min():.{Q_DIGITS}g}",
        "median": f"{np.median(out_to_loss):.{Q_DIGITS}g}",
        "max": f"{out_to_loss.max():.{Q_DIGITS}g}",
        "dominance": q_dominance(attributions, train_labels, target_labels, k),
    }


def _version() -> str:
    from datatrace import __version__

    return __version__
