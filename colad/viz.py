"""Plotting for the book: boxes on images, sample grids, TIDE error bars, anchors, assignments,
fitted mixtures, training curves and detections.

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
    "plot_anchor_levels",
    "plot_positives",
    "plot_candidates",
    "plot_mixture",
    "plot_history",
    "show_detections",
    "own_vs_teacher",
    "assignments_side_by_side",
    "plot_side_distributions",
    "plot_switch",
    "plot_comparison",
    "cop_neighbourhood",
    "plot_cop_neighbourhood",
    "plot_gains",
    "VERDICT_COLORS",
    "draw_verdicts",
    "plot_error_examples",
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


def plot_tide(errors: Mapping[str, Mapping], *, title: str | None = None):
    """Bar charts of TIDE's main and special dAP, one series per model.

    Args:
        errors: model name -> the dict of :func:`colad.tide.tide_errors`, or of
            :func:`colad.tide.summarize_errors` (means, with its ``std`` drawn as error bars).

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
            spread = errors[name].get("std", {}).get(panel)
            ax.bar(
                x + (k - (len(names) - 1) / 2) * width,
                values,
                width,
                yerr=_whiskers(values, [spread[kind] for kind in kinds]) if spread else None,
                capsize=2 if spread else 0,
                error_kw={"elinewidth": 0.8},
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


def _whiskers(means: Sequence[float], stds: Sequence[float]) -> np.ndarray:
    """Error bars of one standard deviation, cut at zero below (a dAP is never negative)."""
    return np.array([[min(s, max(m, 0.0)) for m, s in zip(means, stds, strict=True)], stds])


def _xyxy(bbox: Sequence[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def draw_verdicts(
    ax,
    dataset,
    index: int,
    verdicts,
    *,
    min_score: float = 0.0,
    category: int | None = None,
) -> dict[str, int]:
    """Draw item ``index`` of ``dataset`` (a :class:`colad.data.CocoDetection` without
    transforms, the images the detections were made on) with its objects (white, dashed), the
    detections scoring at least ``min_score`` coloured by TIDE's verdict (:data:`VERDICT_COLORS`,
    tagged with verdict and score) and the missed objects (dotted).

    Args:
        verdicts: :func:`colad.tide.classify_detections` of the detections.
        category: draw only this category id (objects and detections); ``None`` for all.

    Returns:
        The number of drawn detections per verdict, and of missed objects (``Miss``).
    """
    image, target = dataset[index]
    image_id = int(dataset.image_record(index)["id"])
    label_of = {cid: label for label, cid in enumerate(dataset.index.category_ids)}
    wanted = label_of.get(category) if category is not None else None
    ax.imshow(to_display(image))
    ax.set_axis_off()
    objects = [b for b, lab in zip(target["boxes"].tolist(), target["labels"].tolist(),
                                   strict=True) if wanted is None or lab == wanted]  # fmt: skip
    draw_boxes(ax, objects, color="white", linestyle="--", linewidth=0.8)
    drawn: dict[str, int] = {}
    for i in reversed(verdicts.on_image(image_id)):  # best-scored drawn last, on top
        det, kind = verdicts.detections[i], verdicts.kinds[i]
        if det["score"] < min_score or (category is not None and det["category_id"] != category):
            continue
        draw_boxes(ax, [_xyxy(det["bbox"])], names=[kind], labels=[0], scores=[det["score"]],
                   color=VERDICT_COLORS[kind])  # fmt: skip
        drawn[kind] = drawn.get(kind, 0) + 1
    for obj in verdicts.missed:
        if obj["image_id"] == image_id and category in (None, obj["category_id"]):
            draw_boxes(ax, [_xyxy(obj["bbox"])], names=["Miss"], labels=[0],
                       color=VERDICT_COLORS["Miss"], linestyle=":", linewidth=1.6)  # fmt: skip
            drawn["Miss"] = drawn.get("Miss", 0) + 1
    return drawn


def plot_error_examples(dataset, verdicts, examples: Mapping[str, Mapping], *, size: float = 2.3,
                        margin: float = 1.0):  # fmt: skip
    """One panel per error kind: the example's detection (coloured by its kind) and the object
    it concerns (white, dashed), on a crop of its image around both.

    Args:
        dataset: the :class:`colad.data.CocoDetection` (no transforms) the detections are on.
        verdicts: :func:`colad.tide.classify_detections` of the detections.
        examples: :func:`colad.tide.error_examples`.
        margin: the crop's border, as a fraction of the boxes' joint size.

    Returns:
        The ``Figure``.
    """
    row_of = {int(dataset.image_record(i)["id"]): i for i in range(len(dataset))}
    names = dict(zip(dataset.index.category_ids, dataset.names, strict=True))
    fig, axes = _image_grid(len(examples), min(len(examples), 6) or 1, size)
    for ax, (kind, example) in zip(axes.flat, examples.items(), strict=False):
        image, _ = dataset[row_of[example["image_id"]]]
        ax.imshow(to_display(image))
        boxes = []
        if example["object"] is not None:
            box = _xyxy(example["object"]["bbox"])
            tag = names.get(example["object"]["category_id"])
            draw_boxes(ax, [box], labels=[0], names=[tag], color="white", linestyle="--")
            boxes.append(box)
        if example["detection"] is not None:
            det = verdicts.detections[example["detection"]]
            box = _xyxy(det["bbox"])
            draw_boxes(ax, [box], labels=[0], names=[names.get(det["category_id"])],
                       scores=[det["score"]], color=VERDICT_COLORS[kind])  # fmt: skip
            boxes.append(box)
        x1, y1 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x2, y2 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        pad = margin * max(x2 - x1, y2 - y1, 8.0)
        height, width = image.shape[-2:]
        ax.set_xlim(max(x1 - pad, 0), min(x2 + pad, width))
        ax.set_ylim(min(y2 + pad, height), max(y1 - pad, 0))
        ax.set_title(kind, color=VERDICT_COLORS[kind], fontsize=9)
    fig.tight_layout()
    return fig


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


@torch.no_grad()
def own_vs_teacher(student, teacher, dataset, indices: Sequence[int] = range(20), *, size=3.0):
    """The image of ``dataset`` (among ``indices``) where the student's own PAA positives and
    its teacher's differ most, drawn side by side with :func:`plot_positives`.

    Args:
        student, teacher: :class:`colad.detector.Detector` (eval mode is set here).

    Returns:
        ``(figure, facts)``; ``facts`` has the image ``index`` and the number of positives
        ``own``, ``teacher`` and ``shared`` (same anchor, same object).
    """
    fig, facts = assignments_side_by_side(
        {"student's own": student, "teacher's (LAD)": teacher}, dataset, indices, size=size
    )
    own, taught = facts["positives"].values()
    return fig, {"index": facts["index"], "own": own, "teacher": taught, "shared": facts["shared"]}


def assignments_side_by_side(
    detectors: Mapping[str, object], dataset, indices: Sequence[int] = range(20), *, size=3.0
):
    """The image of ``dataset`` (among ``indices``) where two detectors' assignments differ
    most, their positives drawn side by side (:func:`plot_positives`).

    Each detector assigns with its own rule (:meth:`colad.detector.Detector.assign`: PAA's
    from its predictions, ATSS for a GFL detector); they must share the anchor grid.

    Args:
        detectors: two named detectors (eval mode is set here).

    Returns:
        ``(figure, facts)``; ``facts``: the image ``index``, ``positives`` per detector name,
        ``shared`` (same anchor, same object) and ``per_level`` (name -> positives per level).
    """
    if len(detectors) != 2:
        raise ValueError(f"assignments_side_by_side compares two detectors, got {len(detectors)}")
    best = None
    for i in [i for i in indices if i < len(dataset)]:
        image, target = dataset[i]
        found = {}
        for name, detector in detectors.items():
            predictions = detector.eval().predict([image])
            found[name] = detector.assign(predictions, [target]).matched_idxs[0]
        first, second = found.values()
        shared = int(((first >= 0) & (first == second)).sum())
        differ = int((first >= 0).sum()) + int((second >= 0).sum()) - 2 * shared
        if best is None or differ > best[0]:
            best = (differ, i, image, target, found, shared, predictions)
    _, i, image, target, found, shared, predictions = best
    fig = plot_positives(image, target["boxes"], predictions.anchors, found, size=size)
    levels = np.repeat(np.arange(len(predictions.num_anchors_per_level)),
                       predictions.num_anchors_per_level)  # fmt: skip
    per_level = {
        name: np.bincount(levels[(m >= 0).cpu().numpy()], minlength=len(predictions.strides))
        for name, m in found.items()
    }
    facts = {"index": i, "positives": {n: int((m >= 0).sum()) for n, m in found.items()},
             "shared": shared, "per_level": per_level}  # fmt: skip
    return fig, facts


def plot_side_distributions(student, teacher, image: Tensor, target: Mapping[str, Tensor], *,
                            temperature: float = 10.0, size: float = 2.2):  # fmt: skip
    """What LD distils, at one positive: each box side's distribution over the distance bins
    from a GFL teacher and a GFL student, at ``T = 1`` and softened at ``temperature``, with the
    object's true distance.

    The positive shown is the student's (ATSS) positive where the teacher's joint score is
    highest.

    Returns:
        ``(figure, facts)``; ``facts``: ``anchor``, ``stride``, ``target`` (the four distances in
        strides), ``teacher`` and ``student`` (their expected distances) and ``kl`` (LD's loss of
        each side, :func:`colad.losses.distribution_kl`).
    """
    from .gfl import boxes_to_distances, expected_distances
    from .losses import distribution_kl

    with torch.no_grad():
        outputs = {}
        for name, net in (("teacher", teacher), ("student", student)):
            outputs[name] = net.eval().predict([image])
        predictions = outputs["student"]
        assignment = student.assign(predictions, [target])
        positives = assignment.positive[0].nonzero()[:, 0]
        if not len(positives):
            raise ValueError("plot_side_distributions: the image has no positive anchor")
        scores = torch.sigmoid(outputs["teacher"].head["cls_logits"][0, positives]).amax(-1)
        anchor = int(positives[int(scores.argmax())])
        stride = float(predictions.anchor_strides()[anchor])
        centre = (predictions.anchors[anchor, :2] + predictions.anchors[anchor, 2:]) / 2
        box = assignment.target_boxes(torch.tensor([0]), torch.tensor([anchor]))
        bins = predictions.head["box_logits"].shape[-1] // 4
        truth = boxes_to_distances(centre[None] / stride, box / stride, bins - 1)[0]
        logits = {n: o.head["box_logits"][0, anchor].view(4, bins) for n, o in outputs.items()}
    fig, axes = plt.subplots(2, 4, figsize=(size * 4, size * 1.4), sharex=True)
    x = np.arange(bins)
    for row, scale in enumerate((1.0, temperature)):
        for side, ax in enumerate(axes[row]):
            for k, (name, values) in enumerate(logits.items()):
                probs = torch.softmax(values[side] / scale, -1).numpy()
                ax.bar(x + (k - 0.5) * 0.4, probs, 0.4, color=ROLE_COLORS[name], label=name)
            ax.axvline(float(truth[side]), color=ROLE_COLORS["gt"], linestyle="--",
                       label="object")  # fmt: skip
            if row == 0:
                ax.set_title(("left", "top", "right", "bottom")[side], fontsize=9)
            if side == 0:
                ax.set_ylabel(f"T = {scale:g}")
    for ax in axes[1]:
        ax.set_xlabel("distance (strides)")
    axes[0, 0].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    kl = distribution_kl(logits["student"], logits["teacher"], temperature)
    facts = {
        "anchor": anchor, "stride": stride, "target": truth.tolist(),
        **{n: expected_distances(v.flatten()).tolist() for n, v in logits.items()},
        "kl": kl.tolist(),
    }  # fmt: skip
    return fig, facts


def plot_switch(history: Sequence[Mapping[str, float]], *, window: int = 25, ax=None):
    """CoLAD's switch over training: the fraction of (object, level) groups whose costs came
    from network 2, per FPN level and over all levels (running means over ``window`` steps).

    Args:
        history: a CoLAD run's :attr:`colad.engine.RunResult.history`.
    """
    fig, ax = _figure(ax)
    kept = [h for h in history if not h.get("skipped")]
    keys = [k for k in kept[0] if k.startswith("switch_net2")]
    if not keys:
        raise ValueError("plot_switch: not a CoLAD history (no switch_net2 entries)")
    steps = np.array([h["step"] for h in kept])
    width = max(1, min(window, len(kept)))
    for key in keys:
        values = np.array([h[key] for h in kept], dtype=float)
        valid = np.isfinite(values)
        smooth = np.convolve(np.where(valid, values, 0), np.ones(width), mode="valid")
        counts = np.convolve(valid.astype(float), np.ones(width), mode="valid")
        label = "all levels" if key == "switch_net2" else key.rsplit("_", 1)[-1]
        ax.plot(steps[width - 1 :], smooth / np.maximum(counts, 1), label=label,
                linewidth=1.6 if key == "switch_net2" else 1.0)  # fmt: skip
    ax.axhline(0.5, color="0.6", linestyle=":", linewidth=0.8)
    ax.set(xlabel="step", ylabel="groups taught by network 2", ylim=(0, 1))
    ax.legend(fontsize=8)
    return fig


def plot_comparison(summary, *, metric: str = "AP", ax=None):
    """Mean ± std (error bars) of ``metric`` per experiment and network of a
    :func:`colad.sweep.summarize` table, one bar each."""
    fig, ax = _figure(ax)
    labels = [
        name if network == "model" else f"{name} ({network})"
        for name, network in zip(summary["experiment"], summary["network"], strict=True)
    ]
    means, stds = summary[f"{metric} mean"], summary[f"{metric} std"].fillna(0.0)
    x = np.arange(len(labels))
    ax.bar(x, means, yerr=stds, capsize=3, color=[_CLASS_COLORS[k % 10] for k in x], alpha=0.8)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    low = float((means - stds).min())
    ax.set_ylim(max(0.0, low - 0.05), float((means + stds).max()) + 0.02)
    return fig


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
    from .data import batch_images
    from .heads import cop_fuse

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


def plot_gains(gains, *, ax=None):
    """Gains over a baseline with error bars (twice the standard error), grouped by backbone.

    Args:
        gains: a DataFrame with columns ``backbone``, ``row`` (what is compared), ``gain`` and
            ``se``, one line per (backbone, row).
    """
    fig, ax = _figure(ax)
    rows = list(dict.fromkeys(gains["row"]))
    backbones = list(dict.fromkeys(gains["backbone"]))
    width = 0.8 / len(rows)
    for k, name in enumerate(rows):
        part = gains[gains["row"] == name].set_index("backbone").reindex(backbones)
        x = np.arange(len(backbones)) + (k - (len(rows) - 1) / 2) * width
        ax.bar(x, part["gain"], width, yerr=2 * part["se"].fillna(0.0), capsize=2,
               color=_CLASS_COLORS[k % 10], alpha=0.85, label=name)  # fmt: skip
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(backbones)), backbones)
    ax.set_ylabel("AP gain (bars: ± 2 standard errors)")
    ax.legend(frameon=False, fontsize=7)
    return fig


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
