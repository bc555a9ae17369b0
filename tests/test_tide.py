"""TIDE through tidecv: the contract, the guards, and that each error lands in its own bin."""

from __future__ import annotations

import json

import matplotlib as mpl
import pytest

from colad import viz
from colad.evaluate import coco_evaluate, handmade_detections
from colad.tide import MAIN_ERRORS, SPECIAL_ERRORS, tide_errors


def test_perfect_detections_have_no_errors(smoke_bench):
    ann = smoke_bench.ann_file("val")
    result = tide_errors(ann, handmade_detections(ann, "perfect"))
    assert result["AP50"] == pytest.approx(100.0)
    assert list(result["main"]) == list(MAIN_ERRORS)
    assert list(result["special"]) == list(SPECIAL_ERRORS)
    assert all(v == 0 for v in result["main"].values())
    assert all(v == 0 for v in result["special"].values())


def test_no_detections_is_all_misses(smoke_bench):
    result = tide_errors(smoke_bench.ann_file("val"), [])
    assert result["AP50"] == 0.0
    assert result["main"]["Miss"] == pytest.approx(100.0)
    assert result["special"]["FalseNeg"] == pytest.approx(100.0)
    assert sum(result["main"].values()) == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("jittered", "Loc"),
        ("missing", "Miss"),
        ("duplicated", "Dupe"),
        ("wrong_class", "Cls"),
        ("background", "Bkg"),
    ],
)
def test_each_handmade_error_lands_in_its_bin(smoke_bench, kind, error):
    ann = smoke_bench.ann_file("val")
    dets = handmade_detections(ann, kind, seed=3, fraction=0.5)
    result = tide_errors(ann, dets)
    assert result["main"][error] > 0
    assert result["main"][error] == max(result["main"].values())
    # TIDE's AP50 and pycocotools' agree closely (both 101-point interpolation)
    assert result["AP50"] == pytest.approx(100 * coco_evaluate(ann, dets)["AP50"], abs=1.0)


def test_ground_truth_without_objects(tiny_coco):
    data = json.loads(tiny_coco.read_text())
    data["annotations"] = []
    tiny_coco.write_text(json.dumps(data))
    dets = [{"image_id": 1, "category_id": 7, "bbox": [0, 0, 5, 5], "score": 0.5}]
    result = tide_errors(tiny_coco, dets)
    assert result["AP50"] == 0.0 and not any(result["main"].values())


def test_matplotlib_style_is_left_alone(smoke_bench):
    before = dict(mpl.rcParams)
    ann = smoke_bench.ann_file("val")
    tide_errors(ann, handmade_detections(ann, "jittered"))
    changed = [k for k, v in before.items() if mpl.rcParams[k] != v]
    assert changed == []


def test_plot_has_one_series_per_model(smoke_bench):
    ann = smoke_bench.ann_file("val")
    errors = {
        kind: tide_errors(ann, handmade_detections(ann, kind))
        for kind in ("jittered", "missing", "background")
    }
    fig = viz.plot_tide(errors)
    main_ax, special_ax = fig.axes
    assert len(main_ax.containers) == 3 and len(special_ax.containers) == 3
    assert len(main_ax.containers[0]) == len(MAIN_ERRORS)
    heights = [bar.get_height() for bar in main_ax.containers[1]]  # "missing"
    assert heights[MAIN_ERRORS.index("Miss")] == pytest.approx(errors["missing"]["main"]["Miss"])
    assert [t.get_text() for t in main_ax.get_legend().get_texts()] == list(errors)


@pytest.mark.parametrize("kind", ["jittered", "wrong_class", "duplicated"])
def test_matches_tidecv_called_directly(smoke_bench, kind):
    """Where tidecv does not crash, our dAP values are exactly its own."""
    import matplotlib as mpl
    from tidecv import TIDE, Data

    ann = smoke_bench.ann_file("val")
    dets = handmade_detections(ann, kind, seed=2, fraction=0.4)
    truth, preds = Data("gt"), Data("dets")
    for a in json.loads(ann.read_text())["annotations"]:
        truth.add_ground_truth(a["image_id"], a["category_id"], a["bbox"])
    for d in dets:
        preds.add_detection(d["image_id"], d["category_id"], d["score"], d["bbox"])
    with mpl.rc_context():
        reference = TIDE()
    reference.evaluate(truth, preds, mode=TIDE.BOX)
    main = reference.get_main_errors()["dets"]
    special = reference.get_special_errors()["dets"]

    ours = tide_errors(ann, dets)
    assert ours["AP50"] == pytest.approx(reference.runs["dets"].ap, abs=1e-9)
    for key in MAIN_ERRORS:
        assert ours["main"][key] == pytest.approx(main[key], abs=1e-9), key
    for key in SPECIAL_ERRORS:
        assert ours["special"][key] == pytest.approx(special[key], abs=1e-9), key
