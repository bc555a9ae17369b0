"""The book's colours and style, and what every figure draws with: images, boxes, grids."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from ..data import IMAGE_MEAN, IMAGE_STD

__all__ = ["ROLE_COLORS", "VERDICT_COLORS", "use_book_style", "to_display", "draw_boxes"]


#: One colour per role, used by every figure of the book.
ROLE_COLORS = {
    "gt": "#2ca02c",
    "detection": "#d62728",
    "teacher": "#1f77b4",
    "student": "#ff7f0e",
    "ignored": "#7f7f7f",
}


_CLASS_COLORS = plt.get_cmap("tab10").colors


#: One colour per TIDE verdict of a detection (:data:`colad.tide.VERDICTS`), and ``Miss`` for
#: the objects nothing found.
VERDICT_COLORS = {
    "TP": "#2ca02c",
    "Cls": "#9467bd",
    "Loc": "#ff7f0e",
    "Both": "#8c564b",
    "Dupe": "#1f77b4",
    "Bkg": "#d62728",
    "Miss": "#e377c2",
    "unscored": "#7f7f7f",
}


def use_book_style() -> None:
    """Set the book's figure size, font sizes and resolution (global, for chapters only)."""
    mpl.rcParams.update(
        {
            "figure.figsize": (4.0, 3.0),
            "figure.dpi": 110,
            "savefig.dpi": 110,
            "font.size": 9,
            "axes.titlesize": 10,
            "axes.labelsize": 9,
            "legend.fontsize": 8,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )


def to_display(image: Tensor | np.ndarray) -> np.ndarray:
    """Return an image as ``uint8[H, W, 3]`` for ``imshow``: accepts ``uint8[3, H, W]``,
    normalised ``float[3, H, W]`` (undoing :data:`colad.data.IMAGE_MEAN`/``IMAGE_STD``), or
    ``[H, W, 3]`` arrays."""
    if isinstance(image, np.ndarray):
        return image if image.ndim == 3 and image.shape[-1] == 3 else image.transpose(1, 2, 0)
    image = image.detach().cpu()
    if image.is_floating_point():
        mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGE_STD).view(3, 1, 1)
        image = ((image * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    return image.permute(1, 2, 0).numpy()


def draw_boxes(
    ax,
    boxes: Tensor | np.ndarray,
    labels: Sequence[int] | Tensor | None = None,
    *,
    names: Sequence[str] | None = None,
    scores: Sequence[float] | None = None,
    color: str | None = None,
    linestyle: str = "-",
    linewidth: float = 1.2,
) -> None:
    """Draw xyxy ``boxes`` on ``ax``, with a class name (and score) tag on each.

    Boxes are coloured by class unless ``color`` is given.
    """
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    labels = [int(v) for v in (labels if labels is not None else [])]
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        label = labels[k] if k < len(labels) else None
        edge = color or (_CLASS_COLORS[label % 10] if label is not None else ROLE_COLORS["gt"])
        ax.add_patch(
            mpl.patches.Rectangle(
                (x1, y1),
                x2 - x1,
                y2 - y1,
                fill=False,
                edgecolor=edge,
                linewidth=linewidth,
                linestyle=linestyle,
            )
        )
        tag = names[label] if (names is not None and label is not None) else None
        if scores is not None:
            tag = f"{tag or ''} {float(scores[k]):.2f}".strip()
        if tag:
            ax.text(
                x1,
                y1,
                tag,
                fontsize=6,
                color="white",
                va="bottom",
                bbox={"facecolor": edge, "edgecolor": "none", "pad": 0.5, "alpha": 0.8},
            )


def _image_grid(count: int, ncols: int, size: float):
    """A figure with enough axes for ``count`` images, ``ncols`` per row, axes hidden."""
    nrows = max(1, -(-count // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def _figure(ax):
    if ax is None:
        fig, ax = plt.subplots()
        return fig, ax
    return ax.figure, ax


def _xyxy(bbox: Sequence[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def _whiskers(means: Sequence[float], stds: Sequence[float]) -> np.ndarray:
    """Error bars of one standard deviation, cut at zero below (a dAP is never negative)."""
    return np.array([[min(s, max(m, 0.0)) for m, s in zip(means, stds, strict=True)], stds])
