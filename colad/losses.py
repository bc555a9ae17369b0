"""Training losses: focal classification (on logits or on probabilities), GIoU, IoU prediction,
the soft-label (KD) losses, and GFL's and LD's losses on a joint score and on box distributions.

Every loss is a sum with an explicit normaliser (ALGORITHMS.md §3.7), and the hard-label losses
take an :class:`colad.paa.Assignment`, so whoever assigned the anchors (the network itself, a
teacher, a CoLAD switch) is invisible here. The soft-label losses (:func:`focal_kl`,
:func:`kd_losses`) take a teacher's predictions instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou, sigmoid_focal_loss

from colad.boxes import BoxCoder, aligned_giou, aligned_iou
from colad.heads import class_output
from colad.paa import IGNORE, Assignment

__all__ = [
    "prob_focal",
    "focal_terms",
    "classification_loss",
    "paa_losses",
    "BOX_WEIGHTINGS",
    "focal_kl",
    "kd_losses",
    "quality_focal_loss",
    "distribution_focal_loss",
    "distribution_kl",
]

#: How :func:`paa_losses` averages the GIoU loss over the positives: ``"iou"`` weights each box
#: by its IoU and divides by their sum (self-assigning PAA); ``"mean"`` is the plain mean over the
#: positives (LAD's student, both CoLAD networks, and the heads without an IoU branch: the
#: paper's "base" normaliser, ALGORITHMS.md §4, §8.2).
BOX_WEIGHTINGS = ("iou", "mean")

WEIGHT_FLOOR = 1e-12  # the IoU-weight clamp of ALGORITHMS.md §3.7


def prob_focal(probs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Elementwise focal loss of predictions that are already probabilities (IOP, COP).

    ``BCE(p, y) * (alpha y + (1 - alpha)(1 - y)) * q^gamma`` with ``q = 1 - p`` where ``y = 1`` and
    ``q = p`` where ``y = 0``: the sigmoid focal loss with the sigmoid taken out. The
    cross-entropy's logarithms are clamped at -100 (PyTorch's ``binary_cross_entropy``), so a
    probability of exactly 0 or 1 gives a large finite loss, not ``inf``.

    Args:
        probs (Tensor[...]): probabilities in [0, 1].
        targets (Tensor[...]): targets in [0, 1], same shape.

    Returns:
        Tensor[...] float32: the loss of every element (not reduced).

    Reference:
        Nguyen et al., WACV 2022, appendix A; ALGORITHMS.md §8.2.
    """
    if probs.shape != targets.shape:
        raise ValueError(f"prob_focal: probs {tuple(probs.shape)} vs targets "
                         f"{tuple(targets.shape)}")  # fmt: skip
    probs, targets = probs.float(), targets.float()
    # binary_cross_entropy refuses to run under autocast; it is float32 here anyway.
    with torch.autocast(probs.device.type, enabled=False):
        bce = F.binary_cross_entropy(probs, targets, reduction="none")
    miss = probs * (1 - targets) + (1 - probs) * targets
    return bce * (alpha * targets + (1 - alpha) * (1 - targets)) * miss.pow(gamma)


