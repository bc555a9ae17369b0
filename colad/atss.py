"""ATSS assignment, as GFL and LD use it: a pure function of anchors and objects.

Adaptive training sample selection (ALGORITHMS.md §16.4), batched over the images and objects of
a batch. It never looks at predictions, so it gives the same positives at every step for the same
image, and a teacher and its student always agree on it:

1. For each object and FPN level, the ``topk`` anchors whose centres are nearest the object's
   centre are its candidates (up to ``topk * L`` per object).
2. The object's IoU threshold is the mean plus the (unbiased) standard deviation of its
   candidates' IoUs.
3. A candidate is positive if its IoU reaches the threshold and its centre lies inside the
   object (by more than 0.01 px on every side).
4. An anchor positive for several objects goes to the one it overlaps most.

The result is the same :class:`colad.paa.Assignment` as PAA's, so every loss that reads an
assignment reads this one too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

from colad.paa import BACKGROUND, IGNORE, Assignment, pad_targets

__all__ = ["CENTRE_MARGIN", "ATSSTrace", "atss_trace", "atss_assign"]

#: An anchor centre must lie this far (px) inside every side of an object to be its positive.
CENTRE_MARGIN = 0.01


@dataclass(frozen=True)
class ATSSTrace:
    """One ATSS assignment with its intermediate values (for figures and tests).

    Attributes:
        iou (Tensor[B, M, A]): IoU of every object with every anchor box.
        candidate (Tensor[B, M, A] bool): the ``topk`` nearest anchors per object and level.
        threshold (Tensor[B, M] float64): mean + std of each object's candidate IoUs (``inf``
            for padding objects and objects without candidates).
        inside (Tensor[B, M, A] bool): anchor centre inside the object, with the margin.
        positive (Tensor[B, M, A] bool): candidates that pass both tests, before conflicts.
        matched_idxs (Tensor[B, A] long): the result (:class:`colad.paa.Assignment`).
        gt_boxes, gt_labels: the padded objects (:func:`colad.paa.pad_targets`).
    """

    iou: Tensor
    candidate: Tensor
    threshold: Tensor
    inside: Tensor
    positive: Tensor
    matched_idxs: Tensor
    gt_boxes: Tensor
    gt_labels: Tensor

    def assignment(self) -> Assignment:
        return Assignment(self.matched_idxs, self.gt_boxes, self.gt_labels)


def _nearest_per_level(distance: Tensor, num_per_level: Sequence[int], topk: int) -> Tensor:
    """The ``topk`` smallest finite entries of ``distance`` (Tensor[B, M, A]) within each level,
    as a mask. Equal distances are broken by the lower anchor index (a stable sort), so the choice
    is the same on every device and every run."""
    candidate = torch.zeros_like(distance, dtype=torch.bool)
    start = 0
    for count in num_per_level:
        level = distance[..., start : start + count]
        nearest = level.argsort(dim=-1, stable=True)[..., : min(topk, count)]
        chosen = torch.zeros_like(level, dtype=torch.bool).scatter_(-1, nearest, True)
        candidate[..., start : start + count] = chosen & level.isfinite()
        start += count
    if start != distance.shape[-1]:
        raise ValueError(f"num_anchors_per_level sums to {start}, not {distance.shape[-1]} anchors")
    return candidate


def _thresholds(iou: Tensor, candidate: Tensor) -> Tensor:
    """Mean + unbiased std of each object's candidate IoUs (Tensor[B, M], float64).

    In float64 a set of equal IoUs has exactly their value as the mean and 0 as the std, so all
    of them pass the ``>=`` test (a float32 mean may round below them). An object with a single
    candidate gets std 0 (the unbiased std of one value is undefined; ALGORITHMS.md §16.11.4),
    one with none an infinite threshold.
    """
    values = iou.double()
    count = candidate.sum(-1)
    mean = torch.where(candidate, values, 0.0).sum(-1) / count.clamp(min=1)
    square = torch.where(candidate, (values - mean[..., None]) ** 2, 0.0).sum(-1)
    std = torch.where(count > 1, (square / (count - 1).clamp(min=1)).sqrt(), 0.0)
    return torch.where(count > 0, mean + std, torch.inf)


@torch.no_grad()
def atss_trace(
    anchors: Tensor,
    valid: Tensor,
    targets: list[dict[str, Tensor]],
    num_anchors_per_level: Sequence[int],
    *,
    topk: int = 9,
) -> ATSSTrace:
    """ATSS on a batch, with every intermediate value (:func:`atss_assign` returns the result).

    Args:
        anchors (Tensor[A, 4]): xyxy anchor boxes (their centres are the regression points).
        valid (Tensor[B, A] bool): anchors inside each image's own extent; the others are never
            candidates and are ignored by the losses.
        targets: per image, ``boxes`` (Tensor[N, 4]) and ``labels`` (Tensor[N]).
        num_anchors_per_level: ``H_l * W_l`` per level (anchors in colad's flattening order).
        topk: candidates per object and level (9).

    Reference:
        Zhang et al., CVPR 2020 (ATSS); ALGORITHMS.md §16.4, §16.11.
    """
    if topk < 1:
        raise ValueError(f"topk={topk}; need at least one candidate per level")
    gt_boxes, gt_labels, gt_mask = pad_targets(targets, device=anchors.device)
    batch, num_gts = gt_mask.shape
    iou = box_iou(gt_boxes.reshape(-1, 4), anchors.float()).view(batch, num_gts, -1)
    anchor_centre = (anchors[:, :2] + anchors[:, 2:]).float() / 2
    gt_centre = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
    distance = (anchor_centre[None, None] - gt_centre[:, :, None]).square().sum(-1).sqrt()
    usable = gt_mask[:, :, None] & valid[:, None, :]
    distance = distance.masked_fill(~usable, torch.inf)
    candidate = _nearest_per_level(distance, num_anchors_per_level, topk)
    threshold = _thresholds(iou, candidate)
    # Distances of the anchor centre from the object's four sides, all above the margin.
    sides = torch.cat(
        [anchor_centre[None, None] - gt_boxes[:, :, None, :2],
         gt_boxes[:, :, None, 2:] - anchor_centre[None, None]], dim=-1,
    )  # fmt: skip
    inside = sides.amin(-1) > CENTRE_MARGIN
    positive = candidate & (iou.double() >= threshold[..., None]) & inside
    # Conflicts: the object with the largest IoU (the first one on an exact tie).
    best_gt = torch.where(positive, iou, -1.0).argmax(dim=1)
    matched = torch.where(positive.any(dim=1), best_gt, BACKGROUND)
    matched = torch.where(valid, matched, IGNORE)
    return ATSSTrace(iou, candidate, threshold, inside, positive, matched, gt_boxes, gt_labels)


def atss_assign(
    anchors: Tensor,
    valid: Tensor,
    targets: list[dict[str, Tensor]],
    num_anchors_per_level: Sequence[int],
    *,
    topk: int = 9,
) -> Assignment:
    """ATSS assignment of a batch (the steps of the module docstring).

    Args: as :func:`atss_trace`.

    Returns:
        An :class:`colad.paa.Assignment`: ``matched_idxs`` is the object's index for positives,
        ``-1`` for the other valid anchors (every one of them learns background) and ``-2`` for
        anchors outside the image (no loss). An image without objects is all background.

    Example:
        >>> from colad.anchors import anchors_per_level
        >>> anchors = torch.cat(anchors_per_level([(8, 8)], [8], scale=4.0))
        >>> valid = torch.ones(1, 64, dtype=torch.bool)
        >>> target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([2])}
        >>> assignment = atss_assign(anchors, valid, [target], [64])
        >>> assignment.num_pos > 0, assignment.labels(num_classes=3).max().item()
        (True, 3)
    """
    trace = atss_trace(anchors, valid, targets, num_anchors_per_level, topk=topk)
    return trace.assignment()
