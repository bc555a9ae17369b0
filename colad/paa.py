"""Probabilistic anchor assignment (PAA) as pure functions that return an :class:`Assignment`.

The steps of ALGORITHMS.md §3.1-3.6, each batched over the images and ground truths of a batch:

1. :func:`max_iou_assign` -- IoU pre-assignment: each anchor goes to its best-overlapping object.
2. :func:`anchor_costs` -- the cost ``c_i = FL + lambda * (1 - GIoU)`` of every pre-assigned anchor.
3. :func:`select_candidates` -- the ``topk`` cheapest anchors of each object on each level.
4. :func:`split_candidates` -- a two-component 1-D Gaussian mixture per object, fitted by EM for
   all objects at once (:func:`colad.gmm.fit_two_component_gmm`), and the cut at the most likely
   foreground sample.
5. :func:`paa_assign` -- all of the above: the candidates that survive are the positives.

``matched_idxs`` follows torchvision's ``Matcher``: ``>= 0`` the index of the matched object in its
image, ``-1`` background, ``-2`` ignored (no loss at all, e.g. anchors in batch padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

from colad.boxes import BoxCoder, aligned_giou
from colad.gmm import GaussianMixture1D, fit_two_component_gmm, log_sum_two, mixture_log_prob

__all__ = [
    "BACKGROUND",
    "IGNORE",
    "Assignment",
    "pad_targets",
    "max_iou_assign",
    "anchor_costs",
    "select_candidates",
    "split_candidates",
    "PAATrace",
    "paa_trace",
    "reassign",
    "paa_assign",
]

BACKGROUND = -1
IGNORE = -2


@dataclass(frozen=True)
class Assignment:
    """Which anchors learn which object: the value an assigner gives and a loss consumes.

    Attributes:
        matched_idxs (Tensor[B, A] long): object index within the image, ``-1`` background,
            ``-2`` ignored.
        gt_boxes (Tensor[B, M, 4]): the objects of each image, xyxy, padded to ``M``.
        gt_labels (Tensor[B, M] long): their class indices in ``[0, C)``, padded with 0.
    """

    matched_idxs: Tensor
    gt_boxes: Tensor
    gt_labels: Tensor

    @property
    def positive(self) -> Tensor:
        """Tensor[B, A] bool: anchors that learn an object."""
        return self.matched_idxs >= 0

    @property
    def num_pos(self) -> int:
        return int(self.positive.sum())

    def labels(self, num_classes: int) -> Tensor:
        """Tensor[B, A] long: the class of each anchor, ``num_classes`` for background/ignored."""
        labels = self.gt_labels.gather(1, self.matched_idxs.clamp(min=0))
        return torch.where(self.positive, labels, torch.full_like(labels, num_classes))

    def target_boxes(self, image: Tensor, anchor: Tensor) -> Tensor:
        """Tensor[N, 4]: the matched object's box for positive anchors ``(image[n], anchor[n])``."""
        return self.gt_boxes[image, self.matched_idxs[image, anchor]]


def pad_targets(targets: list[dict[str, Tensor]], device=None) -> tuple[Tensor, Tensor, Tensor]:
    """Stack per-image ``boxes``/``labels`` into padded tensors.

    Returns:
        ``gt_boxes`` (Tensor[B, M, 4] float32), ``gt_labels`` (Tensor[B, M] long) and ``gt_mask``
        (Tensor[B, M] bool), with ``M = max(1, most objects in one image)``.
    """
    num = max([len(t["boxes"]) for t in targets] + [1])
    boxes = torch.zeros(len(targets), num, 4, device=device)
    labels = torch.zeros(len(targets), num, dtype=torch.long, device=device)
    mask = torch.zeros(len(targets), num, dtype=torch.bool, device=device)
    for k, target in enumerate(targets):
        n = len(target["boxes"])
        boxes[k, :n] = target["boxes"].to(device=device, dtype=boxes.dtype)
        labels[k, :n] = target["labels"].to(device)
        mask[k, :n] = True
    return boxes, labels, mask


