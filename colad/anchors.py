"""Anchors: one square anchor per feature-map location, and which of them lie inside each image.

The flattening order (ALGORITHMS.md §0.2) is the one every per-anchor tensor in colad uses:
levels in order, then row-major within a level. ``A`` is the number of anchors per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["anchors_per_level", "num_anchors_per_level", "valid_mask", "level_of_anchor"]


def anchors_per_level(
    feature_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    scale: float = 8.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """Square anchors of side ``scale * stride`` centred on the top-left corner of each
    cell.

    Args:
        feature_sizes: ``(H_l, W_l)`` of each level.
        strides: ``s_l`` of each level, in input pixels.
        scale: anchor side in strides (mmdet's ``octave_base_scale``; 8 gives 64-1024
            px on P3-P7).

    Returns:
        list[Tensor[H_l * W_l, 4]]: xyxy anchors, row-major. The anchor of cell
        ``(i, j)`` is centred at ``(j * s, i * s)``, not at the cell centre (mmdet's
        ``center_offset=0``).

    Reference:
        ALGORITHMS.md §1.2; chapter {ref}`sec-label-assignment`.
    """
    if len(feature_sizes) != len(strides):
        raise ValueError(
            f"{len(feature_sizes)} feature sizes but {len(strides)} strides",
        )
    anchors = []
    for (height, width), stride in zip(feature_sizes, strides, strict=True):
        ys = torch.arange(height, device=device, dtype=dtype) * stride
        xs = torch.arange(width, device=device, dtype=dtype) * stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 4)
        half = scale * stride / 2
        anchors.append(centres + centres.new_tensor([-half, -half, half, half]))
    return anchors


def num_anchors_per_level(feature_sizes: Sequence[tuple[int, int]]) -> list[int]:
    """Return ``H_l * W_l`` for each level."""
    return [int(h) * int(w) for h, w in feature_sizes]


def valid_mask(
    feature_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    image_sizes: Sequence[tuple[int, int]],
    size_divisible: int = 32,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Which anchors of each image lie inside that image's own padded extent.

    A batch is padded to its largest image; anchors in that extra padding are invalid: they take
    no part in assignment and get no loss. An image of size ``(h, w)`` is first padded to
    multiples of ``size_divisible``, ``(h_pad, w_pad)``; the cell ``(i, j)`` of a level with stride
    ``s`` is valid when ``i < ceil(h_pad / s)`` and ``j < ceil(w_pad / s)``.

    Args:
        feature_sizes: ``(H_l, W_l)`` of each level.
        strides: ``s_l`` of each level.
        image_sizes: the valid ``(h, w)`` of each image (``ImageList.image_sizes``).

    Returns:
        Tensor[B, A] bool.

    Reference:
        ALGORITHMS.md §1.2 (valid flags).
    """
    masks = []
    for height, width in image_sizes:
        h_pad = math.ceil(height / size_divisible) * size_divisible
        w_pad = math.ceil(width / size_divisible) * size_divisible
        per_level = []
        for (rows, cols), stride in zip(feature_sizes, strides, strict=True):
            ok_y = torch.arange(rows, device=device) < min(math.ceil(h_pad / stride), rows)
            ok_x = torch.arange(cols, device=device) < min(math.ceil(w_pad / stride), cols)
            per_level.append((ok_y[:, None] & ok_x[None, :]).reshape(-1))
        masks.append(torch.cat(per_level))
    return torch.stack(masks)


def level_of_anchor(num_per_level: Sequence[int], *, device=None) -> Tensor:
    """Return ``Tensor[A]`` long: the level index of each flattened anchor."""
    counts = torch.as_tensor(list(num_per_level), device=device)
    return torch.repeat_interleave(torch.arange(len(num_per_level), device=device), counts)
