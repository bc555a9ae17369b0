"""Training losses of the PAA head: focal classification, IoU-weighted GIoU, IoU prediction.

Every loss is a sum with an explicit normaliser (ALGORITHMS.md §3.7), and every function takes
an :class:`colad.paa.Assignment`, so whoever assigned the anchors (the network itself, a teacher)
is invisible here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

from colad.boxes import BoxCoder, aligned_giou, aligned_iou
from colad.paa import IGNORE, Assignment

__all__ = ["classification_loss", "paa_losses"]

WEIGHT_FLOOR = 1e-12  # the IoU-weight clamp of ALGORITHMS.md §3.7


def classification_loss(
    cls_logits: Tensor,
    assignment: Assignment,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """Sigmoid focal loss summed over every non-ignored anchor and every class (unnormalised).

    Args:
        cls_logits (Tensor[B, A, C]): class logits.
        assignment: positives get their object's class as target, background gets all zeros,
            ignored anchors (``matched_idxs == -2``) nothing.

    Returns:
        Tensor[]: the sum.

    Reference:
        Lin et al., ICCV 2017 (focal loss); ALGORITHMS.md §3.7.
    """
    num_classes = cls_logits.shape[-1]
    labels = assignment.labels(num_classes)
    targets = F.one_hot(labels, num_classes + 1)[..., :num_classes].to(cls_logits.dtype)
    loss = sigmoid_focal_loss(cls_logits.float(), targets.float(), alpha, gamma)
    weight = (assignment.matched_idxs != IGNORE).to(loss.dtype)
    return (loss * weight[..., None]).sum()


def paa_losses(
    head_outputs: dict[str, Tensor],
    anchors: Tensor,
    assignment: Assignment,
    *,
    box_coder: BoxCoder | None = None,
    giou_weight: float = 1.3,
    iou_weight: float = 0.5,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> dict[str, Tensor]:
    """The losses of a self-assigning PAA head.

    With ``P`` the positives and ``N_p = |P|``:

    * ``loss_cls`` = focal loss over all valid anchors and classes / ``max(N_p, B)``;
    * ``loss_bbox`` = ``giou_weight * sum_P t_i (1 - GIoU(b_i, B_i)) / sum_P t_i``, where
      ``t_i = IoU(b_i, B_i)`` (detached) weights each box by how well it is already localised;
    * ``loss_iou`` = ``iou_weight * sum_P BCE(iou_logit_i, t_i) / N_p``.

    With no positive, the box and IoU losses are zero times the predictions' sum, so the graph
    (and DistributedDataParallel) still sees every parameter.

    Args:
        head_outputs: ``cls_logits`` (Tensor[B, A, C]), ``bbox_regression`` (Tensor[B, A, 4]),
            ``iou_logits`` (Tensor[B, A]).
        anchors (Tensor[A, 4]): xyxy.
        assignment: from :func:`colad.paa.paa_assign` (or a teacher's).

    Returns:
        ``{"loss_cls", "loss_bbox", "loss_iou"}``, scalar tensors.

    Reference:
        Kim & Lee, ECCV 2020; ALGORITHMS.md §3.7.
    """
    box_coder = box_coder or BoxCoder()
    cls_logits = head_outputs["cls_logits"]
    deltas, iou_logits = head_outputs["bbox_regression"], head_outputs["iou_logits"]
    positive = assignment.positive
    num_pos = positive.sum()
    batch = cls_logits.shape[0]
    loss_cls = classification_loss(cls_logits, assignment, alpha=alpha, gamma=gamma)
    losses = {"loss_cls": loss_cls / num_pos.clamp(min=batch).to(loss_cls.dtype)}
    if int(num_pos) == 0:
        losses["loss_bbox"] = deltas.sum() * 0.0
        losses["loss_iou"] = iou_logits.sum() * 0.0
        return losses
    image, anchor = torch.nonzero(positive, as_tuple=True)
    boxes = box_coder.decode(deltas[image, anchor].float(), anchors[anchor])
    target_boxes = assignment.target_boxes(image, anchor)
    iou_targets = aligned_iou(boxes.detach(), target_boxes)  # t_i
    weight = iou_targets.clamp(min=WEIGHT_FLOOR)
    giou = aligned_giou(boxes, target_boxes)
    losses["loss_bbox"] = giou_weight * (weight * (1 - giou)).sum() / weight.sum()
    bce = F.binary_cross_entropy_with_logits(
        iou_logits[image, anchor].float(), iou_targets, reduction="sum"
    )
    losses["loss_iou"] = iou_weight * bce / num_pos
    return losses