def max_iou_assign(
    anchors: Tensor,
    valid: Tensor,
    gt_boxes: Tensor,
    gt_mask: Tensor,
    *,
    pos_iou_thr: float = 0.1,
    neg_iou_thr: float = 0.1,
    match_low_quality: bool = True,
) -> Tensor:
    """Give each anchor to the object it overlaps most (mmdet's ``MaxIoUAssigner``).

    1. An anchor whose best IoU is ``>= pos_iou_thr`` matches that object; below
       ``neg_iou_thr`` it is background; in between it is ignored.
    2. With ``match_low_quality``, every anchor that ties for an object's best IoU goes
       to that object (the later object wins a shared anchor), so no object is left
       without anchors. An object that overlaps no anchor at all takes nothing (the
       guard of ALGORITHMS.md §3.1).

    PAA uses ``0.1 / 0.1``; RetinaNet's rule is ``0.5 / 0.4``.

    Args:
        anchors (Tensor[A, 4]): xyxy.
        valid (Tensor[B, A] bool): from :func:`colad.anchors.valid_mask`.
        gt_boxes (Tensor[B, M, 4]), gt_mask (Tensor[B, M] bool): from
            :func:`pad_targets`.

    Returns:
        Tensor[B, A] long: ``matched_idxs``.

    Reference:
        ALGORITHMS.md §3.1.
    """
    batch, num_gts = gt_mask.shape
    iou = box_iou(gt_boxes.reshape(-1, 4), anchors).view(batch, num_gts, -1)
    iou = iou.masked_fill(~(gt_mask[:, :, None] & valid[:, None, :]), -1.0)
    best_iou, best_gt = iou.max(dim=1)
    matched = torch.full_like(best_gt, IGNORE)
    matched = torch.where(valid & (best_iou < neg_iou_thr), BACKGROUND, matched)
    matched = torch.where(valid & (best_iou >= pos_iou_thr), best_gt, matched)
    if match_low_quality:
        gt_best = iou.max(dim=2, keepdim=True).values
        ties = (iou == gt_best) & (gt_best > 0)
        order = torch.arange(num_gts, device=iou.device)[None, :, None]
        last = torch.where(ties, order, -1).max(dim=1).values
        matched = torch.where(last >= 0, last, matched)
    return matched


@torch.no_grad()
def anchor_costs(
    cls_scores: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    matched_idxs: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    *,
    box_coder: BoxCoder | None = None,
    giou_weight: float = 1.3,
    alpha: float = 0.25,
    gamma: float = 2.0,
    probabilities: bool = False,
) -> Tensor:
    """The PAA anchor cost
    ``c_i = sum_k FL(p_i^k, y^k) + lambda * (1 - GIoU(b_i, B_g))``.

    ``exp(-c_i)`` is the PAA score: the classification score times the localisation
    score to the power ``lambda``. The focal term sums over **all** classes, the other
    classes contributing their negative terms. Computed without gradient: costs only
    rank anchors.

    Args:
        cls_scores (Tensor[B, A, C]), bbox_regression (Tensor[B, A, 4]): head outputs;
            class logits, or probabilities (IOP, COP heads) with ``probabilities=True``,
            whose focal term is then :func:`colad.losses.prob_focal`.
        anchors (Tensor[A, 4]): xyxy.
        matched_idxs (Tensor[B, A] long): the pre-assignment of :func:`max_iou_assign`.
        gt_boxes (Tensor[B, M, 4]), gt_labels (Tensor[B, M]): the objects.

    Returns:
        Tensor[B, A] float32: ``c_i`` for pre-assigned anchors, ``+inf`` elsewhere.

    Reference:
        Kim & Lee, ECCV 2020, Eq. 2; ALGORITHMS.md §3.2; chapter {ref}`sec-paa`.
    """
    from colad.losses import focal_terms  # colad.losses imports this module

    box_coder = box_coder or BoxCoder()
    costs = torch.full(matched_idxs.shape, math.inf, device=cls_scores.device)
    image, anchor = torch.nonzero(matched_idxs >= 0, as_tuple=True)
    gt = matched_idxs[image, anchor]
    targets = F.one_hot(gt_labels[image, gt], cls_scores.shape[-1]).float()
    focal = focal_terms(cls_scores[image, anchor], targets, probabilities=probabilities,
                        alpha=alpha, gamma=gamma)  # fmt: skip
    boxes = box_coder.decode(bbox_regression[image, anchor].float(), anchors[anchor])
    giou = aligned_giou(boxes, gt_boxes[image, gt])
    costs[image, anchor] = focal.sum(-1) + giou_weight * (1 - giou)
    return costs