def focal_terms(
    scores: Tensor, targets: Tensor, *, probabilities: bool, alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:  # fmt: skip
    """The elementwise focal loss of class logits (sigmoid focal loss) or of class
    probabilities (:func:`prob_focal`), float32."""
    if probabilities:
        return prob_focal(scores, targets, alpha, gamma)
    return sigmoid_focal_loss(scores.float(), targets.float(), alpha, gamma)


def classification_loss(
    cls_scores: Tensor,
    assignment: Assignment,
    *,
    probabilities: bool = False,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """Focal loss summed over every non-ignored anchor and every class (unnormalised).

    Args:
        cls_scores (Tensor[B, A, C]): class logits, or probabilities with ``probabilities``.
        assignment: positives get their object's class as target, background gets all zeros,
            ignored anchors (``matched_idxs == -2``) nothing.

    Returns:
        Tensor[]: the sum.

    Reference:
        Lin et al., ICCV 2017 (focal loss); ALGORITHMS.md §3.7, §8.2.
    """
    num_classes = cls_scores.shape[-1]
    labels = assignment.labels(num_classes)
    targets = F.one_hot(labels, num_classes + 1)[..., :num_classes].float()
    loss = focal_terms(cls_scores, targets, probabilities=probabilities, alpha=alpha, gamma=gamma)
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
    box_weighting: str = "iou",
) -> dict[str, Tensor]:
    """The losses of a PAA head under an assignment.

    With ``P`` the positives and ``N_p = |P|``:

    * ``loss_cls`` = focal loss over all valid anchors and classes / ``max(N_p, B)`` (on the
      probabilities of an IOP or COP head, :func:`prob_focal`);
    * ``loss_bbox`` = ``giou_weight * sum_P t_i (1 - GIoU(b_i, B_i)) / sum_P t_i``, where
      ``t_i = IoU(b_i, B_i)`` (detached) weights each box by how well it is already localised
      (``box_weighting="iou"``, PAA); or ``giou_weight * sum_P (1 - GIoU(b_i, B_i)) / N_p``
      (``"mean"``, LAD's student, heads without an IoU branch);
    * ``loss_iou`` = ``iou_weight * sum_P BCE(iou_logit_i, t_i) / N_p``, for heads with the IoU
      branch.

    With no positive, the box and IoU losses are zero times the predictions' sum, so the graph
    (and DistributedDataParallel) still sees every parameter.

    Args:
        head_outputs: ``cls_logits`` or ``cls_probs`` (Tensor[B, A, C]), ``bbox_regression``
            (Tensor[B, A, 4]) and, with the IoU branch, ``iou_logits`` (Tensor[B, A]).
        anchors (Tensor[A, 4]): xyxy.
        assignment: from :func:`colad.paa.paa_assign` (or a teacher's).

    Returns:
        ``{"loss_cls", "loss_bbox"}`` and ``"loss_iou"`` (with the IoU branch), scalar tensors.

    Reference:
        Kim & Lee, ECCV 2020; ALGORITHMS.md §3.7, §8.2, §9.
    """
    if box_weighting not in BOX_WEIGHTINGS:
        raise ValueError(f"box_weighting={box_weighting!r}; choose one of {BOX_WEIGHTINGS}")
    box_coder = box_coder or BoxCoder()
    cls_scores, probabilities = class_output(head_outputs)
    deltas, iou_logits = head_outputs["bbox_regression"], head_outputs.get("iou_logits")
    positive = assignment.positive
    num_pos = positive.sum()
    batch = cls_scores.shape[0]
    loss_cls = classification_loss(
        cls_scores, assignment, probabilities=probabilities, alpha=alpha, gamma=gamma
    )
    losses = {"loss_cls": loss_cls / num_pos.clamp(min=batch).to(loss_cls.dtype)}
    if int(num_pos) == 0:
        losses["loss_bbox"] = deltas.sum() * 0.0
        if iou_logits is not None:
            losses["loss_iou"] = iou_logits.sum() * 0.0
        return losses
    image, anchor = torch.nonzero(positive, as_tuple=True)
    boxes = box_coder.decode(deltas[image, anchor].float(), anchors[anchor])
    target_boxes = assignment.target_boxes(image, anchor)
    iou_targets = aligned_iou(boxes.detach(), target_boxes)  # t_i
    weight = iou_targets.clamp(min=WEIGHT_FLOOR)
    if box_weighting == "mean":
        weight = torch.ones_like(weight)
    giou = aligned_giou(boxes, target_boxes)
    losses["loss_bbox"] = giou_weight * (weight * (1 - giou)).sum() / weight.sum()
    if iou_logits is None:
        return losses
    bce = F.binary_cross_entropy_with_logits(
        iou_logits[image, anchor].float(), iou_targets, reduction="sum"
    )
    losses["loss_iou"] = iou_weight * bce / num_pos
    return losses


def focal_kl(logits: Tensor, targets: Tensor, gamma: float = 0.5) -> Tensor:
    """Elementwise binary focal-KL divergence of soft targets from sigmoid predictions.

    With ``p = sigmoid(logits)`` and ``t = targets``::

        ((t - p)^2 + 1e-6)^(gamma / 2) * [t log(t / p) + (1 - t) log((1 - t) / (1 - p))]

    the KL divergence of two Bernoulli distributions, weighted (without detaching) by
    how far the prediction is from the target, as the focal loss weights the
    cross-entropy. There is no temperature. Terms with ``t = 0`` or ``t = 1``
    contribute their ``0 log 0 = 0`` part, so for one-hot targets this is the focal
    loss without its ``alpha`` balance.

    Args:
        logits (Tensor[...]): the student's logits.
        targets (Tensor[...]): the teacher's probabilities in ``[0, 1]``, same shape.
        gamma: the focal exponent (0.5 in the paper's soft-label runs).

    Returns:
        Tensor[...]: the loss of every element (not reduced).

    Reference:
        Nguyen et al., WACV 2022, Eq. 1; ALGORITHMS.md §6.1; chapter {ref}`sec-lad`.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"focal_kl: logits {tuple(logits.shape)} vs targets "
                         f"{tuple(targets.shape)}")  # fmt: skip
    logits, targets = logits.float(), targets.float()
    log_p = F.logsigmoid(logits)
    log_not_p = log_p - logits  # log(1 - p)
    kl = torch.xlogy(targets, targets) - targets * log_p
    kl = kl + torch.xlogy(1 - targets, 1 - targets) - (1 - targets) * log_not_p
    focal = ((targets - torch.sigmoid(logits)) ** 2 + 1e-6) ** (gamma / 2)
    return focal * kl


def kd_losses(
    student: dict[str, Tensor],
    teacher: dict[str, Tensor],
    anchors: Tensor,
    valid: Tensor,
    targets: list[dict[str, Tensor]],
    image_sizes: list[tuple[int, int]],
    *,
    box_coder: BoxCoder | None = None,
    min_iou: float = 0.1,
    cls_weight: float = 10.0,
    iou_weight: float = 10.0,
    giou_weight: float = 1.3,
    gamma: float = 0.5,
) -> dict[str, Tensor]:
    """Soft-label distillation: the student learns the teacher's outputs (the paper's KD head).

    1. Decode both networks' boxes, clamped to the image. A valid anchor is *selected* when the
       teacher's box overlaps some object by more than ``min_iou``; its weight ``w_i`` is that
       best IoU, and ``avg = sum w_i`` over the batch normalises every term.
    2. ``loss_kd_cls`` = ``cls_weight * sum focal_kl(student cls, sigmoid(teacher cls)) / avg``
       over **every** anchor and class (the reference includes batch padding too).
    3. ``loss_kd_iou`` = ``iou_weight * sum_sel focal_kl(student iou, sigmoid(teacher iou)) / avg``.
    4. ``loss_kd_bbox`` = ``giou_weight * sum_sel w_i (1 - GIoU(S_i, T_i)) / avg``: the target is
       the **teacher's** box, not the object's.

    Guards for the reference's crashes: with no selected anchor (no objects, or no teacher box
    near one) the IoU and box terms are zero (still attached to the graph) and ``avg`` falls back
    to the number of images, as the focal loss's ``max(N_p, B)`` does.

    Args:
        student, teacher: head outputs, ``cls_logits`` (Tensor[B, A, C]), ``bbox_regression``
            (Tensor[B, A, 4]), ``iou_logits`` (Tensor[B, A]); the teacher's without gradient.
        anchors (Tensor[A, 4]), valid (Tensor[B, A] bool): the shared anchors.
        targets: the objects of each image (``boxes``).
        image_sizes: ``(h, w)`` of each image, for the clamp.

    Returns:
        ``{"loss_kd_cls", "loss_kd_iou", "loss_kd_bbox"}``.

    Reference:
        Nguyen et al., WACV 2022, §3 (soft labels); ALGORITHMS.md §6.2; chapter {ref}`sec-lad`.
    """
    box_coder = box_coder or BoxCoder()
    teacher = {k: v.detach() for k, v in teacher.items()}
    batch = len(image_sizes)
    sel_image, sel_anchor, sel_weight = [], [], []
    for k, size in enumerate(image_sizes):
        anchor_idx = valid[k].nonzero()[:, 0]
        gt = targets[k]["boxes"]
        if len(gt) == 0 or len(anchor_idx) == 0:
            continue
        boxes = box_coder.decode(
            teacher["bbox_regression"][k, anchor_idx], anchors[anchor_idx], size
        )
        best = box_iou(boxes, gt.to(boxes)).amax(dim=1)
        keep = best > min_iou
        sel_image.append(torch.full_like(anchor_idx[keep], k))
        sel_anchor.append(anchor_idx[keep])
        sel_weight.append(best[keep])
    if sel_weight:
        image, anchor = torch.cat(sel_image), torch.cat(sel_anchor)
        weight = torch.cat(sel_weight)
    else:
        image = anchor = torch.zeros(0, dtype=torch.long, device=anchors.device)
        weight = anchors.new_zeros(0)
    total = weight.sum()
    avg = torch.where(total > 0, total, torch.full_like(total, float(batch)))
    soft_cls = torch.sigmoid(teacher["cls_logits"].float())
    losses = {
        "loss_kd_cls": cls_weight * focal_kl(student["cls_logits"], soft_cls, gamma).sum() / avg
    }
    if len(weight) == 0:
        losses["loss_kd_iou"] = student["iou_logits"].sum() * 0.0
        losses["loss_kd_bbox"] = student["bbox_regression"].sum() * 0.0
        return losses
    soft_iou = torch.sigmoid(teacher["iou_logits"][image, anchor].float())
    kd_iou = focal_kl(student["iou_logits"][image, anchor], soft_iou, gamma)
    losses["loss_kd_iou"] = iou_weight * kd_iou.sum() / avg
    sizes = torch.tensor(image_sizes, device=anchors.device, dtype=torch.float32)[image]
    upper = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=1)
    student_boxes = box_coder.decode(
        student["bbox_regression"][image, anchor].float(), anchors[anchor]
    )
    student_boxes = torch.minimum(student_boxes.clamp(min=0), upper)
    teacher_boxes = box_coder.decode(teacher["bbox_regression"][image, anchor], anchors[anchor])
    teacher_boxes = torch.minimum(teacher_boxes.clamp(min=0), upper)
    giou = aligned_giou(student_boxes, teacher_boxes)
    losses["loss_kd_bbox"] = giou_weight * (weight.clamp(min=WEIGHT_FLOOR) * (1 - giou)).sum() / avg
    return losses


# ----------------------------------------------------------------------------------------------
# GFL and LD (ALGORITHMS.md §16.6, §16.8)


def quality_focal_loss(logits: Tensor, targets: Tensor, beta: float = 2.0) -> Tensor:
    """Elementwise quality focal loss: ``|y - sigmoid(z)|^beta * BCE(sigmoid(z), y)``.

    GFL's classifier predicts one *joint* score per class, trained toward the IoU of the anchor's
    current box with its object (``y`` in ``[0, 1]``) at the object's class and toward 0
    elsewhere. The modulating factor is not detached, and there is no ``alpha`` balance: for
    0/1 targets and ``beta = gamma`` this is the focal loss with ``alpha`` left out.

    Args:
        logits (Tensor[...]): ``z``.
        targets (Tensor[...]): ``y``, same shape.
        beta: the modulating exponent (2).

    Returns:
        Tensor[...] float32: the loss of every element (not reduced).

    Reference:
        Li et al., NeurIPS 2020 (GFL), Eq. 5; ALGORITHMS.md §16.6.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"quality_focal_loss: logits {tuple(logits.shape)} vs targets "
                         f"{tuple(targets.shape)}")  # fmt: skip
    logits, targets = logits.float(), targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (targets - torch.sigmoid(logits)).abs().pow(beta) * bce


