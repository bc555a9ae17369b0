"""Box operations: pairwise and aligned IoU/GIoU, and the DeltaXYWH box coder.

Boxes are ``(x1, y1, x2, y2)`` in input-image pixels, with no ``+1`` (ALGORITHMS.md §0.2).
Pairwise IoU and elementwise GIoU come from ``torchvision.ops``; only the aligned (elementwise)
IoU, which torchvision does not expose, is written here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_area, box_iou, generalized_box_iou_loss

__all__ = ["EPS", "box_iou", "aligned_iou", "aligned_giou", "BoxCoder"]

EPS = 1e-6  # the union/enclosure epsilon of ALGORITHMS.md §0.2


def aligned_iou(boxes1: Tensor, boxes2: Tensor, eps: float = EPS) -> Tensor:
    """IoU of each box with the box at the same position in the other tensor.

    Args:
        boxes1 (Tensor[..., 4]): xyxy.
        boxes2 (Tensor[..., 4]): xyxy, same shape as ``boxes1``.
        eps: added to the union, so degenerate pairs give 0, not NaN.

    Returns:
        Tensor[...]: IoU in [0, 1].
    """
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(boxes1.reshape(-1, 4)).view(boxes1.shape[:-1])
    union = union + box_area(boxes2.reshape(-1, 4)).view(boxes2.shape[:-1]) - inter
    return inter / (union + eps)


def aligned_giou(boxes1: Tensor, boxes2: Tensor, eps: float = EPS) -> Tensor:
    """Generalised IoU of aligned pairs: ``IoU - (E - U) / E``, E the enclosing box's area.

    Args:
        boxes1 (Tensor[N, 4]): xyxy.
        boxes2 (Tensor[N, 4]): xyxy.

    Returns:
        Tensor[N]: GIoU in [-1, 1].

    Reference:
        Rezatofighi et al., CVPR 2019; ALGORITHMS.md §0.2.
    """
    return 1.0 - generalized_box_iou_loss(boxes1, boxes2, reduction="none", eps=eps)


class BoxCoder:
    """Encode boxes as deltas from anchors and decode them back (mmdet's DeltaXYWH).

    ``decode`` is ``g_x = p_x + p_w * 0.1 * d_0`` and ``g_w = p_w * exp(0.2 * d_2)`` (same for y
    and h), with ``0.2 * d_2`` clamped to ``±log(1000 / 16)``. PAA regresses decoded boxes
    (``reg_decoded_bbox=True``), so training only ever calls ``decode``; ``encode`` is its inverse,
    for tests and for readers.

    Args:
        stds: the delta scales ``(0.1, 0.1, 0.2, 0.2)`` of ALGORITHMS.md §1.3.
        wh_clip: the bound on the scaled log width/height change.

    Example:
        >>> coder = BoxCoder()
        >>> anchors = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
        >>> boxes = torch.tensor([[8.0, 4.0, 40.0, 70.0]])
        >>> torch.allclose(coder.decode(coder.encode(boxes, anchors), anchors), boxes)
        True
    """

    def __init__(
        self,
        stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2),
        wh_clip: float = abs(math.log(16 / 1000)),
    ) -> None:
        self.stds = stds
        self.wh_clip = wh_clip

    def _std(self, like: Tensor) -> Tensor:
        return like.new_tensor(self.stds)

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """Deltas ``d`` such that ``decode(d, anchors) == boxes``.

        Args:
            boxes (Tensor[..., 4]): target boxes, xyxy.
            anchors (Tensor[..., 4]): anchors, xyxy, broadcastable to ``boxes``.

        Returns:
            Tensor[..., 4]: raw deltas (divided by ``stds``).
        """
        pc, pwh = _centre_size(anchors)
        gc, gwh = _centre_size(boxes)
        deltas = torch.cat([(gc - pc) / pwh, torch.log(gwh / pwh)], dim=-1)
        return deltas / self._std(deltas)

    def decode(
        self, deltas: Tensor, anchors: Tensor, max_shape: tuple[int, int] | None = None
    ) -> Tensor:
        """Apply raw deltas to anchors.

        Args:
            deltas (Tensor[..., 4]): network outputs ``(d_0, d_1, d_2, d_3)``.
            anchors (Tensor[..., 4]): xyxy, broadcastable to ``deltas``.
            max_shape: ``(height, width)`` to clamp the boxes to (test time only; the training
                losses see unclamped boxes, as in the reference).

        Returns:
            Tensor[..., 4]: boxes, xyxy.

        Reference:
            ALGORITHMS.md §1.3.
        """
        scaled = deltas * self._std(deltas)
        pc, pwh = _centre_size(anchors)
        centre = pc + pwh * scaled[..., :2]
        size = pwh * scaled[..., 2:].clamp(-self.wh_clip, self.wh_clip).exp()
        boxes = torch.cat([centre - size / 2, centre + size / 2], dim=-1)
        if max_shape is not None:
            height, width = max_shape
            upper = boxes.new_tensor([width, height, width, height])
            boxes = torch.minimum(boxes.clamp(min=0), upper)
        return boxes


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(centre [..., 2], size [..., 2])`` of xyxy boxes."""
    return (boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]