def select_candidates(
    costs: Tensor, matched_idxs: Tensor, num_gts: int, num_per_level: list[int], topk: int = 9
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``topk`` cheapest pre-assigned anchors of every object on every level.

    Args:
        costs (Tensor[B, A]): from :func:`anchor_costs`.
        matched_idxs (Tensor[B, A] long): the pre-assignment.
        num_gts: ``M``, the padded number of objects per image.
        num_per_level: anchors on each level; they sum to ``A``.

    Returns:
        ``(anchor_idx, cand_costs, valid)``, each of shape ``[B, M, K]`` with
        ``K = sum_l min(topk, A_l)``: the candidate anchors (ascending cost within a level),
        their costs, and which slots hold a real candidate.

    Reference:
        ALGORITHMS.md §3.3.
    """
    batch, num_anchors = costs.shape
    dense = costs.new_full((batch, num_gts, num_anchors), math.inf)
    image, anchor = torch.nonzero(matched_idxs >= 0, as_tuple=True)
    dense[image, matched_idxs[image, anchor], anchor] = costs[image, anchor]
    values, indices, start = [], [], 0
    for count in num_per_level:
        top = dense[:, :, start : start + count].topk(min(topk, count), dim=-1, largest=False)
        values.append(top.values)
        indices.append(top.indices + start)
        start += count
    values = torch.cat(values, dim=-1)
    return torch.cat(indices, dim=-1), values, torch.isfinite(values)


@torch.inference_mode()
def split_candidates(costs: Tensor, valid: Tensor) -> Tensor:
    """The PAA foreground rule: which candidates of each object become positives.

    For each row (an object's candidates):

    1. sort the costs ascending and fit a two-component mixture (:func:`fit_two_component_gmm`);
    2. foreground = the samples that the low-cost component explains better;
    3. positives = the foreground samples up to and including the one with the highest
       mixture likelihood (Fig. 3(c) of the PAA paper).

    Rows with fewer than two valid candidates, or no foreground sample, get no positive.

    Args:
        costs (Tensor[G, K]): candidate costs, lower is better; any order, any device.
        valid (Tensor[G, K] bool): which slots hold a candidate.

    Returns:
        Tensor[G, K] bool: the positives, in the input's order.

    Reference:
        Kim & Lee, ECCV 2020, §3.2 and Fig. 3(c); ALGORITHMS.md §3.4-3.5; chapter {ref}`sec-paa`.
    """
    return _split(costs, valid)[0]


def _split(costs: Tensor, valid: Tensor) -> tuple[Tensor, GaussianMixture1D]:
    """:func:`split_candidates` and the fitted mixtures."""
    if costs.shape != valid.shape or costs.dim() != 2:
        raise ValueError(
            f"costs {tuple(costs.shape)} and valid {tuple(valid.shape)}: need [G, K]",
        )
    valid = valid.bool()
    masked = torch.where(valid, costs.double(), math.inf)
    x, order = masked.sort(dim=1, stable=True)
    in_row = valid.gather(1, order)
    mixture = fit_two_component_gmm(x, in_row)
    if costs.shape[1] == 0:
        return valid.clone(), mixture
    joint = mixture_log_prob(torch.where(in_row, x, 0.0), mixture)
    foreground = in_row & (joint[0] >= joint[1]) & (mixture.n_iter > 0)[:, None]
    likelihood = log_sum_two(joint).masked_fill(~foreground, -math.inf)
    cut = likelihood.argmax(dim=1, keepdim=True)
    rank = torch.arange(x.shape[1], device=x.device)[None, :]
    positive_sorted = foreground & (rank <= cut)
    return torch.zeros_like(valid).scatter(1, order, positive_sorted), mixture


@dataclass(frozen=True)
class PAATrace:
    """Every intermediate value of one PAA assignment, for figures, explorers and tests.

    Shapes use ``B`` images, ``A`` anchors, ``M`` padded objects per image and ``K`` candidate
    slots per object.

    Attributes:
        gt_boxes, gt_labels, gt_mask: the padded objects (:func:`pad_targets`).
        pre_matched_idxs (Tensor[B, A]): the IoU pre-assignment.
        costs (Tensor[B, A]): anchor costs (``inf`` off the pre-assigned anchors).
        candidates (Tensor[B, M, K]): candidate anchor indices; ``candidate_costs`` and
            ``candidate_valid`` alongside.
        positive (Tensor[B, M, K] bool): the candidates that PAA keeps.
        mixture (GaussianMixture1D): the fit of each object, rows ``b * M + m``.
    """

    gt_boxes: Tensor
    gt_labels: Tensor
    gt_mask: Tensor
    pre_matched_idxs: Tensor
    costs: Tensor
    candidates: Tensor
    candidate_costs: Tensor
    candidate_valid: Tensor
    positive: Tensor
    mixture: GaussianMixture1D

    def assignment(self) -> Assignment:
        """Pre-assigned anchors that PAA does not keep become background."""
        batch, num_gts, _ = self.candidates.shape
        fg = self.positive
        matched = torch.where(self.pre_matched_idxs >= 0, BACKGROUND, self.pre_matched_idxs)
        image = torch.arange(batch, device=fg.device)[:, None, None].expand_as(fg)
        gt = torch.arange(num_gts, device=fg.device)[None, :, None].expand_as(fg)
        matched[image[fg], self.candidates[fg]] = gt[fg]
        return Assignment(matched, self.gt_boxes, self.gt_labels)


@torch.no_grad()
def paa_trace(
    cls_scores: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    valid: Tensor,
    targets: list[dict[str, Tensor]],
    num_per_level: list[int],
    *,
    box_coder: BoxCoder | None = None,
    pos_iou_thr: float = 0.1,
    topk: int = 9,
    giou_weight: float = 1.3,
    alpha: float = 0.25,
    gamma: float = 2.0,
    probabilities: bool = False,
) -> PAATrace:
    """Run the PAA steps (ALGORITHMS.md §3.1-3.5) and keep every intermediate value.

    Args:
        cls_scores (Tensor[B, A, C]), bbox_regression (Tensor[B, A, 4]): head outputs (class
            probabilities rather than logits with ``probabilities=True``: IOP, COP).
        anchors (Tensor[A, 4]), valid (Tensor[B, A] bool): from :mod:`colad.anchors`.
        targets: per image ``{"boxes": Tensor[n, 4], "labels": Tensor[n]}``.
        num_per_level: anchors on each level.
        The keywords are the hyper-parameters of ALGORITHMS.md §10.

    Returns:
        :class:`PAATrace`; ``.assignment()`` is what :func:`paa_assign` returns.
    """
    gt_boxes, gt_labels, gt_mask = pad_targets(targets, device=anchors.device)
    pre = max_iou_assign(
        anchors, valid, gt_boxes, gt_mask, pos_iou_thr=pos_iou_thr, neg_iou_thr=pos_iou_thr
    )
    costs = anchor_costs(
        cls_scores, bbox_regression, anchors, pre, gt_boxes, gt_labels, box_coder=box_coder,
        giou_weight=giou_weight, alpha=alpha, gamma=gamma, probabilities=probabilities,
    )  # fmt: skip
    return reassign(costs, pre, gt_boxes, gt_labels, gt_mask, num_per_level, topk=topk)


@torch.no_grad()
def reassign(
    costs: Tensor,
    pre_matched_idxs: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_mask: Tensor,
    num_per_level: list[int],
    *,
    topk: int = 9,
) -> PAATrace:
    """PAA's steps after the costs (ALGORITHMS.md §3.3-3.6): top-k per level, the mixture split
    of every object, and the positives. Whose costs they are does not matter here: one
    network's (PAA), a teacher's (LAD) or a switch's pick per object and level (CoLAD).

    Args:
        costs (Tensor[B, A]): anchor costs, ``inf`` off the pre-assigned anchors.
        pre_matched_idxs (Tensor[B, A]): the IoU pre-assignment (:func:`max_iou_assign`).
        gt_boxes, gt_labels, gt_mask: the padded objects (:func:`pad_targets`).
        num_per_level: anchors on each level.

    Returns:
        :class:`PAATrace`.
    """
    cand, cand_costs, cand_valid = select_candidates(
        costs, pre_matched_idxs, gt_mask.shape[1], num_per_level, topk
    )
    positive, mixture = _split(cand_costs.flatten(0, 1), cand_valid.flatten(0, 1))
    return PAATrace(gt_boxes, gt_labels, gt_mask, pre_matched_idxs, costs, cand, cand_costs,
                    cand_valid, positive.view_as(cand).clone(), mixture)  # fmt: skip


def paa_assign(*args, **kwargs) -> Assignment:
    """Assign anchors to objects with PAA, from one network's head outputs.

    Takes the arguments of :func:`paa_trace`. Pre-assigned anchors that do not end up positive
    become background (they keep their classification loss); nothing is ignored except invalid
    anchors.

    Returns:
        :class:`Assignment`.

    Reference:
        Kim & Lee, ECCV 2020; ALGORITHMS.md §3.1-3.6; chapter {ref}`sec-paa`.
    """
    return paa_trace(*args, **kwargs).assignment()
