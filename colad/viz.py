"""Plotting for the book: boxes on images, sample grids, and TIDE error bars.

Functions take ``ax=None`` (a new figure is made) and return the ``Figure``; none calls
``plt.show()``. Only :func:`use_book_style` changes matplotlib's global settings, and only when
a chapter asks for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from .data import IMAGE_MEAN, IMAGE_STD

__all__ = [
    "ROLE_COLORS",
    "use_book_style",
    "to_display",
    "draw_boxes",
    "show_samples",
    "plot_object_sizes",
    "plot_tide",
]

#: One colour per role, used by every figure of the book.
ROLE_COLORS = {
    "gt": "#2ca02c",
    "detection": "#d62728",
    "teacher": "#1f77b4",
    "student": "#ff7f0e",
    "ignored": "#7f7f7f",
}
_CLASS_COLORS = plt.get_cmap("tab10").colors


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


def show_samples(dataset, indices: Sequence[int] = range(6), *, ncols: int = 3, size: float = 2.2):
    """Show items of a :class:`colad.data.CocoDetection` with their ground-truth boxes.

    Returns:
        The ``Figure``.
    """
    indices = list(indices)
    nrows = max(1, -(-len(indices) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, i in zip(axes.flat, indices, strict=False):
        image, target = dataset[i]
        ax.imshow(to_display(image))
        draw_boxes(ax, target["boxes"], target["labels"], names=dataset.names)
        ax.set_title(f"image {int(target['image_id'])}: {len(target['boxes'])} objects", fontsize=8)
    fig.tight_layout()
    return fig


def plot_object_sizes(
    boxes_per_image: Sequence[Tensor],
    names: Sequence[str] | None = None,
    labels_per_image: Sequence[Tensor] | None = None,
    *,
    ax=None,
):
    """Histogram of object sizes (square root of box area, log scale), one series per class
    when labels are given, with COCO's small/medium/large limits (32 and 96 px) marked.

    Returns:
        The ``Figure``.
    """
    fig, ax = plt.subplots(figsize=(5.0, 3.0)) if ax is None else (ax.figure, ax)
    boxes = torch.cat([b.reshape(-1, 4) for b in boxes_per_image])
    sizes = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
    bins = np.geomspace(max(1.0, float(sizes.min()) * 0.9), float(sizes.max()) * 1.1, 30)
    if labels_per_image is None:
        ax.hist(sizes.numpy(), bins=bins, color=ROLE_COLORS["gt"])
    else:
        labels = torch.cat(list(labels_per_image))
        groups = [sizes[labels == k].numpy() for k in range(int(labels.max()) + 1)]
        ax.hist(groups, bins=bins, stacked=True, label=names, color=_CLASS_COLORS[: len(groups)])
        ax.legend(frameon=False, fontsize=7)
    for limit, text in ((32, "small | medium"), (96, "medium | large")):
        if bins[0] < limit < bins[-1]:
            ax.axvline(limit, color="k", linestyle=":", linewidth=1)
            ax.text(limit, ax.get_ylim()[1], text, fontsize=7, ha="center", va="bottom")
    ax.set_xscale("log")
    ticks = [t for t in (4, 8, 16, 32, 64, 128, 256, 512) if bins[0] <= t <= bins[-1]]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(mpl.ticker.NullFormatter())
    ax.set_xlabel("object size: sqrt(box area) in pixels")
    ax.set_ylabel("objects")
    return fig


def plot_tide(errors: Mapping[str, Mapping], *, title: str | None = None):
    """Bar charts of TIDE's main and special dAP, one series per model.

    Args:
        errors: model name -> the dict of :func:`colad.tide.tide_errors`.

    Returns:
        The ``Figure`` (two axes: main errors, special errors).
    """
    from .tide import MAIN_ERRORS, SPECIAL_ERRORS

    names = list(errors)
    fig, (ax_main, ax_special) = plt.subplots(
        1, 2, figsize=(7.5, 2.8), gridspec_kw={"width_ratios": [len(MAIN_ERRORS), 2.6]}
    )
    width = 0.8 / max(1, len(names))
    for panel, kinds, ax in (
        ("main", MAIN_ERRORS, ax_main),
        ("special", SPECIAL_ERRORS, ax_special),
    ):
        x = np.arange(len(kinds))
        for k, name in enumerate(names):
            values = [errors[name][panel][kind] for kind in kinds]
            ax.bar(
                x + (k - (len(names) - 1) / 2) * width,
                values,
                width,
                label=name,
                color=_CLASS_COLORS[k % 10],
            )
        ax.set_xticks(x, kinds)
        ax.set_ylabel("dAP50 (AP points)")
        ax.set_title(f"{panel} errors")
    if len(names) > 1:
        ax_main.legend(frameon=False, ncols=min(3, len(names)))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
