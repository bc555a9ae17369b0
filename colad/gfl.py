"""Generalized Focal Loss (GFL) and Localization Distillation (LD).

GFL (ALGORITHMS.md §16.2-16.7) is a one-stage detector on the same backbone, FPN and anchor
grid as PAA, with three changes:

* **assignment** -- ATSS (:func:`colad.atss.atss_assign`), which ignores predictions;
* **classification** -- one *joint* score per class, trained with the quality focal loss toward
  the IoU of the anchor's current box with its object (:func:`colad.losses.quality_focal_loss`);
  there is no IoU branch, and inference ranks detections by this score alone;
* **regression** -- each box side is a distribution over ``reg_max + 1`` distances (in strides)
  from the anchor's centre; the side is the distribution's mean (:func:`expected_distances`),
  trained with GIoU on the decoded box and the distribution focal loss
  (:func:`colad.losses.distribution_focal_loss`) on the two bins around the target.

LD (§16.8) keeps GFL's training and adds :func:`ld_loss`: at the student's positives, each box
side's distribution learns a frozen GFL teacher's, softened by a temperature
(:func:`colad.losses.distribution_kl`).

:class:`GFLHead` is a head of :class:`colad.detector.Detector` (``ModelConfig.head = "gfl"``);
the detector's ``assign``, ``loss`` and ``detect`` dispatch to this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from colad import dist
from colad.boxes import aligned_giou, aligned_iou
from colad.heads import TowerHead
from colad.losses import distribution_focal_loss, distribution_kl, quality_focal_loss
from colad.paa import IGNORE, Assignment

__all__ = [
    "DFL_MARGIN",
    "GFLHead",
    "expected_distances",
    "distances_to_boxes",
    "boxes_to_distances",
    "decode_boxes",
    "gfl_losses",
    "ld_loss",
]

#: DFL targets stay this far (in strides) below ``reg_max``, so that the bin right of the target
#: exists (``bbox2distance``'s eps in mmdetection and in the GFL authors' code; §16.3).
DFL_MARGIN = 0.1


class GFLHead(TowerHead):
    """The joint class-quality score and the four side distributions of every anchor.

    The towers are PAA's (``num_convs`` x conv3x3 without bias → GroupNorm → ReLU, shared across
    levels). The class conv gives ``C`` joint logits (bias prior ``pi = 0.01``); the box conv gives
    ``4 * (reg_max + 1)`` bin logits per location, side-major (left, top, right, bottom), times
    a learnable per-level scale: the scale multiplies the logits *before* the softmax, so it acts
    as each level's inverse temperature, not as a distance scale.

    Example:
        >>> head = GFLHead(in_channels=16, num_classes=3, num_levels=2, num_convs=1,
        ...                norm_groups=4, reg_max=16)
        >>> out = head([torch.zeros(2, 16, 4, 6), torch.zeros(2, 16, 2, 3)])
        >>> out["cls_logits"].shape, out["box_logits"].shape
        (torch.Size([2, 30, 3]), torch.Size([2, 30, 68]))

    Reference:
        Li et al., NeurIPS 2020 (GFL); ALGORITHMS.md §16.2.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_levels: int,
        *,
        num_convs: int = 4,
        norm_groups: int = 32,
        reg_max: int = 16,
        prior_prob: float = 0.01,
    ) -> None:
        if reg_max < 1:
            raise ValueError(f"reg_max={reg_max}; need at least two bins per side")
        super().__init__(in_channels, num_classes, num_levels, num_convs, norm_groups)
        self.reg_max = reg_max
        self.box_distribution = nn.Conv2d(in_channels, 4 * (reg_max + 1), 3, padding=1)
        self.init_weights(prior_prob)

    # forward (TowerHead's): ``cls_logits`` (Tensor[B, A, C]) and ``box_logits``
    # (Tensor[B, A, 4 * (reg_max + 1)], float32), flattened over levels in colad's anchor order.

    def forward_level(self, feature: Tensor, level: int) -> dict[str, Tensor]:
        """The head on one level's map: ``cls_logits`` [B, C, H, W], ``box_logits``
        [B, 4 * (reg_max + 1), H, W] (float32, as the softmax needs)."""
        box_logits = self.scales[level](self.box_distribution(self.reg_tower(feature)))
        return {
            "cls_logits": self.cls_logits(self.cls_tower(feature)),
            "box_logits": box_logits.float(),
        }


