"""The detector: backbone + FPN + a PAA-family head (PAA's assignment) or GFL's (ATSS's).

``Detector.forward`` follows torchvision's contract: in training it takes ``targets`` and returns
a dict of ``loss_*`` tensors; in eval it returns one ``{"boxes", "scores", "labels"}`` dict per
image. The steps are also public, so that a teacher's assignment can feed a student's loss::

    predictions = student.predict(images)
    assignment = teacher.assign(teacher.predict(images), targets)   # LAD
    losses = student.loss(predictions, assignment)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from colad import anchors as anchor_ops
from colad import gfl
from colad.atss import atss_assign
from colad.backbone import build_feature_extractor
from colad.boxes import BoxCoder
from colad.checkpoint import CheckpointError
from colad.config import ModelConfig
from colad.data import batch_images
from colad.heads import PAAHead, class_output, class_probabilities, describe_head, head_of_weights
from colad.losses import paa_losses
from colad.paa import Assignment, paa_assign

__all__ = ["Predictions", "Detector", "detection_scores", "postprocess", "score_voting"]

SIZE_DIVISIBLE = 32


@dataclass(frozen=True)
class Predictions:
    """Head outputs of one batch together with the anchors they refer to.

    Attributes:
        head (dict[str, Tensor]): ``cls_logits`` (PAA, GFL) or ``cls_probs`` (IOP, COP)
            [B, A, C]; ``bbox_regression`` [B, A, 4] and, with the IoU branch, ``iou_logits``
            [B, A] (PAA family); or ``box_logits`` [B, A, 4 * (reg_max + 1)] (GFL).
        anchors (Tensor[A, 4]): xyxy, shared by the batch.
        valid (Tensor[B, A] bool): anchors inside each image's own padded extent.
        num_anchors_per_level (list[int]): ``H_l * W_l``.
        image_sizes (list[tuple[int, int]]): the valid ``(h, w)`` of each image.
        strides (tuple[int, ...]): each level's stride.
    """

    head: dict[str, Tensor]
    anchors: Tensor
    valid: Tensor
    num_anchors_per_level: list[int]
    image_sizes: list[tuple[int, int]]
    strides: tuple[int, ...]

    def anchor_strides(self) -> Tensor:
        """Tensor[A]: the stride of each anchor's level."""
        level = anchor_ops.level_of_anchor(self.num_anchors_per_level, device=self.anchors.device)
        return self.anchors.new_tensor(self.strides)[level]


