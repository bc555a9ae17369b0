"""TIDE: the dAP of each error type, and each detection's verdict drawn on its image."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np

from .base import (
    _CLASS_COLORS,
    VERDICT_COLORS,
    _image_grid,
    _whiskers,
    _xyxy,
    draw_boxes,
    to_display,
)

__all__ = ["plot_tide", "draw_verdicts", "plot_error_examples"]


def plot_tide(errors: Mapping[str, Mapping], *, title: str | None = None):
    """Bar charts of TIDE's main and special dAP, one series per model.

    Args:
        errors: model name -> the dict of :func:`colad.tide.tide_errors`, or of
            :func:`colad.tide.summarize_errors` (means, with its ``std`` drawn as error bars).

    Returns:
        The ``Figure`` (two axes: main errors, special errors).
    """
    from ..tide import MAIN_ERRORS, SPECIAL_ERRORS

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
