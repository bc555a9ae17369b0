"""COCO loading, transforms and batching, and the bad-input policy (one test per case)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from colad.__main__ import main
from colad.data import (
    CocoDetection,
    DatasetError,
    DatasetWarning,
    collate,
    eval_transforms,
    train_transforms,
)
from conftest import write_coco

# ----------------------------------------------------------------------------------------------
# The dataset on valid input


def test_targets_follow_torchvision_contracts(tiny_coco):
    ds = CocoDetection(tiny_coco, tiny_coco.parent)
    image, target = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    assert type(target["boxes"]) is torch.Tensor and target["boxes"].dtype == torch.float32
    # xywh [2, 3, 10, 12] and [20, 5, 8, 8] become xyxy; category ids 7, 9 become labels 0, 1
    assert target["boxes"].tolist() == [[2, 3, 12, 15], [20, 5, 28, 13]]
    assert target["labels"].tolist() == [0, 1] and target["labels"].dtype == torch.int64
    assert int(target["image_id"]) == 1
    assert target["orig_size"].tolist() == [30, 40] == target["image_size"].tolist()
    assert ds.names == ["seven", "nine"] and ds.index.category_ids == [7, 9]


def test_generated_benchmark_loads(smoke_bench):
    ds = CocoDetection(
        smoke_bench.ann_file("train"), smoke_bench.image_dir("train"), train_transforms(96, 128)
    )
    assert ds.num_classes == 6 and len(ds) == 48
    image, target = ds[5]
    assert image.dtype == torch.float32 and image.shape[0] == 3
    assert min(image.shape[-2:]) == 96 or max(image.shape[-2:]) == 128
    assert len(target["boxes"]) == len(target["labels"]) > 0


def test_resize_keeps_the_aspect_ratio_and_moves_the_boxes(tiny_coco):
    # 40x30 -> short side 60 (x2) unless the long side passes 70: 70/40 = 1.75 wins
    ds = CocoDetection(tiny_coco, tiny_coco.parent, eval_transforms(60, 70))
    image, target = ds[0]
    assert tuple(image.shape[-2:]) == (52, 70)
    assert target["image_size"].tolist() == [52, 70] and target["orig_size"].tolist() == [30, 40]
    scale = torch.tensor([70 / 40, 52 / 30] * 2)
    assert torch.allclose(
        target["boxes"], torch.tensor([[2.0, 3, 12, 15], [20, 5, 28, 13]]) * scale, atol=0.01
    )


def test_horizontal_flip_mirrors_the_boxes(tiny_coco):
    ds = CocoDetection(tiny_coco, tiny_coco.parent, train_transforms(30, 40, hflip=1.0))
    image, target = ds[0]
    plain = CocoDetection(tiny_coco, tiny_coco.parent, eval_transforms(30, 40))[0][0]
    assert torch.equal(image, plain.flip(-1))
    assert target["boxes"].tolist() == [[28, 3, 38, 15], [12, 5, 20, 13]]


def test_collate_pads_to_a_multiple_of_32_and_records_sizes(tiny_coco):
    ds = CocoDetection(tiny_coco, tiny_coco.parent, eval_transforms(60, 70))
    batch = [ds[0], ds[1]]
    images, targets = collate(batch)
    assert images.tensors.shape == (2, 3, 64, 96)
    assert images.image_sizes == [(52, 70), (52, 70)]
    assert torch.equal(images.tensors[0, :, :52, :70], batch[0][0])
    assert (
        images.tensors[:, :, 52:].abs().sum() == 0 and images.tensors[:, :, :, 70:].abs().sum() == 0
    )
    assert targets[1] is batch[1][1]


def test_dataloader_with_workers(smoke_bench):
    ds = CocoDetection(
        smoke_bench.ann_file("val"), smoke_bench.image_dir("val"), eval_transforms(96, 128)
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=2)
    seen = sum(len(targets) for _, targets in loader)
    assert seen == len(ds)


# ----------------------------------------------------------------------------------------------
# Bad input: errors that name the file, the record and the field


def _data(path):
    return json.loads(path.read_text())


def _rewrite(path, data):
    path.write_text(json.dumps(data))
    return path


def test_file_that_is_not_json(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text("{'images': [")
    with pytest.raises(DatasetError, match=r"ann\.json: not valid JSON \(.* line 1, column 2\)"):
        CocoDetection(path, tmp_path)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match="nope.json: cannot read annotation file"):
        CocoDetection(tmp_path / "nope.json", tmp_path)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(tiny_coco, key):
    data = _data(tiny_coco)
    del data[key]
    with pytest.raises(DatasetError, match=f"ann.json: missing top-level key.*'{key}'"):
        CocoDetection(_rewrite(tiny_coco, data), tiny_coco.parent)


def test_annotation_with_unknown_image_id(tiny_coco):
    data = _data(tiny_coco)
    data["annotations"][2]["image_id"] = 42
    with pytest.raises(
        DatasetError, match=r"annotations\[2\] \(id 3\): field 'image_id': unknown image id 42"
    ):
        CocoDetection(_rewrite(tiny_coco, data), tiny_coco.parent)


def test_annotation_with_unknown_category_id(tiny_coco):
    data = _data(tiny_coco)
    data["annotations"][0]["category_id"] = 8
    with pytest.raises(
        DatasetError,
        match=r"annotations\[0\] \(id 1\): field 'category_id': "
        r"unknown category id 8",
    ):
        CocoDetection(_rewrite(tiny_coco, data), tiny_coco.parent)


def test_image_record_pointing_at_a_missing_file(tiny_coco):
    (tiny_coco.parent / "b.png").unlink()
    with pytest.raises(
        DatasetError,
        match=r"images\[1\] \(id 2\): field 'file_name': no file "
        r".*b\.png",
    ):
        CocoDetection(tiny_coco, tiny_coco.parent)


def test_image_record_without_file_name(tiny_coco):
    data = _data(tiny_coco)
    del data["images"][0]["file_name"]
    with pytest.raises(DatasetError, match=r"images\[0\] \(id 1\): missing field 'file_name'"):
        CocoDetection(_rewrite(tiny_coco, data), tiny_coco.parent)


@pytest.mark.parametrize(
    "content", [b"", b"\x89PNG\r\n\x1a\n garbage", b"not an image at all", "truncated"]
)
def test_unreadable_or_corrupt_image(tiny_coco, content):
    file = tiny_coco.parent / "b.png"
    if content == "truncated":  # a real PNG cut in half
        content = file.read_bytes()[: file.stat().st_size // 2]
    file.write_bytes(content)
    ds = CocoDetection(tiny_coco, tiny_coco.parent)
    ds[0]  # the good image still loads
    with pytest.raises(DatasetError, match=r"images\[1\] \(id 2\): cannot read image .*b\.png"):
        ds[1]


def test_image_whose_size_disagrees_with_its_record(tiny_coco):
    data = _data(tiny_coco)
    data["images"][0]["width"] = 41
    ds = CocoDetection(_rewrite(tiny_coco, data), tiny_coco.parent)
    with pytest.raises(DatasetError, match="a.png is 40x30 but the record says 41x30"):
        ds[0]


@pytest.mark.parametrize(
    "bbox",
    [
        [1, 2, "3", 4],
        [1, 2, 3],
        [1, 2, None, 4],
        "1,2,3,4",
        [1, 2, float("nan"), 4],
        [1, True, 3, 4],
    ],
)
def test_non_numeric_or_malformed_bbox(tiny_coco, bbox):
    data = _data(tiny_coco)
    data["annotations"][1]["bbox"] = bbox
    _rewrite(tiny_coco, data)  # json writes NaN as a bare token, which json.loads reads back
    with pytest.raises(
        DatasetError,
        match=r"annotations\[1\] \(id 2\): field 'bbox' must be "
        r"a list of 4 finite numbers",
    ):
        CocoDetection(tiny_coco, tiny_coco.parent)


def test_zero_and_negative_size_boxes_are_skipped_with_a_counted_warning(tiny_coco):
    data = _data(tiny_coco)
    data["annotations"][0]["bbox"] = [2, 3, 0, 12]
    data["annotations"][2]["bbox"] = [5, 5, 20, -1]
    with pytest.warns(
        DatasetWarning,
        match=r"ann\.json: 2 boxes of zero or negative size "
        r"skipped \(first: annotation id 1\)",
    ):
        ds = CocoDetection(_rewrite(tiny_coco, data), tiny_coco.parent)
    assert ds[0][1]["boxes"].tolist() == [[20, 5, 28, 13]]
    assert ds[1][1]["boxes"].shape == (0, 4)


def test_boxes_outside_the_image_are_clipped_or_skipped_with_counted_warnings(tiny_coco):
    data = _data(tiny_coco)
    data["annotations"][0]["bbox"] = [-4, 20, 10, 20]  # partly outside: clipped
    data["annotations"][2]["bbox"] = [50, 5, 10, 10]  # wholly outside: skipped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(_rewrite(tiny_coco, data), tiny_coco.parent)
    messages = [str(w.message) for w in caught if issubclass(w.category, DatasetWarning)]
    assert any("1 boxes partly outside their image clipped" in m for m in messages)
    assert any(
        "1 boxes outside their image (nothing left after clipping) skipped" in m
        and "annotation id 3" in m
        for m in messages
    )
    assert ds[0][1]["boxes"].tolist()[0] == [0, 20, 6, 30]
    assert ds.index.repairs == {"degenerate": 0, "clipped": 1, "outside": 1, "crowd": 0}


def test_empty_annotation_list_is_valid(tiny_coco):
    data = _data(tiny_coco)
    data["annotations"] = []
    ds = CocoDetection(_rewrite(tiny_coco, data), tiny_coco.parent)
    assert len(ds) == 2 and ds[0][1]["boxes"].shape == (0, 4) and ds[0][1]["labels"].shape == (0,)
    with pytest.raises(DatasetError, match="no image with annotations"):
        CocoDetection(tiny_coco, tiny_coco.parent, drop_empty=True)


def test_images_without_annotations_are_kept_for_eval_and_optional_for_training(tiny_coco):
    data = _data(tiny_coco)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] == 1]
    _rewrite(tiny_coco, data)
    assert len(CocoDetection(tiny_coco, tiny_coco.parent)) == 2
    train = CocoDetection(tiny_coco, tiny_coco.parent, drop_empty=True)
    assert len(train) == 1 and train.image_record(0)["id"] == 1


def test_crowd_annotations_are_dropped_from_targets(tiny_coco):
    data = _data(tiny_coco)
    data["annotations"][1]["iscrowd"] = 1
    ds = CocoDetection(_rewrite(tiny_coco, data), tiny_coco.parent)
    assert ds[0][1]["labels"].tolist() == [0] and ds.index.repairs["crowd"] == 1


def _required_fields():
    for kind, fields in (
        ("images", ["id", "file_name", "width", "height"]),
        ("annotations", ["id", "image_id", "category_id", "bbox"]),
        ("categories", ["id"]),
    ):
        for field in fields:
            yield kind, field


@pytest.mark.parametrize(("kind", "field"), list(_required_fields()))
@pytest.mark.parametrize("how", ["delete", "wrong type"])
def test_no_bare_key_or_index_error_reaches_the_user(tmp_path, kind, field, how):
    """Every required field removed or mistyped in turn gives a DatasetError naming it."""
    path = write_coco(tmp_path)
    data = _data(path)
    record = copy.deepcopy(data[kind][0])
    if how == "delete":
        del record[field]
    else:
        record[field] = {"unexpected": "object"}
    data[kind][0] = record
    with pytest.raises(DatasetError, match=rf"{kind}\[0\].*'{field}'"):
        CocoDetection(_rewrite(path, data), tmp_path)


def test_duplicate_ids_and_non_list_sections(tiny_coco):
    data = _data(tiny_coco)
    data["images"][1]["id"] = 1
    with pytest.raises(DatasetError, match=r"images\[1\] \(id 1\): duplicate image id"):
        CocoDetection(_rewrite(tiny_coco, data), tiny_coco.parent)
    data = _data(tiny_coco)
    data["images"] = {"not": "a list"}
    with pytest.raises(DatasetError, match="top-level 'images' must be a list"):
        CocoDetection(_rewrite(tiny_coco, data), tiny_coco.parent)


def test_cli_check_reports_problems_without_a_traceback(tiny_coco, capsys):
    assert main(["data", "check", str(tiny_coco), "--images", str(tiny_coco.parent)]) == 0
    assert "2 images (0 without objects), 3 usable boxes, 2 categories" in capsys.readouterr().out
    data = _data(tiny_coco)
    data["annotations"][0]["bbox"] = "oops"
    _rewrite(tiny_coco, data)
    assert main(["data", "check", str(tiny_coco)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "annotations[0] (id 1): field 'bbox'" in err
    assert "Traceback" not in err