def expected_distances(box_logits: Tensor) -> Tensor:
    """The mean of each side's distribution (GFL's "integral"): Tensor[..., 4] in
    strides.

    ``d = sum_k k * softmax(logits)_k`` over the bins ``k = 0 .. reg_max``, so every
    distance lies in ``[0, reg_max]``: a decoded box always contains its anchor's
    centre.

    Args:
        box_logits (Tensor[..., 4 * (reg_max + 1)]): side-major bin logits.
    """
    bins = box_logits.shape[-1] // 4
    if bins * 4 != box_logits.shape[-1] or bins < 2:
        raise ValueError(
            f"box_logits need 4 * (reg_max + 1) channels; got {box_logits.shape[-1]}",
        )
    probs = F.softmax(box_logits.float().unflatten(-1, (4, bins)), dim=-1)
    return probs @ torch.arange(bins, dtype=probs.dtype, device=probs.device)


def distances_to_boxes(points: Tensor, distances: Tensor) -> Tensor:
    """Boxes ``(x - l, y - t, x + r, y + b)`` around ``points`` (Tensor[N, 2]) from side distances
    (Tensor[N, 4], same units)."""
    return torch.cat([points - distances[:, :2], points + distances[:, 2:]], dim=1)


def boxes_to_distances(points: Tensor, boxes: Tensor, reg_max: int) -> Tensor:
    """The side distances (l, t, r, b) of ``boxes`` from ``points``, clamped to
    ``[0, reg_max - DFL_MARGIN]``: the DFL target (§16.3). Only this target is clamped."""
    distances = torch.cat([points - boxes[:, :2], boxes[:, 2:] - points], dim=1)
    return distances.clamp(min=0, max=reg_max - DFL_MARGIN)


def _centres(anchors: Tensor) -> Tensor:
    return (anchors[:, :2] + anchors[:, 2:]) / 2


