"""Label assignment: anchors per level, positives, candidates and PAA's mixture."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from .base import _CLASS_COLORS, ROLE_COLORS, _figure, draw_boxes, to_display

__all__ = ["plot_anchor_levels", "plot_positives", "plot_candidates", "plot_mixture"]


def plot_anchor_levels(
    anchors_per_level: Sequence[Tensor],
    strides: Sequence[int],
    image_size: tuple[int, int],
    *,
    size: float = 2.4,
):
    """One panel per FPN level: every anchor centre, and the anchor of one central cell drawn
    in full, over the image's outline.

    Args:
        anchors_per_level: ``Tensor[H_l * W_l, 4]`` per level.
        image_size: ``(h, w)`` of the image.
    """
    height, width = image_size
    fig, axes = plt.subplots(1, len(strides), figsize=(size * len(strides), size * 0.9))
    for ax, anchors, stride in zip(np.atleast_1d(axes), anchors_per_level, strides, strict=True):
        anchors = anchors.cpu().numpy()
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        ax.scatter(centres[:, 0], centres[:, 1], s=3, color=ROLE_COLORS["ignored"])
        middle = np.argmin(((centres - [width / 2, height / 2]) ** 2).sum(1))
        outline = mpl.patches.Rectangle((0, 0), width, height, fill=False, linestyle="--")
        ax.add_patch(outline)  # the image
        draw_boxes(ax, anchors[middle : middle + 1], color=ROLE_COLORS["teacher"], linewidth=2)
        side = anchors[0, 2] - anchors[0, 0]
        ax.set_title(f"stride {stride}: {len(anchors)} anchors of {side:.0f} px", fontsize=8)
        ax.set_xlim(min(-8, anchors[middle, 0] - 8), max(width, anchors[middle, 2]) + 8)
        ax.set_ylim(max(height, anchors[middle, 3]) + 8, min(-8, anchors[middle, 1] - 8))
        ax.set_aspect("equal")
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_positives(
    image: Tensor,
    gt_boxes: Tensor,
    anchors: Tensor,
    positives: Mapping[str, Tensor],
    *,
    size: float = 3.0,
):
    """Side by side, the anchors that each rule makes positive, over the image and its objects.

    Args:
        image: ``Tensor[3, H, W]`` (as :func:`to_display` accepts).
        gt_boxes (Tensor[M, 4]): the objects.
        anchors (Tensor[A, 4]): all anchors.
        positives: rule name -> ``Tensor[A]`` long, the object index of each positive anchor
            (``-1`` elsewhere), e.g. an ``Assignment``'s ``matched_idxs`` row.
    """
    fig, axes = plt.subplots(1, len(positives), figsize=(size * len(positives), size * 0.75))
    for ax, (name, matched) in zip(np.atleast_1d(axes), positives.items(), strict=True):
        ax.imshow(to_display(image))
        draw_boxes(ax, gt_boxes, color=ROLE_COLORS["gt"], linewidth=1.5)
        chosen = (matched >= 0).nonzero()[:, 0]
        boxes = anchors[chosen].cpu().numpy()
        colours = [_CLASS_COLORS[int(g) % 10] for g in matched[chosen]]
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        for (x1, y1, x2, y2), colour in zip(boxes, colours, strict=True):
            outline = mpl.patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False)
            outline.set(edgecolor=colour, linewidth=0.4, alpha=0.6)
            ax.add_patch(outline)
        ax.scatter(
            centres[:, 0], centres[:, 1], s=10, c=colours, edgecolors="white", linewidths=0.5
        )
        ax.set_title(f"{name}: {len(chosen)} positives", fontsize=8)
        ax.set_xlim(0, image.shape[-1])
        ax.set_ylim(image.shape[-2], 0)
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_candidates(
    image: Tensor,
    gt_box: Tensor,
    boxes: Tensor,
    costs: Tensor,
    positive: Tensor,
    *,
    ax=None,
    title: str | None = None,
):
    """One object's candidate anchors, coloured by cost, the positives drawn thick.

    Args:
        image: ``Tensor[3, H, W]``.
        gt_box (Tensor[4]): the object.
        boxes (Tensor[n, 4]), costs (Tensor[n]), positive (Tensor[n] bool): its candidates.
    """
    fig, ax = _figure(ax)
    ax.imshow(to_display(image))
    cmap = plt.get_cmap("viridis")
    norm = mpl.colors.Normalize(float(costs.min()), float(costs.max()))
    order = torch.argsort(costs.cpu(), descending=True)  # cheapest drawn last, on top
    for k in order.tolist():
        x1, y1, x2, y2 = boxes[k].tolist()
        patch = mpl.patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False)
        patch.set(edgecolor=cmap(norm(float(costs[k]))), linewidth=2.0 if positive[k] else 0.6)
        ax.add_patch(patch)
    draw_boxes(ax, gt_box[None], color=ROLE_COLORS["gt"], linestyle="--", linewidth=1.5)
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="anchor cost $c$")
    ax.set_xlim(0, image.shape[-1])
    ax.set_ylim(image.shape[-2], 0)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def plot_mixture(
    costs: Tensor,
    weights: Tensor,
    means: Tensor,
    variances: Tensor,
    positive: Tensor,
    *,
    ax=None,
    title: str | None = None,
):
    """An object's candidate costs, the two fitted weighted Gaussians and the PAA cut.

    Args:
        costs (Tensor[n]): the candidates' costs.
        weights, means, variances (Tensor[2]): the mixture (component 0 = foreground).
        positive (Tensor[n] bool): the candidates PAA keeps.
    """
    fig, ax = _figure(ax)
    costs, positive = costs.double().cpu(), positive.cpu()
    low, high = float(costs.min()), float(costs.max())
    span = max(high - low, 1e-3)
    grid = torch.linspace(low - 0.15 * span, high + 0.15 * span, 400, dtype=torch.float64)
    for k, (role, name) in enumerate([("student", "foreground"), ("ignored", "background")]):
        var = float(variances[k])
        density = float(weights[k]) * torch.exp(-((grid - float(means[k])) ** 2) / (2 * var))
        density = density / (2 * np.pi * var) ** 0.5
        ax.plot(grid, density, color=ROLE_COLORS[role], label=f"{name} component")
    top = ax.get_ylim()[1]
    ax.scatter(costs[~positive], np.zeros(int((~positive).sum())), marker="|", s=200,
               color=ROLE_COLORS["ignored"], label="negative")  # fmt: skip
    ax.scatter(costs[positive], np.zeros(int(positive.sum())), marker="|", s=200,
               color=ROLE_COLORS["student"], label="positive")  # fmt: skip
    if positive.any():
        cut = float(costs[positive].max())
        ax.axvline(cut, color="black", linestyle="--", linewidth=0.8, label="cut")
    ax.set_ylim(-0.05 * top, top)
    ax.set_xlabel("anchor cost $c$")
    ax.set_ylabel("weighted density")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return fig