class Detector(nn.Module):
    """A one-stage detector with a PAA-family head (ALGORITHMS.md §1-3, §8-9) or GFL's (§16).

    ``config.head`` decides the head, the assigner (PAA's mixture split; ATSS for ``"gfl"``),
    the losses and how boxes are decoded; backbone, FPN, anchors and the steps below are shared.

    Args:
        config: the architecture, assignment, loss and inference settings.

    Example:
        >>> from colad.config import model_preset
        >>> model = Detector(model_preset("smoke", num_classes=3)).eval()
        >>> out = model([torch.zeros(3, 64, 96)])
        >>> sorted(out[0])
        ['boxes', 'labels', 'scores']
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.features = build_feature_extractor(
            backbone=config.backbone,
            weights=config.weights,
            frozen_stages=config.frozen_stages,
            norm_eval=config.norm_eval,
            widths=config.widths,
            width_mult=config.width_mult,
            fpn_channels=config.fpn_channels,
            num_levels=config.num_levels,
        )
        towers = dict(num_convs=config.head_convs, norm_groups=config.norm_groups)
        if config.head == "gfl":
            self.head = gfl.GFLHead(config.fpn_channels, config.num_classes, config.num_levels,
                                    reg_max=config.reg_max, **towers)  # fmt: skip
        else:
            self.head = PAAHead(
                config.fpn_channels, config.num_classes, config.num_levels, head=config.head,
                iou_branch=config.iou_branch, **towers,
            )  # fmt: skip
        self.box_coder = BoxCoder()

    @property
    def head_variant(self) -> str:
        """This detector's head, in words (e.g. ``"COP head with the IoU branch"``)."""
        return describe_head(self.config.head, self.config.iou_branch)

    def check_weights(self, weights: dict, source: str) -> None:
        """Raise CheckpointError if ``weights`` hold another head variant than this detector's
        (before a strict load would list the differing tensors without saying why)."""
        head, has_iou = head_of_weights(weights)
        if (head, has_iou) != (self.config.head, self.config.iou_branch != "none"):
            theirs = describe_head(head, "infer" if has_iou else "none")
            raise CheckpointError(
                f"{source} holds a {theirs}; this detector has a {self.head_variant} "
                f"(ModelConfig.head={self.config.head!r}, "
                f"iou_branch={self.config.iou_branch!r}). Build the detector with the "
                "checkpoint's own experiment."
            )

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(self.features.strides)

    def predict(self, images: ImageList | Sequence[Tensor]) -> Predictions:
        """Run backbone, FPN and head, and lay out the anchors.

        Args:
            images: an ``ImageList`` (from :func:`colad.data.collate`) or normalised images
                ``Tensor[3, h, w]``.
        """
        if not isinstance(images, ImageList):
            images = batch_images(list(images), SIZE_DIVISIBLE)
        features = self.features(images.tensors)
        sizes = [tuple(f.shape[-2:]) for f in features]
        device = images.tensors.device
        anchors = anchor_ops.anchors_per_level(
            sizes, self.strides, self.config.anchor_scale, device=device
        )
        valid = anchor_ops.valid_mask(
            sizes, self.strides, images.image_sizes, SIZE_DIVISIBLE, device=device
        )
        # Under mixed precision the head computes in float16; assignment, losses and
        # post-processing work in float32 (the mixture fit and the focal terms need the range).
        head = {name: value.float() for name, value in self.head(features).items()}
        return Predictions(
            head=head,
            anchors=torch.cat(anchors),
            valid=valid,
            num_anchors_per_level=anchor_ops.num_anchors_per_level(sizes),
            image_sizes=[tuple(s) for s in images.image_sizes],
            strides=self.strides,
        )

    def assign(self, predictions: Predictions, targets: list[dict[str, Tensor]]) -> Assignment:
        """PAA assignment from these predictions (the detector's own, or a teacher's); for GFL,
        ATSS's, which reads only the anchors and objects."""
        cfg = self.config
        if cfg.head == "gfl":
            return atss_assign(predictions.anchors, predictions.valid, targets,
                               predictions.num_anchors_per_level, topk=cfg.topk)  # fmt: skip
        cls_scores, probabilities = class_output(predictions.head)
        return paa_assign(
            cls_scores,
            predictions.head["bbox_regression"],
            predictions.anchors,
            predictions.valid,
            targets,
            predictions.num_anchors_per_level,
            box_coder=self.box_coder,
            pos_iou_thr=cfg.pos_iou_thr,
            topk=cfg.topk,
            giou_weight=cfg.giou_weight,
            alpha=cfg.focal_alpha,
            gamma=cfg.focal_gamma,
            probabilities=probabilities,
        )

    def loss(
        self, predictions: Predictions, assignment: Assignment, *, box_weighting: str | None = None
    ) -> dict[str, Tensor]:
        """The losses of these predictions under ``assignment`` (whoever made it): PAA's, or
        GFL's (:func:`colad.gfl.gfl_losses`) for a GFL head.

        ``box_weighting`` (:func:`colad.losses.paa_losses`) defaults to PAA's IoU-weighted GIoU,
        or to the plain mean over the positives for a head without the IoU branch (the paper's
        "base" heads); LAD's student asks for ``"mean"``. GFL weighs its boxes by their scores.
        """
        cfg = self.config
        if cfg.head == "gfl":
            if box_weighting is not None:
                raise ValueError("GFL weighs its box losses by its scores; box_weighting is PAA's")
            return gfl.gfl_losses(
                predictions.head, predictions.anchors, predictions.anchor_strides(), assignment,
                beta=cfg.qfl_beta, giou_weight=cfg.giou_weight, dfl_weight=cfg.dfl_weight,
            )  # fmt: skip
        if box_weighting is None:
            box_weighting = "mean" if cfg.iou_branch == "none" else "iou"
        return paa_losses(
            predictions.head,
            predictions.anchors,
            assignment,
            box_coder=self.box_coder,
            giou_weight=cfg.giou_weight,
            iou_weight=cfg.iou_weight,
            alpha=cfg.focal_alpha,
            gamma=cfg.focal_gamma,
            box_weighting=box_weighting,
        )

    def detect(self, predictions: Predictions) -> list[dict[str, Tensor]]:
        """Boxes, scores and labels per image, in the (resized) input image's pixels."""
        return postprocess(predictions, self.config, self.box_coder)

    def forward(
        self,
        images: ImageList | Sequence[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses in training mode (``targets`` required), detections in eval mode."""
        if self.training:
            num_images = len(images.image_sizes if isinstance(images, ImageList) else images)
            _check_targets(targets, num_images, self.config.num_classes)
            predictions = self.predict(images)
            return self.loss(predictions, self.assign(predictions, targets))
        with torch.no_grad():
            return self.detect(self.predict(images))


def _check_targets(targets, num_images: int, num_classes: int) -> None:
    """Raise ValueError unless ``targets`` holds one well-formed dict per image."""
    if targets is None:
        raise ValueError("Detector in training mode needs targets (call .eval() to detect)")
    if len(targets) != num_images:
        raise ValueError(f"{len(targets)} targets for {num_images} images")
    for k, target in enumerate(targets):
        boxes, labels = target.get("boxes"), target.get("labels")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{k}]['boxes'] must be a Tensor[N, 4]")
        if not isinstance(labels, Tensor) or labels.shape != boxes.shape[:1]:
            raise ValueError(f"targets[{k}]['labels'] must be a Tensor[N] matching the boxes")
        out_of_range = len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes
        if labels.is_floating_point() or out_of_range:
            raise ValueError(f"targets[{k}]['labels'] must be integers in [0, {num_classes})")
        if len(boxes) and not bool((boxes[:, 2:] > boxes[:, :2]).all()):
            raise ValueError(f"targets[{k}]['boxes'] has boxes with no area (need x2>x1, y2>y1)")


def score_voting(
    boxes: Tensor,
    labels: Tensor,
    candidate_boxes: Tensor,
    candidate_scores: Tensor,
    candidate_labels: Tensor,
    sigma: float = 0.025,
) -> Tensor:
    """Refine each kept box as a weighted mean of the pre-NMS boxes of its class around it.

    The weight of candidate ``j`` is ``exp(-(1 - IoU_j)^2 / sigma) * S_j`` over candidates with
    ``IoU_j > 0.01``; the kept box is one of its own candidates, so the weights vanish only for a
    zero-area box (clamped to the image border), which is returned as it is. Scores are not
    changed.

    Args:
        boxes (Tensor[D, 4]), labels (Tensor[D]): detections kept by NMS.
        candidate_boxes (Tensor[N, 4]), candidate_scores (Tensor[N]), candidate_labels
            (Tensor[N]): every (box, class) pair that passed the score threshold.

    Returns:
        Tensor[D, 4]: the voted boxes.

    Reference:
        Kim & Lee, ECCV 2020, §3.4 (score voting); ALGORITHMS.md §3.8.
    """
    iou = box_iou(boxes, candidate_boxes).nan_to_num(0.0)  # 0/0 for boxes clamped to a line
    same = (labels[:, None] == candidate_labels[None, :]) & (iou > 0.01)
    weight = torch.exp(-((1 - iou) ** 2) / sigma) * candidate_scores[None, :] * same
    total = weight.sum(1, keepdim=True)
    voted = (weight @ candidate_boxes) / total.clamp(min=1e-12)
    return torch.where(total > 0, voted, boxes)  # a degenerate box votes for nothing: keep it


def detection_scores(predictions: Predictions, use_iou: bool = True) -> Tensor:
    """The score of every (anchor, class), zero at anchors outside an image: Tensor[B, A, C].

    PAA's ``S = sqrt(p * sigmoid(iou))`` (ALGORITHMS.md §3.8), with ``p`` the class probability
    (``sigmoid(cls)``, or an IOP/COP head's fused probability); ``S = p`` when the IoU branch is
    absent or ``use_iou`` is false (trained but not used).
    """
    head = predictions.head
    cls_prob = class_probabilities(head)
    if not use_iou or "iou_logits" not in head:
        return cls_prob * predictions.valid[..., None]
    iou_prob = torch.sigmoid(head["iou_logits"].float())
    return torch.sqrt(cls_prob * iou_prob[..., None]) * predictions.valid[..., None]


def postprocess(
    predictions: Predictions, config: ModelConfig, box_coder: BoxCoder | None = None
) -> list[dict[str, Tensor]]:
    """PAA and GFL inference (ALGORITHMS.md §3.8, §16.7), per image.

    1. Score every (anchor, class) (:func:`detection_scores`): ``S = sqrt(p * sigmoid(iou))``,
       or ``S = p`` where the IoU branch is absent or not used (``config.iou_branch``; GFL's
       joint score is such a ``p``).
    2. On each level keep the ``nms_pre`` anchors with the best ``max_c S``.
    3. Decode their boxes (deltas, or GFL's expected distances), clamped to the image; keep
       pairs with ``S > score_thresh``.
    4. Class-wise NMS at ``nms_thresh``; keep the best ``detections_per_img``.
    5. Score voting (if enabled) moves each kept box; scores stay.

    Returns:
        One dict per image: ``boxes`` (Tensor[D, 4], xyxy), ``scores`` (Tensor[D]) and
        ``labels`` (Tensor[D] long, in ``[0, C)``), by descending score; ``D`` may be 0.
    """
    box_coder = box_coder or BoxCoder()
    head = predictions.head
    scores = detection_scores(predictions, use_iou=config.iou_branch == "infer")
    results = []
    strides = predictions.anchor_strides() if "box_logits" in head else None
    for k, image_size in enumerate(predictions.image_sizes):
        keep = _top_per_level(scores[k].amax(-1), predictions.num_anchors_per_level, config.nms_pre)
        if strides is None:
            boxes = box_coder.decode(
                head["bbox_regression"][k, keep].float(), predictions.anchors[keep], image_size
            )
        else:
            boxes = gfl.decode_boxes(
                head["box_logits"][k, keep], predictions.anchors[keep], strides[keep], image_size
            )
        anchor_idx, labels = torch.nonzero(scores[k, keep] > config.score_thresh, as_tuple=True)
        cand_boxes, cand_scores = boxes[anchor_idx], scores[k, keep][anchor_idx, labels]
        kept = batched_nms(cand_boxes, cand_scores, labels, config.nms_thresh)
        kept = kept[: config.detections_per_img]
        det_boxes = cand_boxes[kept]
        if config.score_voting and len(kept):
            det_boxes = score_voting(
                det_boxes, labels[kept], cand_boxes, cand_scores, labels, config.voting_sigma
            )
            det_boxes = clip_boxes_to_image(det_boxes, image_size)  # rounding of the mean
        results.append({"boxes": det_boxes, "scores": cand_scores[kept], "labels": labels[kept]})
    return results


def _top_per_level(best: Tensor, num_per_level: list[int], k: int) -> Tensor:
    """Indices of the ``k`` highest entries of ``best`` (Tensor[A]) within each level."""
    keep, start = [], 0
    for count in num_per_level:
        level = best[start : start + count]
        top = (
            level.topk(min(k, count)).indices
            if count > k
            else torch.arange(count, device=best.device)
        )
        keep.append(top + start)
        start += count
    return torch.cat(keep)
