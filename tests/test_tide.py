"""TIDE through tidecv: the contract, the guards, and that each error lands in its own bin."""

from __future__ import annotations

import json

import matplotlib as mpl
import pytest
from matplotlib.container import BarContainer

from colad import viz
from colad.evaluate import coco_evaluate, handmade_detections
from colad.tide import (
    MAIN_ERRORS,
    SPECIAL_ERRORS,
    cache_file,
    classify_detections,
    error_examples,
    summarize_errors,
    tide_errors,
)


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


# ----------------------------------------------------------------------------------------------
# Per-detection verdicts


def _iou(a, b) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    w = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    h = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = w * h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_perfect_detections_are_all_true_positives(smoke_bench):
    ann = smoke_bench.ann_file("val")
    dets = handmade_detections(ann, "perfect")
    verdicts = classify_detections(ann, dets)
    assert verdicts.kinds == ["TP"] * len(dets) and verdicts.missed == []
    for det, obj in zip(dets, verdicts.objects, strict=True):  # each matched its own object
        assert obj["image_id"] == det["image_id"] and obj["bbox"] == det["bbox"]
    assert verdicts.counts()["TP"] == len(dets)


@pytest.mark.parametrize(
    ("kind", "error"),
    [("jittered", "Loc"), ("duplicated", "Dupe"), ("wrong_class", "Cls"), ("background", "Bkg")],
)
def test_verdicts_follow_tidecv_rules(smoke_bench, kind, error):
    ann = smoke_bench.ann_file("val")
    dets = handmade_detections(ann, kind, seed=3, fraction=0.5)
    verdicts = classify_detections(ann, dets)
    counts = verdicts.counts()
    assert counts[error] > 0 and counts["TP"] > 0
    assert counts[error] == max(v for k, v in counts.items() if k != "TP")
    for i, (det, got) in enumerate(zip(dets, verdicts.kinds, strict=True)):
        obj = verdicts.objects[i]
        if got == "Loc":
            assert obj["category_id"] == det["category_id"]
            assert 0.1 <= _iou(det["bbox"], obj["bbox"]) <= 0.5
        elif got == "Cls":
            assert obj["category_id"] != det["category_id"]
            assert _iou(det["bbox"], obj["bbox"]) >= 0.5
        elif got == "Dupe":  # a better-scored detection took the object
            assert _iou(det["bbox"], obj["bbox"]) >= 0.5
            takers = [j for j, o in enumerate(verdicts.objects)
                      if verdicts.kinds[j] == "TP" and o == obj]  # fmt: skip
            assert len(takers) == 1 and dets[takers[0]]["score"] >= det["score"]
        elif got in ("Bkg", "Both"):
            assert obj is None


def test_verdict_counts_match_tidecv_error_lists(smoke_bench):
    """The verdicts come from the same run whose errors tide_errors fixes."""
    from tidecv import TIDE

    from colad.tide import _evaluate

    ann = smoke_bench.ann_file("val")
    dets = handmade_detections(ann, "jittered", seed=5, fraction=0.6)
    dets += handmade_detections(ann, "background", seed=5, fraction=0.6)
    verdicts = classify_detections(ann, dets)
    run, _, _ = _evaluate(ann, dets, 0.5, 0.1)
    counts = verdicts.counts()
    for error_type in TIDE._error_types:
        assert counts[error_type.short_name] == len(run.error_dict[error_type])


def test_missing_objects_are_missed_and_beyond_100_is_unscored(smoke_bench):
    ann = smoke_bench.ann_file("val")
    dets = handmade_detections(ann, "missing", seed=1, fraction=0.5)
    verdicts = classify_detections(ann, dets)
    total = len([a for a in json.loads(ann.read_text())["annotations"] if not a.get("iscrowd")])
    assert len(verdicts.missed) == total - len(dets) > 0
    image = dets[0]["image_id"]
    extra = [{"image_id": image, "category_id": dets[0]["category_id"], "score": 0.01,
              "bbox": [1.0, 1.0, 2.0, 2.0]}] * 120  # fmt: skip
    verdicts = classify_detections(ann, dets + extra)
    assert verdicts.kinds.count("unscored") > 0
    assert set(verdicts.kinds[len(dets) :]) <= {"Bkg", "unscored"}


def test_no_objects_makes_every_detection_background(tiny_coco):
    data = json.loads(tiny_coco.read_text())
    data["annotations"] = []
    tiny_coco.write_text(json.dumps(data))
    dets = [{"image_id": 1, "category_id": 7, "bbox": [0, 0, 5, 5], "score": 0.5}]
    verdicts = classify_detections(tiny_coco, dets)
    assert verdicts.kinds == ["Bkg"] and verdicts.missed == []


