"""PNG pictures for reports, made with matplotlib's Agg backend and embedded as base64 data URIs.

Nothing here touches ``pyplot``'s global state: figures are built directly on an Agg canvas, so
reports can be written from threads, servers and notebooks without changing their backend.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import matplotlib.image
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Resolution of generated figures; they are shown at their natural size (inches × DPI pixels).
FIGURE_DPI = 110
# Channel counts recognised as the colour axis of an image.
COLOUR_CHANNELS = (1, 3, 4)


def data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def as_image_batch(images: np.ndarray | None) -> np.ndarray | None:
    """Images in the layout matplotlib draws: ``(n, H, W)`` grey or ``(n, H, W, 3|4)`` colour.

    Accepts ``(n, H, W)``, channel-first ``(n, C, H, W)`` and channel-last ``(n, H, W, C)`` with
    ``C`` in 1, 3 or 4 (numpy arrays or CPU tensors). A single channel is squeezed.

    Raises:
        ValueError: any other shape.
    """
    if images is None:
        return None
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] in COLOUR_CHANNELS and images.shape[-1] not in (3, 4):
        images = images.transpose(0, 2, 3, 1)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (3, 4)):
        return images
    raise ValueError(
        "images must be (n, H, W), (n, C, H, W) or (n, H, W, C) with C in 1, 3 or 4, got "
        f"shape {images.shape}"
    )


def image_png(image: np.ndarray, cmap: str, value_range: tuple[float, float]) -> bytes:
    """One image ``(H, W)`` or ``(H, W, 3|4)`` as PNG bytes, one PNG pixel per image pixel.

    Grey images are mapped through ``cmap`` over ``value_range``; colour images are clipped to
    ``value_range`` and rescaled to ``[0, 1]``. Reports enlarge them with nearest-neighbour
    scaling in CSS, which keeps files small and pixels sharp.
    """
    low, high = value_range
    buffer = io.BytesIO()
    if image.ndim == 2:
        matplotlib.image.imsave(buffer, image, cmap=cmap, vmin=low, vmax=high, format="png")
    else:
        width = max(high - low, np.finfo(np.float64).tiny)
        scaled = (np.clip(image.astype(np.float64), low, high) - low) / width
        matplotlib.image.imsave(buffer, scaled, format="png")
    return buffer.getvalue()


def log_histogram_png(
    series: Sequence[tuple[str, np.ndarray]],
    *,
    xlabel: str,
    floor: float,
    bins: int = 40,
    size: tuple[float, float] = (7.5, 2.6),
) -> bytes:
    """Overlaid density histograms of positive values on a log₁₀ axis, as PNG bytes.

    Args:
        series: ``(legend label, values)`` pairs; values below ``floor`` are drawn at ``floor``.
        xlabel: label of the horizontal axis.
        floor: smallest value shown (zeros cannot be placed on a log axis).
        bins: number of bins over the common range.
        size: figure size in inches.
    """
    figure = Figure(figsize=size, dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    logged = [
        (label, np.log10(np.maximum(np.asarray(values, np.float64), floor)))
        for label, values in series
    ]
    pooled = np.concatenate([values for _, values in logged])
    low, high = float(pooled.min()), float(pooled.max())
    edges = np.linspace(low, high if high > low else low + 1, bins + 1)
    for position, (label, logged_values) in enumerate(logged):
        filled = position == 0
        axes.hist(
            logged_values,
            bins=edges,
            density=True,
            histtype="stepfilled" if filled else "step",
            alpha=0.45 if filled else 1.0,
            linewidth=2.0,
            color=f"C{position}",
            label=f"{label} (n={len(logged_values)})",
        )
    ticks = np.arange(np.floor(low), np.ceil(high) + 1)
    axes.set_xticks(ticks, [f"1e{int(t)}" if t else "1" for t in ticks])
    axes.set_xlabel(xlabel)
    axes.set_ylabel("density")
    axes.spines[["top", "right"]].set_visible(False)
    axes.legend(frameon=False, fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