def distribution_focal_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Distribution focal loss of each row of bin logits for a continuous target.

    With ``i = floor(y)`` and ``S = softmax(logits)``:
    ``DFL = -[(i + 1 - y) log S_i + (y - i) log S_{i+1}]``: cross-entropy to the two bins around
    ``y``, each weighted by how close ``y`` is to it. Its minimum puts mass ``i + 1 - y`` on bin
    ``i`` and ``y - i`` on bin ``i + 1``, whose expectation is exactly ``y``.

    Args:
        logits (Tensor[N, n + 1]): one row of bin logits per (anchor, side).
        targets (Tensor[N]): ``y`` in ``[0, n)``; GFL clamps its targets to ``n - 0.1``
            (:func:`colad.gfl.boxes_to_distances`) so that bin ``i + 1`` exists.

    Returns:
        Tensor[N] float32.

    Reference:
        Li et al., NeurIPS 2020 (GFL), Eq. 6; ALGORITHMS.md §16.6.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"distribution_focal_loss: logits [N, bins] and targets [N]; got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")  # fmt: skip
    bins = logits.shape[1]
    targets = targets.float()
    low, high = (float(targets.min()), float(targets.max())) if len(targets) else (0.0, 0.0)
    if not 0 <= low <= high < bins - 1:
        raise ValueError(f"distribution_focal_loss: targets must lie in [0, {bins - 1}) for "
                         f"{bins} bins; got [{low}, {high}]")  # fmt: skip
    left = targets.long()
    log_probs = F.log_softmax(logits.float(), dim=1)
    weight_left = left + 1 - targets
    weight_right = targets - left
    return -(weight_left * log_probs.gather(1, left[:, None])[:, 0]
             + weight_right * log_probs.gather(1, left[:, None] + 1)[:, 0])  # fmt: skip


