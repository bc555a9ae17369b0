"""The PAA head and its auxiliary-prediction variants: IoU, IOP and COP.

Two convolution towers shared across levels: classification and regression. The regression
tower also feeds the auxiliary predictions (ALGORITHMS.md §2, §8, §9):

* ``"paa"`` -- class logits; the classifier alone decides how likely each class is.
* ``"iop"`` -- implicit objectness: ``p = ReLU(sigmoid(cls) - b) * o`` with a per-location
  threshold ``b`` and objectness ``o`` from the regression tower (:func:`iop_fuse`).
* ``"cop"`` -- conditional objectness: nine per-location weights from the regression tower mix
  the 3x3 neighbourhood of class probabilities (:func:`cop_fuse`).

Each may have the IoU branch (an IoU logit per anchor from the regression tower) or not. The
``"paa"`` head returns ``cls_logits``; the fused heads return ``cls_probs`` (probabilities), which
the losses, the assignment and inference read through :func:`class_probabilities` and
:func:`colad.losses.focal_terms`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from colad.config import HEADS, IOU_BRANCHES, describe_head

__all__ = [
    "HEADS",
    "IOU_BRANCHES",
    "Scale",
    "TowerHead",
    "PAAHead",
    "flatten_levels",
    "cop_fuse",
    "iop_fuse",
    "class_probabilities",
    "class_output",
    "describe_head",
    "head_of_weights",
]

#: COP's neighbourhood: offsets (dy, dx) in row-major order, k = 4 the centre.
COP_OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
#: IOP's threshold starts at this probability (bias ``-log((1 - q) / q)``).
IOP_THRESHOLD_PRIOR = 1e-4


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


class _COPFuse(torch.autograd.Function):
    """``cop_fuse`` with a hand-written backward: autograd through nine shifted slices would
    keep nine zero-padded gradient buffers of the class map; this accumulates into one."""

    @staticmethod
    def forward(ctx, cls_logits: Tensor, weight_logits: Tensor) -> Tensor:
        # float16 -> float32
        dtype = torch.promote_types(cls_logits.dtype, torch.float32)
        height, width = cls_logits.shape[-2:]
        # Zero-pad the *logits*: a neighbour outside the image has probability 0.5.
        probs = torch.sigmoid(F.pad(cls_logits.to(dtype), (1, 1, 1, 1)))
        weights = torch.sigmoid(weight_logits.to(dtype))
        fused = torch.zeros(cls_logits.shape, dtype=dtype, device=cls_logits.device)
        for k, (dy, dx) in enumerate(COP_OFFSETS):
            window = probs[..., 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
            fused.addcmul_(weights[:, k : k + 1], window)
        fused /= len(COP_OFFSETS)
        ctx.save_for_backward(probs, weights)
        ctx.dtypes = (cls_logits.dtype, weight_logits.dtype)
        return fused

    @staticmethod
    def backward(ctx, grad: Tensor):
        probs, weights = ctx.saved_tensors
        height, width = grad.shape[-2:]
        grad = grad.to(probs.dtype) / len(COP_OFFSETS)
        grad_probs = torch.zeros_like(probs)
        grad_weights = torch.empty_like(weights)
        for k, (dy, dx) in enumerate(COP_OFFSETS):
            rows, cols = slice(1 + dy, 1 + dy + height), slice(1 + dx, 1 + dx + width)
            grad_probs[..., rows, cols].addcmul_(grad, weights[:, k : k + 1])
            grad_weights[:, k] = (grad * probs[..., rows, cols]).sum(1)
        grad_logits = (grad_probs * probs * (1 - probs))[..., 1:-1, 1:-1]
        grad_weight_logits = grad_weights * weights * (1 - weights)
        return grad_logits.to(ctx.dtypes[0]), grad_weight_logits.to(ctx.dtypes[1])


def cop_fuse(cls_logits: Tensor, weight_logits: Tensor) -> Tensor:
    """Conditional objectness: each location's class probabilities are a weighted mean of its
    3x3 neighbourhood's, with nine weights the location predicts for itself.

    ``p[b, c, y, x] = 1/9 * sum_k sigmoid(w[b, k, y, x]) * sigmoid(z[b, c, y + dy_k, x + dx_k])``
    over the offsets ``(dy_k, dx_k)`` of :data:`COP_OFFSETS` (row-major, ``k = 4`` the centre).
    The weights are shared by all classes. Logits outside the map count as 0 (probability 0.5),
    as zero padding before the sigmoid gives. Computed in (at least) float32, by nine shifted
    slices rather than an unfolded ``[B, C, H, W, 9]`` tensor.

    Args:
        cls_logits (Tensor[B, C, H, W]): class logits ``z``.
        weight_logits (Tensor[B, 9, H, W]): the nine weights' logits ``w``.

    Returns:
        Tensor[B, C, H, W]: probabilities in (0, 1), float32 (float64 for float64 inputs).

    Reference:
        Nguyen et al., WACV 2022, appendix A (COP); ALGORITHMS.md §8.1.
    """
    if cls_logits.dim() != 4 or weight_logits.shape != (
        cls_logits.shape[0], len(COP_OFFSETS), *cls_logits.shape[2:]
    ):  # fmt: skip
        raise ValueError(
            f"cop_fuse: cls_logits {tuple(cls_logits.shape)} needs weight_logits "
            f"[B, 9, H, W] of the same B, H, W; got {tuple(weight_logits.shape)}"
        )
    return _COPFuse.apply(cls_logits, weight_logits)


def iop_fuse(
    cls_logits: Tensor,
    objectness_logits: Tensor,
    threshold_logits: Tensor,
) -> Tensor:
    """Implicit objectness: ``p = ReLU(sigmoid(z) - sigmoid(t)) * sigmoid(o)``.

    A class counts only where its probability clears a learned per-location threshold,
    and is then scaled by the location's objectness. Where ``sigmoid(z) < sigmoid(t)``
    nothing flows back to ``z``, ``t`` or ``o`` for that class.

    Args:
        cls_logits (Tensor[B, C, H, W]): class logits ``z``.
        objectness_logits, threshold_logits (Tensor[B, 1, H, W]): ``o`` and ``t``.

    Returns:
        Tensor[B, C, H, W]: probabilities in [0, 1), in (at least) float32.

    Reference:
        Nguyen et al., WACV 2022, appendix A (IOP); ALGORITHMS.md §9.
    """
    dtype = torch.promote_types(cls_logits.dtype, torch.float32)
    scores = torch.sigmoid(cls_logits.to(dtype))
    threshold = torch.sigmoid(threshold_logits.to(dtype))
    return F.relu(scores - threshold) * torch.sigmoid(objectness_logits.to(dtype))


def class_probabilities(head_outputs: dict[str, Tensor]) -> Tensor:
    """The class probabilities of any head's outputs: ``sigmoid(cls_logits)`` or
    ``cls_probs`` (Tensor[B, A, C], float32)."""
    if "cls_probs" in head_outputs:
        return head_outputs["cls_probs"].float()
    return torch.sigmoid(head_outputs["cls_logits"].float())


def class_output(head_outputs: dict[str, Tensor]) -> tuple[Tensor, bool]:
    """The class output of any head and whether it holds probabilities (IOP, COP) rather than
    logits (PAA): ``(Tensor[B, A, C], bool)``."""
    if "cls_probs" in head_outputs:
        return head_outputs["cls_probs"], True
    return head_outputs["cls_logits"], False


def head_of_weights(weights: dict, prefix: str = "head.") -> tuple[str, bool]:
    """Which head variant a state dict holds, from its keys: ``(head, has_iou_branch)``."""
    if f"{prefix}box_distribution.weight" in weights:
        head = "gfl"
    elif f"{prefix}cop_weights.weight" in weights:
        head = "cop"
    elif f"{prefix}objectness.weight" in weights:
        head = "iop"
    else:
        head = "paa"
    return head, f"{prefix}iou_logits.weight" in weights


def flatten_levels(per_level: list[Tensor]) -> Tensor:
    """Concatenate per-level maps ``Tensor[B, D, H_l, W_l]`` into ``Tensor[B, A, D]`` in colad's
    flattening order (levels, then rows, then columns)."""
    return torch.cat([x.flatten(2).transpose(1, 2) for x in per_level], dim=1)


class TowerHead(nn.Module):
    """What every head of colad shares (ATSS's design): a classification and a regression tower,
    each ``num_convs`` times conv3x3 (no bias) → GroupNorm → ReLU, shared by all levels; the
    class conv on the first; a learnable scale per level; N(0, 0.01) initialisation with the
    class bias at the prior ``pi``; and running on every level (:meth:`forward_level`, which a
    subclass writes) with the outputs flattened in colad's anchor order.

    Subclasses add their output convolutions after ``super().__init__`` and then call
    :meth:`init_weights`.
    """

    def __init__(
        self, in_channels: int, num_classes: int, num_levels: int, num_convs: int, norm_groups: int
    ) -> None:
        super().__init__()
        if in_channels % norm_groups:
            raise ValueError(f"norm_groups={norm_groups} does not divide {in_channels} channels")
        self.num_classes = num_classes
        self.cls_tower = _tower(in_channels, num_convs, norm_groups)
        self.reg_tower = _tower(in_channels, num_convs, norm_groups)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))

    def init_weights(self, prior_prob: float) -> None:
        """Every convolution's weights ~ N(0, 0.01^2) and biases 0; the class bias at
        ``-log((1 - pi) / pi)``, so that every class starts at probability ``pi``."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, _prior_bias(prior_prob))

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        """Run :meth:`forward_level` on every level's map ``Tensor[B, in_channels, H_l, W_l]``
        and flatten each output to ``Tensor[B, A, D]``."""
        if len(features) != len(self.scales):
            raise ValueError(
                f"{type(self).__name__}: {len(features)} levels, built for {len(self.scales)}"
            )
        levels = [self.forward_level(feature, k) for k, feature in enumerate(features)]
        return {name: flatten_levels([level[name] for level in levels]) for name in levels[0]}

    def forward_level(self, feature: Tensor, level: int) -> dict[str, Tensor]:
        raise NotImplementedError


class PAAHead(TowerHead):
    """Classification, box and IoU predictions for every anchor (ATSS's head, reused by PAA),
    with the auxiliary-prediction variants of the module docstring.

    A classification tower and a regression tower, each ``num_convs`` times conv3x3 (no bias)
    → GroupNorm → ReLU, shared by all levels. The class logits come from the first tower; the box
    deltas (times a learnable per-level scale), the IoU logit and the objectness predictions
    (IOP's objectness and threshold, COP's nine weights) from the second.

    Args:
        in_channels: FPN width.
        num_classes: ``C``; the classifier has no background channel.
        num_levels: number of FPN levels (one ``Scale`` each).
        num_convs: convolutions per tower (4 in the paper).
        norm_groups: GroupNorm groups (32 in the paper; must divide ``in_channels``).
        prior_prob: initial foreground probability ``pi`` of the classifier bias.
        head: one of :data:`HEADS`.
        iou_branch: whether the head has an IoU branch (any of :data:`IOU_BRANCHES` but
            ``"none"``); whether inference uses it is the detector's business.

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
        head: str = "paa",
        iou_branch: str = "infer",
    ) -> None:
        if head not in HEADS or head == "gfl" or iou_branch not in IOU_BRANCHES:
            raise ValueError(f"head={head!r}, iou_branch={iou_branch!r}; choose a head in "
                             f"{HEADS[:3]} and an IoU branch in {IOU_BRANCHES}")  # fmt: skip
        super().__init__(in_channels, num_classes, num_levels, num_convs, norm_groups)
        self.kind, self.has_iou = head, iou_branch != "none"
        self.bbox_regression = nn.Conv2d(in_channels, 4, 3, padding=1)
        if self.has_iou:
            self.iou_logits = nn.Conv2d(in_channels, 1, 3, padding=1)
        if head == "iop":
            self.objectness = nn.Conv2d(in_channels, 1, 3, padding=1)
            self.obj_threshold = nn.Conv2d(in_channels, 1, 3, padding=1)
        elif head == "cop":
            self.cop_weights = nn.Conv2d(in_channels, len(COP_OFFSETS), 3, padding=1)
        self.init_weights(prior_prob)
        if head == "iop":  # the threshold starts near 0: p = 0.5 * sigmoid(z) at first
            nn.init.constant_(self.obj_threshold.bias, _prior_bias(IOP_THRESHOLD_PRIOR))

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        """Run the head on every level.

        Args:
            features: FPN maps ``Tensor[B, in_channels, H_l, W_l]``.

        Returns:
            ``cls_logits`` (Tensor[B, A, C]; the ``"paa"`` head) or ``cls_probs`` (Tensor[B, A,
            C], float32; IOP and COP), ``bbox_regression`` (Tensor[B, A, 4], float32) and, with
            the IoU branch, ``iou_logits`` (Tensor[B, A]), flattened over levels in colad's
            anchor order.
        """
        outputs = super().forward(features)
        if self.has_iou:
            outputs["iou_logits"] = outputs["iou_logits"][..., 0]
        return outputs

    def forward_level(self, feature: Tensor, level: int) -> dict[str, Tensor]:
        """The head on one level's map ``Tensor[B, in_channels, H, W]``: the outputs of
        :meth:`forward` as maps (``[B, D, H, W]``, the IoU logit ``[B, 1, H, W]``)."""
        cls_feat = self.cls_tower(feature)
        reg_feat = self.reg_tower(feature)
        logits = self.cls_logits(cls_feat)
        if self.kind == "iop":
            classes = iop_fuse(logits, self.objectness(reg_feat), self.obj_threshold(reg_feat))
        elif self.kind == "cop":
            classes = cop_fuse(logits, self.cop_weights(reg_feat))
        else:
            classes = logits
        outputs = {
            "cls_logits" if self.kind == "paa" else "cls_probs": classes,
            "bbox_regression": self.scales[level](self.bbox_regression(reg_feat)).float(),
        }
        if self.has_iou:
            outputs["iou_logits"] = self.iou_logits(reg_feat)
        return outputs


def _prior_bias(prob: float) -> float:
    """The bias whose sigmoid is ``prob``."""
    return -math.log((1 - prob) / prob)
