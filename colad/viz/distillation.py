"""Distillation: a student's and a teacher's assignments side by side, CoLAD's
teacher switch, and comparisons of methods over seeds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from .assignment import plot_positives
from .base import _CLASS_COLORS, ROLE_COLORS, _figure

__all__ = [
    "own_vs_teacher",
    "assignments_side_by_side",
    "plot_side_distributions",
    "plot_switch",
    "plot_comparison",
    "plot_gains",
]


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
    from ..gfl import boxes_to_distances, expected_distances
    from ..losses import distribution_kl

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
