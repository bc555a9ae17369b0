"""COCO evaluation: the contract of DESIGN.md, cross-checked against pycocotools called directly."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from colad.data import CocoDetection, DatasetError, eval_transforms
from colad.evaluate import (
    HANDMADE_KINDS,
    METRIC_KEYS,
    coco_evaluate,
    detections_to_coco,
    handmade_detections,
    write_detections,
)


def _pycocotools_directly(ann_file, detections) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        dt = gt.loadRes(copy.deepcopy(detections))
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


@pytest.mark.parametrize("kind", HANDMADE_KINDS)
def test_matches_pycocotools_called_directly(smoke_bench, kind):
    ann = smoke_bench.ann_file("val")
    dets = handmade_detections(ann, kind, seed=1)
    ours = coco_evaluate(ann, dets)
    theirs = _pycocotools_directly(ann, dets)
    assert list(ours) == list(METRIC_KEYS)
    for key, value in zip(METRIC_KEYS, theirs, strict=True):
        if value < 0:
            assert math.isnan(ours[key]), key
        else:
            assert ours[key] == pytest.approx(value, abs=1e-12), key


def test_perfect_and_empty_detections(smoke_bench, capsys):
    ann = smoke_bench.ann_file("val")
    perfect = coco_evaluate(ann, handmade_detections(ann, "perfect"))
    assert perfect["AP"] == perfect["AP50"] == perfect["AP75"] == 1.0
    assert perfect["AR100"] == 1.0
    empty = coco_evaluate(ann, [])
    assert set(empty) == set(METRIC_KEYS)
    assert empty["AP"] == empty["AP50"] == empty["AR100"] == 0.0
    assert math.isnan(empty["APl"])  # no large object in the smoke set: undefined, not zero
    assert capsys.readouterr().out == ""  # pycocotools' printing is silenced


def test_each_error_kind_costs_ap(smoke_bench):
    ann = smoke_bench.ann_file("val")
    for kind in HANDMADE_KINDS[1:]:
        assert coco_evaluate(ann, handmade_detections(ann, kind))["AP"] < 1.0, kind


def test_path_list_and_coco_inputs_agree_and_input_is_not_mutated(smoke_bench, tmp_path):
    ann = smoke_bench.ann_file("val")
    dets = handmade_detections(ann, "jittered")
    before = copy.deepcopy(dets)
    path = write_detections(dets, tmp_path / "run" / "detections.json")
    from_list = coco_evaluate(ann, dets)
    assert dets == before  # pycocotools' loadRes would have added keys
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
    assert coco_evaluate(str(ann), path) == from_list == coco_evaluate(gt, dets)
    assert json.loads(path.read_text()) == dets
    assert not list(path.parent.glob("*.tmp"))


def test_bad_detections_are_named(smoke_bench, tmp_path):
    ann = smoke_bench.ann_file("val")
    good = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}
    cases = [
        ({**good, "image_id": 999}, "result \\[0\\]: image_id 999 is not in the ground truth"),
        ({**good, "category_id": 77}, "category_id 77 is not in the ground truth"),
        ({**good, "bbox": [0, 0, 5]}, "field 'bbox' must be 4 finite numbers"),
        ({k: v for k, v in good.items() if k != "score"}, "missing field 'score'"),
    ]
    for det, message in cases:
        with pytest.raises(DatasetError, match=message):
            coco_evaluate(ann, [det])
    bad = tmp_path / "dets.json"
    bad.write_text("[{")
    with pytest.raises(DatasetError, match="dets.json: not valid JSON"):
        coco_evaluate(ann, bad)


def test_ground_truth_without_area_or_iscrowd(tiny_coco):
    dets = [
        {"image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 12], "score": 0.9},
        {"image_id": 1, "category_id": 9, "bbox": [20, 5, 8, 8], "score": 0.8},
        {"image_id": 2, "category_id": 9, "bbox": [5, 5, 20, 10], "score": 0.7},
    ]
    assert coco_evaluate(tiny_coco, dets)["AP"] == 1.0


def test_detections_map_back_to_original_coordinates(smoke_bench):
    """Boxes equal to the targets of resized images score AP 1 once mapped back."""
    ds = CocoDetection(
        smoke_bench.ann_file("val"), smoke_bench.image_dir("val"), eval_transforms(200, 250)
    )
    items = [ds[i] for i in range(len(ds))]
    assert any(t["image_size"][0] != t["orig_size"][0] for _, t in items)
    detections = [
        {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["boxes"]))}
        for _, t in items
    ]
    results = detections_to_coco(detections, [t for _, t in items], ds.index.category_ids)
    assert {r["category_id"] for r in results} <= set(ds.index.category_ids)
    metrics = coco_evaluate(smoke_bench.ann_file("val"), results)
    assert metrics["AP"] == pytest.approx(1.0, abs=1e-6)