def test_error_examples_take_the_costliest_error(smoke_bench):
    ann = smoke_bench.ann_file("val")
    dets = handmade_detections(ann, "wrong_class", seed=2, fraction=0.5)
    dets += handmade_detections(ann, "missing", seed=2, fraction=0.5)
    verdicts = classify_detections(ann, dets)
    examples = error_examples(verdicts)
    cls = [d["score"] for d, k in zip(dets, verdicts.kinds, strict=True) if k == "Cls"]
    assert dets[examples["Cls"]["detection"]]["score"] == max(cls)
    assert (
        examples["Cls"]["object"]["category_id"]
        != dets[examples["Cls"]["detection"]]["category_id"]
    )
    if verdicts.missed:
        area = max(o["bbox"][2] * o["bbox"][3] for o in verdicts.missed)
        miss = examples["Miss"]["object"]
        assert miss["bbox"][2] * miss["bbox"][3] == area
    assert set(examples) <= set(MAIN_ERRORS)
    assert "Loc" not in examples or verdicts.kinds.count("Loc") > 0


def test_summarize_errors_over_seeds():
    def run(ap, loc, fneg):
        main = dict.fromkeys(MAIN_ERRORS, 0.0) | {"Loc": loc, "Cls": loc - 6.0}
        return {"AP50": ap, "main": main, "special": {"FalsePos": 1.0, "FalseNeg": fneg}}

    summary = summarize_errors([run(40.0, 6.0, 10.0), run(44.0, 8.0, 12.0)])
    assert summary["AP50"] == 42.0 and summary["main"]["Loc"] == 7.0
    assert summary["std"]["main"]["Loc"] == pytest.approx(2**0.5)
    assert summary["std"]["special"]["FalsePos"] == 0.0 and summary["runs"] == 2
    assert summarize_errors([run(40.0, 6.0, 10.0)])["std"]["AP50"] == 0.0
    with pytest.raises(ValueError):
        summarize_errors([])
    fig = viz.plot_tide({"a": summary, "b": run(40.0, 6.0, 10.0)})
    bars = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)]
    assert bars[0].errorbar is not None and bars[1].errorbar is None  # on the summary only
    caps = bars[0].errorbar.lines[2][0].get_segments()  # the vertical bar of each error bar
    loc = MAIN_ERRORS.index("Loc")
    assert caps[loc][:, 1].tolist() == pytest.approx([7.0 - 2**0.5, 7.0 + 2**0.5])
    cls = MAIN_ERRORS.index("Cls")  # mean 1, std 1.41: the whisker stops at 0 below
    assert caps[cls][:, 1].tolist() == pytest.approx([0.0, 1.0 + 2**0.5])


def test_cached_analysis_is_reused_and_follows_the_files(smoke_bench, tmp_path, monkeypatch):
    monkeypatch.setenv("COLAD_DATA", str(tmp_path / "root"))
    ann = smoke_bench.ann_file("val")
    dets_file = tmp_path / "detections.json"
    dets_file.write_text(json.dumps(handmade_detections(ann, "jittered", seed=1)))
    fresh = tide_errors(ann, dets_file)
    cached = tide_errors(ann, dets_file, cache=True)
    stored = cache_file(ann, dets_file)
    assert cached == fresh and stored.is_file()
    assert classify_detections(ann, dets_file, cache=True) == classify_detections(ann, dets_file)

    # a second call reads the file: doctor it and the doctored value comes back
    doctored = json.loads(stored.read_text())
    doctored["errors"]["AP50"] = -1.0
    stored.write_text(json.dumps(doctored))
    assert tide_errors(ann, dets_file, cache=True)["AP50"] == -1.0

    # other detections or other thresholds: another key; a damaged file is analysed again
    dets_file.write_text(json.dumps(handmade_detections(ann, "missing", seed=1)))
    assert cache_file(ann, dets_file) != stored
    assert cache_file(ann, dets_file, (0.75, 0.1)) != cache_file(ann, dets_file)
    cache_file(ann, dets_file).write_text('{"errors": ')
    assert tide_errors(ann, dets_file, cache=True) == tide_errors(ann, dets_file)


def test_cache_needs_files(smoke_bench, tmp_path, monkeypatch):
    monkeypatch.setenv("COLAD_DATA", str(tmp_path))
    ann = smoke_bench.ann_file("val")
    with pytest.raises(ValueError, match="detections as a file"):
        tide_errors(ann, handmade_detections(ann, "perfect"), cache=True)
    with pytest.raises(ValueError, match="ground truth as a file"):
        classify_detections(tmp_path / "missing.json", ann, cache=True)
