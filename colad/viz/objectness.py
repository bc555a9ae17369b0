"""Conditional objectness (COP): a positive anchor's neighbourhood, and gains by question."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from .base import ROLE_COLORS, draw_boxes, to_display

__all__ = ["cop_neighbourhood", "plot_cop_neighbourhood"]


@torch.no_grad()
def cop_neighbourhood(model, image: Tensor, target: Mapping[str, Tensor]) -> dict:
    """What a COP head computes around the object it is most sure of, in one image.

    Runs the head level by level, keeping the class logits ``z`` and the nine weight logits
    before :func:`colad.heads.cop_fuse` mixes them, and picks, among locations whose anchor
    centre lies inside an object, the one with the highest fused probability for that object's
    class.

    Returns:
        ``index`` / ``level`` / ``stride`` / ``location`` ``(row, col)``, ``box`` and ``label``
        of the object, the weights ``O`` (float[3, 3]) at the location, the level's class maps
        ``before`` = sigmoid(z) and ``after`` = the fused probabilities (float[H, W], the
        object's class), and ``image`` (the normalised image).
    """
    from ..data import batch_images
    from ..heads import cop_fuse

    if model.config.head != "cop":
        raise ValueError(f"cop_neighbourhood needs a COP head, not {model.head_variant}")
    model.eval()
    batch = batch_images([image], 32)
    features = model.features(batch.tensors)
    head, best = model.head, None
    for level, (feature, stride) in enumerate(zip(features, model.strides, strict=True)):
        logits = head.cls_logits(head.cls_tower(feature))[0]
        weights = head.cop_weights(head.reg_tower(feature))[0]
        fused = cop_fuse(logits[None], weights[None])[0]
        centres = (torch.arange(fused.shape[-1]) + 0.5) * stride, (
            torch.arange(fused.shape[-2]) + 0.5
        ) * stride  # fmt: skip
        for box, label in zip(target["boxes"], target["labels"], strict=True):
            inside_x = (centres[0] > box[0]) & (centres[0] < box[2])
            inside_y = (centres[1] > box[1]) & (centres[1] < box[3])
            mask = inside_y[:, None] & inside_x[None, :]
            if not mask.any():
                continue
            scores = torch.where(mask, fused[label], torch.tensor(-1.0))
            flat = int(scores.argmax())
            row, col = divmod(flat, scores.shape[-1])
            if best is None or float(scores[row, col]) > best["p"]:
                best = {
                    "p": float(scores[row, col]), "level": level, "stride": stride,
                    "location": (row, col), "box": box.tolist(), "label": int(label),
                    "O": torch.sigmoid(weights[:, row, col]).view(3, 3).numpy(),
                    "before": torch.sigmoid(logits[label]).numpy(),
                    "after": fused[label].numpy(),
                }  # fmt: skip
    if best is None:
        raise ValueError("no anchor centre lies inside any object of this image")
    best["image"] = image
    return best


def plot_cop_neighbourhood(found: Mapping, *, names: Sequence[str] | None = None, size=2.6):
    """Four panels from :func:`cop_neighbourhood`: the object with the location and its 3x3
    neighbourhood of anchors, the nine weights the location predicts, and the level's class map
    before and after the fusion (same colour scale)."""
    fig, axes = plt.subplots(1, 4, figsize=(4 * size, size))
    stride, (row, col) = found["stride"], found["location"]
    image = to_display(found["image"])
    ax = axes[0]
    ax.imshow(image)
    draw_boxes(ax, [found["box"]], [found["label"]], names=names)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            y0, x0 = (row + dy) * stride, (col + dx) * stride
            edge = "white" if (dy, dx) != (0, 0) else "black"
            ax.add_patch(mpl.patches.Rectangle((x0, y0), stride, stride, fill=False,
                                               edgecolor=edge, linewidth=0.8))  # fmt: skip
    ax.set_title(f"location on P{found['level'] + 3} (stride {stride})")
    ax.set_axis_off()
    ax = axes[1]
    ax.imshow(found["O"], cmap="viridis", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(found["O"]):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="white" if value < 0.6 else "black")  # fmt: skip
    ax.set_xticks([0, 1, 2], ["-1", "0", "+1"])
    ax.set_yticks([0, 1, 2], ["-1", "0", "+1"])
    ax.set_title("its nine weights O")
    top = float(max(found["before"].max(), found["after"].max()))
    for ax, key, title in ((axes[2], "before", "class map sigmoid(z)"),
                           (axes[3], "after", "after COP: p")):  # fmt: skip
        shown = ax.imshow(found[key], cmap="magma", vmin=0, vmax=top)
        x1, y1, x2, y2 = (v / stride - 0.5 for v in found["box"])
        ax.add_patch(mpl.patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False,
                                           edgecolor=ROLE_COLORS["gt"], linewidth=1.2))  # fmt: skip
        ax.plot(col, row, marker="s", markersize=6, markerfacecolor="none", color="white")
        ax.set_title(title)
        ax.set_axis_off()
    fig.colorbar(shown, ax=axes[2:], fraction=0.05, label="probability of the object's class")
    return fig
