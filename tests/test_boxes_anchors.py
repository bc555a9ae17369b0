"""Box coder, IoU/GIoU and anchors (ALGORITHMS.md §0.2, §1.2-1.3)."""

import math

import pytest
import torch
from torchvision.ops import box_iou, generalized_box_iou

from colad import anchors as anchor_ops
from colad.boxes import BoxCoder, aligned_giou, aligned_iou


def random_boxes(n, generator, scale=200.0):
    xy = torch.rand(n, 2, generator=generator) * scale
    wh = torch.rand(n, 2, generator=generator) * scale / 2 + 10  # within the coder clip
    return torch.cat([xy, xy + wh], dim=1)


def test_coder_round_trip():
    g = torch.Generator().manual_seed(0)
    boxes, anchors = random_boxes(500, g), random_boxes(500, g)
    coder = BoxCoder()
    decoded = coder.decode(coder.encode(boxes, anchors), anchors)
    torch.testing.assert_close(decoded, boxes, atol=1e-4, rtol=1e-5)  # float32 over 300 px


def test_decode_follows_the_spec():
    anchor = torch.tensor([[0.0, 0.0, 64.0, 32.0]])  # centre (32, 16), size (64, 32)
    deltas = torch.tensor([[1.0, -2.0, 1.0, 0.0]])
    box = BoxCoder().decode(deltas, anchor)[0]
    cx, cy = 32 + 64 * 0.1, 16 - 32 * 0.2
    w, h = 64 * math.exp(0.2), 32.0
    torch.testing.assert_close(box, torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))


def test_decode_clamps_log_size_and_optionally_the_image():
    anchor = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    box = BoxCoder().decode(torch.tensor([[0.0, 0.0, 1e3, -1e3]]), anchor)[0]
    clip = abs(math.log(16 / 1000))
    assert box[2] - box[0] == pytest.approx(10 * math.exp(clip), rel=1e-5)
    assert box[3] - box[1] == pytest.approx(10 * math.exp(-clip), rel=1e-5)
    clamped = BoxCoder().decode(torch.tensor([[0.0, 0.0, 5.0, 5.0]]), anchor, max_shape=(30, 40))
    assert clamped.min() >= 0 and clamped[0, 2] <= 40 and clamped[0, 3] <= 30


def test_aligned_iou_and_giou_match_torchvision_pairwise():
    g = torch.Generator().manual_seed(1)
    a, b = random_boxes(64, g), random_boxes(64, g)
    torch.testing.assert_close(aligned_iou(a, b), box_iou(a, b).diagonal(), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        aligned_giou(a, b), generalized_box_iou(a, b).diagonal(), atol=1e-5, rtol=0
    )


def test_degenerate_boxes_give_finite_values():
    point = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    assert aligned_iou(point, point).item() == 0.0
    assert torch.isfinite(aligned_giou(point, point)).all()


def test_anchor_centres_sizes_and_counts():
    sizes, strides = [(4, 6), (2, 3)], (8, 16)
    levels = anchor_ops.anchors_per_level(sizes, strides, scale=8)
    assert [len(a) for a in levels] == anchor_ops.num_anchors_per_level(sizes) == [24, 6]
    # cell (i=1, j=2) of level 0: centre (2 * 8, 1 * 8), the cell's corner; side 8 * 8
    torch.testing.assert_close(levels[0][1 * 6 + 2], torch.tensor([-16.0, -24.0, 48.0, 40.0]))
    assert torch.allclose(levels[1][:, 2] - levels[1][:, 0], torch.tensor(128.0))
    assert anchor_ops.level_of_anchor([24, 6]).tolist() == [0] * 24 + [1] * 6


def test_valid_mask_excludes_batch_padding():
    # batch padded to 64 x 96; the second image is 30 x 40 -> its own padding is 32 x 64
    sizes, strides = [(8, 12), (4, 6)], (8, 16)
    valid = anchor_ops.valid_mask(sizes, strides, [(64, 96), (30, 40)])
    assert valid[0].all()
    level0 = valid[1, :96].view(8, 12)
    assert level0[:4, :8].all() and not level0[4:].any() and not level0[:, 8:].any()
    level1 = valid[1, 96:].view(4, 6)
    assert level1[:2, :4].all() and level1.sum() == 8


def test_mismatched_levels_raise():
    with pytest.raises(ValueError, match="strides"):
        anchor_ops.anchors_per_level([(2, 2)], (8, 16))
