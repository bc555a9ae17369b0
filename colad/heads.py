"""The PAA head: two convolution towers shared across levels, with class, box and IoU outputs."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["Scale", "PAAHead", "flatten_levels"]


class Scale(nn.Module):
    """A learnable scalar that multiplies its input (one per FPN level, initialised to 1)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(channels: int, num_convs: int, groups: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def flatten_levels(per_level: list[Tensor]) -> Tensor:
    """Concatenate per-level maps ``Tensor[B, D, H_l, W_l]`` into ``Tensor[B, A, D]`` in colad's
    flattening order (levels, then rows, then columns)."""
    return torch.cat([x.flatten(2).transpose(1, 2) for x in per_level], dim=1)


class PAAHead(nn.Module):
    """Classification, box and IoU predictions for every anchor (ATSS's head, reused by PAA).

    A classification tower and a regression tower, each ``num_convs`` times conv3x3 (no bias)
    → GroupNorm → ReLU, shared by all levels. The class logits come from the first tower; the box
    deltas (times a learnable per-level scale) and the IoU logit from the second.

    Args:
        in_channels: FPN width.
        num_classes: ``C``; the classifier has no background channel.
        num_levels: number of FPN levels (one ``Scale`` each).
        num_convs: convolutions per tower (4 in the paper).
        norm_groups: GroupNorm groups (32 in the paper; must divide ``in_channels``).
        prior_prob: initial foreground probability ``pi`` of the classifier bias.

    Example:
        >>> head = PAAHead(in_channels=16, num_classes=3, num_levels=2, num_convs=1, norm_groups=4)
        >>> out = head([torch.zeros(2, 16, 4, 6), torch.zeros(2, 16, 2, 3)])
        >>> out["cls_logits"].shape, out["bbox_regression"].shape, out["iou_logits"].shape
        (torch.Size([2, 30, 3]), torch.Size([2, 30, 4]), torch.Size([2, 30]))

    Reference:
        Zhang et al., CVPR 2020 (ATSS); ALGORITHMS.md §2.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_levels: int,
        *,
        num_convs: int = 4,
        norm_groups: int = 32,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        if in_channels % norm_groups:
            raise ValueError(f"norm_groups={norm_groups} does not divide {in_channels} channels")
        self.num_classes = num_classes
        self.cls_tower = _tower(in_channels, num_convs, norm_groups)
        self.reg_tower = _tower(in_channels, num_convs, norm_groups)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_regression = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.iou_logits = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        """Run the head on every level.

        Args:
            features: FPN maps ``Tensor[B, in_channels, H_l, W_l]``.

        Returns:
            ``cls_logits`` (Tensor[B, A, C]), ``bbox_regression`` (Tensor[B, A, 4], float32) and
            ``iou_logits`` (Tensor[B, A]), flattened over levels in colad's anchor order.
        """
        if len(features) != len(self.scales):
            raise ValueError(f"PAAHead: {len(features)} levels, built for {len(self.scales)}")
        cls_logits, deltas, ious = [], [], []
        for feature, scale in zip(features, self.scales, strict=True):
            cls_feat = self.cls_tower(feature)
            reg_feat = self.reg_tower(feature)
            cls_logits.append(self.cls_logits(cls_feat))
            deltas.append(scale(self.bbox_regression(reg_feat)).float())
            ious.append(self.iou_logits(reg_feat))
        return {
            "cls_logits": flatten_levels(cls_logits),
            "bbox_regression": flatten_levels(deltas),
            "iou_logits": flatten_levels(ious)[..., 0],
        }
