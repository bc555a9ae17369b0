"""The generated benchmark: determinism, caching, and that it exercises label assignment."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import box_iou

from colad import synth
from colad.__main__ import main

SMALL = dataclasses.replace(synth.preset("smoke"), num_train=12, num_val=4)


def test_regenerating_gives_identical_bytes(tmp_path):
    first = synth.generate(SMALL, root=tmp_path / "a", progress=False, workers=1)
    second = synth.generate(SMALL, root=tmp_path / "b", progress=False, workers=2)
    for split in ("train", "val"):
        assert first.ann_file(split).read_bytes() == second.ann_file(split).read_bytes()
    for name in ("000000.png", "000011.png"):
        assert (first.image_dir("train") / name).read_bytes() == (
            second.image_dir("train") / name
        ).read_bytes()


def test_cache_key_follows_the_parameters():
    assert SMALL.key() == dataclasses.replace(SMALL).key()
    assert SMALL.key() != dataclasses.replace(SMALL, seed=1).key()
    assert SMALL.key() != dataclasses.replace(SMALL, noise_std=0.0).key()


def test_a_complete_benchmark_is_reused_and_a_partial_one_redone(tmp_path):
    bench = synth.generate(SMALL, root=tmp_path, progress=False)
    stamp = bench.ann_file("val").stat().st_mtime_ns
    assert synth.generate(SMALL, root=tmp_path, progress=False) == bench
    assert bench.ann_file("val").stat().st_mtime_ns == stamp  # reused, not rewritten

    (bench.root / "COMPLETE").unlink()  # as if the generator had been killed
    bench.ann_file("train").write_text("{truncated")
    synth.generate(SMALL, root=tmp_path, progress=False)
    assert (bench.root / "COMPLETE").is_file()
    assert json.loads(bench.ann_file("train").read_text())["images"]


def test_preset_validation():
    with pytest.raises(ValueError, match="COCO"):
        synth.preset("full")
    with pytest.raises(ValueError, match="object_size"):
        synth.SynthConfig(object_size=(50.0, 10.0))
    with pytest.raises(ValueError, match="min_visible"):
        synth.SynthConfig(min_visible=0.0)


@pytest.fixture(scope="module")
def train_json(tmp_path_factory):
    cfg = dataclasses.replace(synth.preset("quick"), num_train=150, num_val=0)
    bench = synth.generate(cfg, root=tmp_path_factory.mktemp("bench"), progress=False)
    return json.loads(bench.ann_file("train").read_text())


def test_every_class_appears_with_modal_boxes_inside_the_image(train_json):
    images = {im["id"]: im for im in train_json["images"]}
    anns = train_json["annotations"]
    assert {a["category_id"] for a in anns} == set(range(1, len(synth.CLASSES) + 1))
    assert [c["name"] for c in train_json["categories"]] == list(synth.CLASSES)
    for a in anns:
        x, y, w, h = a["bbox"]
        im = images[a["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= im["width"] and y + h <= im["height"]
        mask = mask_utils.decode(a["segmentation"])
        assert mask.sum() == a["area"] <= w * h
        ys, xs = np.nonzero(mask)  # the box is the tight box of the visible pixels
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)


def test_benchmark_exercises_label_assignment(train_json):
    anns = train_json["annotations"]
    sizes = np.array([math.sqrt(a["bbox"][2] * a["bbox"][3]) for a in anns])
    # scales spanning pyramid levels: small objects and ones over half of the largest images
    assert sizes.min() < 10 and sizes.max() > 64
    assert np.percentile(sizes, 90) / np.percentile(sizes, 10) > 4
    # elongated objects
    aspect = np.array(
        [max(a["bbox"][2], a["bbox"][3]) / min(a["bbox"][2], a["bbox"][3]) for a in anns]
    )
    assert (aspect >= 3).sum() >= 20
    # overlap and occlusion: some visible masks are clearly smaller than their boxes' shapes,
    # and boxes of the same image overlap
    overlapping = 0
    for image in train_json["images"]:
        boxes = torch.tensor(
            [
                [
                    a["bbox"][0],
                    a["bbox"][1],
                    a["bbox"][0] + a["bbox"][2],
                    a["bbox"][1] + a["bbox"][3],
                ]
                for a in anns
                if a["image_id"] == image["id"]
            ],
            dtype=torch.float,
        )
        if len(boxes) > 1:
            iou = box_iou(boxes, boxes).fill_diagonal_(0)
            overlapping += int((iou > 0.1).any())
    assert overlapping >= 15
    # unannotated distractors were drawn
    assert sum(im["num_distractors"] for im in train_json["images"]) >= 100


def test_render_is_a_pure_function_of_seed_split_and_index():
    a, objects_a, _ = synth.render_image(SMALL, "train", 3)
    b, objects_b, _ = synth.render_image(SMALL, "train", 3)
    c, _, _ = synth.render_image(SMALL, "val", 3)
    assert np.array_equal(a, b) and [o["bbox"] for o in objects_a] == [o["bbox"] for o in objects_b]
    assert a.shape != c.shape or not np.array_equal(a, c)


def test_cli_writes_the_benchmark_and_reports_throughput(tmp_path, capsys):
    code = main(
        [
            "data",
            "synth",
            "--profile",
            "smoke",
            "--root",
            str(tmp_path),
            "--num-train",
            "6",
            "--num-val",
            "2",
            "--image-size",
            "64",
            "80",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "images/s" in out and "MiB" in out
    (folder,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    data = json.loads((folder / "annotations" / "instances_train.json").read_text())
    assert len(data["images"]) == 6
    assert all(64 <= im["width"] <= 80 for im in data["images"])