def distribution_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
) -> Tensor:
    """LD's distillation loss of each row:
    ``T^2 / K * KL(softmax(t / T) || softmax(s / T))``.

    Both rows are softened by the temperature ``T``; the student's row ``s`` learns the
    teacher's ``t`` (detached), one box side's ``K`` bins at a time. ``T^2`` keeps the
    gradient's size independent of ``T`` (Hinton et al.), and the mean over the ``K``
    bins is the reference's normalisation. Teacher bins of probability 0 contribute 0.

    Args:
        student_logits (Tensor[N, K]): the student's bin logits.
        teacher_logits (Tensor[N, K]): the teacher's, same shape (no gradient flows to
            them).
        temperature: ``T >= 1`` (10 in LD).

    Returns:
        Tensor[N] float32: the loss of every row; 0 where the rows are equal.

    Reference:
        Zheng et al., CVPR 2022 (LD); ALGORITHMS.md §16.8.2.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"distribution_kl: student {tuple(student_logits.shape)} and teacher "
            f"{tuple(teacher_logits.shape)} must be the same [N, K]"
        )
    if not temperature >= 1:
        raise ValueError(
            f"distribution_kl: temperature {temperature} must be at least 1",
        )
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    teacher = log_teacher.exp()
    # p_t (log p_t - log p_s), exactly 0 for equal rows, and 0 where p_t underflows
    # to 0.
    kl = torch.where(teacher > 0, teacher * (log_teacher - log_student), 0.0)
    return temperature**2 * kl.mean(dim=1)