def decode_boxes(
    box_logits: Tensor, anchors: Tensor, strides: Tensor, image_size: tuple[int, int] | None = None
) -> Tensor:
    """Boxes in pixels from bin logits: the expected distances times the stride around each
    anchor's centre, clamped to ``[0, w] x [0, h]`` when ``image_size = (h, w)`` is given.

    Args:
        box_logits (Tensor[N, 4 * (reg_max + 1)]), anchors (Tensor[N, 4]), strides (Tensor[N]).
    """
    boxes = distances_to_boxes(_centres(anchors), expected_distances(box_logits) * strides[:, None])
    if image_size is not None:
        height, width = image_size
        boxes = torch.stack(
            [boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
             boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=1,
        )  # fmt: skip
    return boxes


def _box_weights(cls_logits: Tensor, image: Tensor, anchor: Tensor) -> Tensor:
    """``w_i``: each positive's largest joint score over all classes, detached (§16.5)."""
    return torch.sigmoid(cls_logits[image, anchor].detach().float()).amax(-1)


def gfl_losses(
    head_outputs: dict[str, Tensor],
    anchors: Tensor,
    strides: Tensor,
    assignment: Assignment,
    *,
    beta: float = 2.0,
    giou_weight: float = 2.0,
    dfl_weight: float = 0.25,
) -> dict[str, Tensor]:
    """GFL's losses under an assignment (ATSS's, for GFL and LD).

    For a positive ``i`` with stride ``s``: ``p_i`` is its anchor's centre / ``s``, ``b_i`` the
    box decoded from its expected distances and ``g_i`` its object / ``s`` (stride units, so every
    level's boxes count alike). With ``w_i`` the positive's best joint score (detached):

    * ``loss_cls`` = ``sum QFL(z, y) / N`` over every valid anchor and class, the target ``y``
      being ``IoU(b_i, g_i)`` (detached, recomputed every step) at the object's class of a
      positive and 0 everywhere else; ``N = sum over images of max(#positives, 1)``;
    * ``loss_bbox`` = ``giou_weight * sum_i w_i (1 - GIoU(b_i, g_i)) / W`` with
      ``W = max(sum_i w_i, 1)``;
    * ``loss_dfl`` = ``dfl_weight * sum_i w_i * mean over the 4 sides of DFL / W``, the targets
      the sides of ``g_i`` from ``p_i`` clamped to ``[0, reg_max - 0.1]``.

    Under torchrun ``N`` and ``W`` are means over the processes, so the averaged gradients equal
    one process's with the whole batch (§16.6). Without positives the box losses are zero times
    the predictions' sum: every parameter stays in the graph.

    Args:
        head_outputs: ``cls_logits`` (Tensor[B, A, C]) and ``box_logits``
            (Tensor[B, A, 4 * (reg_max + 1)]).
        anchors (Tensor[A, 4]): their centres are the regression points.
        strides (Tensor[A]): each anchor's level stride.
        assignment: the positives and their objects.

    Returns:
        ``{"loss_cls", "loss_bbox", "loss_dfl"}``, scalar tensors.

    Reference:
        Li et al., NeurIPS 2020; ALGORITHMS.md §16.5-16.6, §16.11.
    """
    cls_logits, box_logits = head_outputs["cls_logits"], head_outputs["box_logits"]
    bins = box_logits.shape[-1] // 4
    positive = assignment.positive
    image, anchor = torch.nonzero(positive, as_tuple=True)
    quality = torch.zeros_like(cls_logits, dtype=torch.float32)
    num_samples = dist.mean_across(positive.sum(1).clamp(min=1).sum().float()).clamp(min=1)
    if len(image):
        stride = strides[anchor].float()[:, None]
        points = _centres(anchors[anchor]).float() / stride
        logits = box_logits[image, anchor].float()
        boxes = distances_to_boxes(points, expected_distances(logits))
        objects = assignment.target_boxes(image, anchor).float() / stride
        labels = assignment.labels(cls_logits.shape[-1])[image, anchor]
        quality[image, anchor, labels] = aligned_iou(boxes.detach(), objects)
        weight = _box_weights(cls_logits, image, anchor)
    else:
        weight = box_logits.new_zeros(0)
    total_weight = dist.mean_across(weight.sum()).clamp(min=1)
    counted = (assignment.matched_idxs != IGNORE).float()[..., None]
    qfl = quality_focal_loss(cls_logits, quality, beta) * counted
    losses = {"loss_cls": qfl.sum() / num_samples}
    if not len(image):
        zero = box_logits.sum() * 0.0
        return {**losses, "loss_bbox": zero, "loss_dfl": zero.clone()}
    giou = aligned_giou(boxes, objects)
    losses["loss_bbox"] = giou_weight * (weight * (1 - giou)).sum() / total_weight
    targets = boxes_to_distances(points, objects, bins - 1)
    dfl = distribution_focal_loss(logits.reshape(-1, bins), targets.reshape(-1)).view(-1, 4)
    losses["loss_dfl"] = dfl_weight * (weight * dfl.mean(1)).sum() / total_weight
    return losses


def ld_loss(
    student: dict[str, Tensor],
    teacher_box_logits: Tensor,
    assignment: Assignment,
    *,
    temperature: float = 10.0,
    weight: float = 0.25,
    reference_images: int = 2,
) -> Tensor:
    """Localization distillation on the student's positives (mmdetection's "main region" LD).

    ``loss_ld = weight * (b_ref / B) * sum_i w_i * mean over the 4 sides of
    distribution_kl(student side, teacher side, T)``, with ``w_i`` the student's best joint score
    (detached) at positive ``i``. There is no division by the number of positives or by
    ``sum w_i``: the reference sums over the images of one GPU (2 in its configs) and averages
    over GPUs, so the loss is rescaled by ``b_ref / B`` for a batch of ``B`` images per process
    to keep the reference's strength at any batch size (§16.8.3).

    Args:
        student: the student's head outputs (``cls_logits``, ``box_logits``).
        teacher_box_logits (Tensor[B, A, 4 * (reg_max + 1)]): the frozen teacher's bin logits
            (after its own per-level scales), at the same anchors.
        assignment: the student's (ATSS) assignment.
        temperature, weight: ``T`` (10) and the loss weight (0.25).
        reference_images: ``b_ref``, images per GPU in the reference (2).

    Returns:
        A scalar tensor (zero times the predictions' sum without positives).

    Reference:
        Zheng et al., CVPR 2022 (LD); ALGORITHMS.md §16.8.
    """
    box_logits = student["box_logits"]
    if teacher_box_logits.shape != box_logits.shape:
        raise ValueError(
            f"ld_loss: teacher box logits {tuple(teacher_box_logits.shape)} vs the student's "
            f"{tuple(box_logits.shape)} (the same anchors and reg_max are needed)"
        )
    image, anchor = torch.nonzero(assignment.positive, as_tuple=True)
    if not len(image):
        return box_logits.sum() * 0.0
    bins = box_logits.shape[-1] // 4
    kl = distribution_kl(
        box_logits[image, anchor].reshape(-1, bins),
        teacher_box_logits[image, anchor].reshape(-1, bins),
        temperature,
    ).view(-1, 4)
    rows = _box_weights(student["cls_logits"], image, anchor) * kl.mean(1)
    return weight * reference_images / box_logits.shape[0] * rows.sum()
