"""The benchmark's images and objects, training curves and a model's detections."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from .base import _CLASS_COLORS, ROLE_COLORS, _figure, _image_grid, draw_boxes, to_display

__all__ = ["show_samples", "plot_object_sizes", "show_detections", "plot_history"]


def show_samples(dataset, indices: Sequence[int] = range(6), *, ncols: int = 3, size: float = 2.2):
    """Show items of a :class:`colad.data.CocoDetection` with their ground-truth boxes.

    Returns:
        The ``Figure``.
    """
    indices = list(indices)
    fig, axes = _image_grid(len(indices), ncols, size)
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


def show_detections(
    model,
    dataset,
    indices: Sequence[int] = range(6),
    *,
    min_score: float = 0.3,
    ncols: int = 3,
    size: float = 2.6,
):
    """Detections of ``model`` scoring at least ``min_score`` (solid, coloured by class, with
    scores) over the ground truth (white, dashed) on items of a
    :class:`colad.data.CocoDetection`.

    Returns:
        The ``Figure``.
    """
    indices = list(indices)
    fig, axes = _image_grid(len(indices), ncols, size)
    model.eval()
    for ax, i in zip(axes.flat, indices, strict=False):
        image, target = dataset[i]
        with torch.no_grad():
            found = model([image])[0]
        keep = found["scores"] >= min_score
        ax.imshow(to_display(image))
        draw_boxes(ax, target["boxes"], color="white", linestyle="--", linewidth=1.0)
        draw_boxes(ax, found["boxes"][keep], found["labels"][keep], names=dataset.names,
                   scores=found["scores"][keep].tolist())  # fmt: skip
        ax.set_title(f"{int(keep.sum())} detections, {len(target['boxes'])} objects", fontsize=8)
    fig.tight_layout()
    return fig


def plot_history(
    history: Sequence[Mapping[str, float]],
    *,
    keys: Sequence[str] | None = None,
    window: int = 25,
    ax=None,
):
    """Training losses per step (a running mean over ``window`` steps; skipped steps left out),
    with the learning rate on a second axis.

    Args:
        history: :attr:`colad.engine.RunResult.history`.
        keys: the losses to draw (default: every ``loss_*`` and the total ``loss``).
    """
    fig, ax = _figure(ax)
    kept = [h for h in history if not h.get("skipped")]
    if not kept:
        raise ValueError("plot_history: no finished step to plot")
    keys = list(keys or [k for k in kept[0] if k.startswith("loss")])
    steps = np.array([h["step"] for h in kept])
    width = max(1, min(window, len(kept)))
    kernel = np.ones(width) / width
    for key in keys:
        values = np.array([h[key] for h in kept], dtype=float)
        smooth = np.convolve(values, kernel, mode="valid")
        ax.plot(steps[width - 1 :], smooth, label=key, linewidth=1.4 if key == "loss" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (mean of {width} steps)")
    rate = ax.twinx()
    rate.plot(steps, [h["lr"] for h in kept], color="0.6", linestyle=":", label="learning rate")
    rate.set_ylabel("learning rate", color="0.4")
    rate.grid(False)
    lines = ax.get_legend_handles_labels()
    extra = rate.get_legend_handles_labels()
    ax.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize=8, loc="upper right")
    return fig
