"""The interactive explorers: their update functions and widgets, without a browser."""

from __future__ import annotations

import dataclasses

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from colad import config, data, explore, paa, status  # noqa: E402
from colad.detector import Detector  # noqa: E402


@pytest.fixture(scope="module")
def val_set(data_root):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLAD_DATA", str(data_root))
        paths = data.split_paths("smoke", "val")
    return data.CocoDetection(paths.ann_file, paths.image_dir, data.eval_transforms(96, 128))


def _detector(head: str = "paa", seed: int = 0) -> Detector:
    torch.manual_seed(seed)
    model = config.experiment("paa", "smoke").model
    if head == "gfl":
        model = config.gfl_model(model)
    return Detector(model).eval()


def test_the_mixture_explorer_draws_any_object_with_candidates(val_set):
    model = _detector()
    images, targets = zip(*(val_set[k] for k in range(4)), strict=True)
    p = model.predict(list(images))
    head = p.head
    trace = paa.paa_trace(
        head["cls_logits"], head["bbox_regression"], p.anchors, p.valid, list(targets),
        p.num_anchors_per_level, topk=model.config.topk,
    )  # fmt: skip
    explorer = explore.MixtureExplorer(trace)
    ((labels, default),) = explorer.controls().values()
    assert default in explorer.objects and len(labels) == len(explorer.objects)
    valid = trace.candidate_valid.flatten(0, 1)
    for _, g in labels:
        figure, facts = explorer.update(object=g)
        assert facts["candidates"] == int(valid[g].sum()) > 0
        assert facts["positives"] == int(trace.positive.flatten(0, 1)[g].sum())
        matplotlib.pyplot.close(figure)
    padding = [g for g in range(len(valid)) if not valid[g].any()]
    if padding:
        with pytest.raises(ValueError, match="no candidates"):
            explorer.update(object=padding[0])


def test_the_assignment_explorer_compares_rules_per_object(val_set):
    paa_net, gfl_net = _detector(), _detector("gfl")
    rules = {
        "own PAA": explore.own_assignment(paa_net),
        "ATSS": explore.own_assignment(gfl_net),
        "CoLAD": explore.colad_assignment(paa_net, _detector(seed=1)),
    }
    explorer = explore.AssignmentExplorer(rules, val_set, range(3))
    controls = explorer.controls()
    image = controls["image"][1]
    _, facts = explorer.update(image=image, object=-1)
    target = val_set[image][1]
    predictions = gfl_net.predict([val_set[image][0]])
    atss = gfl_net.assign(predictions, [target]).matched_idxs[0]
    assert facts["positives"]["ATSS"] == int((atss >= 0).sum())
    per_object = [explorer.update(image=image, object=k)[1] for k in range(len(target["boxes"]))]
    for name in rules:  # every positive belongs to exactly one object
        assert sum(f["positives"][name] for f in per_object) == facts["positives"][name]
    assert facts["shared"] <= min(facts["positives"]["own PAA"], facts["positives"]["ATSS"])
    with pytest.raises(ValueError, match="object 99"):
        explorer.update(image=image, object=99)


def test_show_draws_the_static_figure_in_a_book_build_and_widgets_respond(val_set, monkeypatch):
    explorer = explore.AssignmentExplorer({"own": explore.own_assignment(_detector())},
                                          val_set, range(2))  # fmt: skip
    monkeypatch.setenv(status.CHAPTER, "paa@1")
    assert not explore.live()
    facts = explorer.show()
    assert facts == explorer.update(**explorer.defaults())[1]
    widget = explorer.widget()  # what JupyterLab shows; its dropdowns redraw through update
    image_box, object_box = widget.children[0].children
    other = next(v for _, v in image_box.options if v != image_box.value)
    image_box.value = other
    assert explorer.facts == explorer.update(image=other, object=object_box.value)[1]
    assert dataclasses.is_dataclass(config.experiment("paa", "smoke"))


def test_the_detection_browser_colours_tide_verdicts(data_root, monkeypatch):
    from colad.evaluate import handmade_detections
    from colad.tide import classify_detections

    monkeypatch.setenv("COLAD_DATA", str(data_root))
    paths = data.split_paths("smoke", "val")
    raw = data.CocoDetection(paths.ann_file, paths.image_dir)  # the detections' image sizes
    dets = handmade_detections(paths.ann_file, "wrong_class", seed=4, fraction=0.5)
    verdicts = classify_detections(paths.ann_file, dets)
    explorer = explore.DetectionExplorer(raw, verdicts, range(4), thresholds=(0.0, 0.9))
    controls = explorer.controls()
    image = controls["image"][1]
    image_id = int(raw.image_record(image)["id"])
    _, facts = explorer.update(image=image, min_score=0.0)
    mine = [verdicts.kinds[i] for i in verdicts.on_image(image_id)]
    expected = {k: mine.count(k) for k in set(mine)}
    assert facts["drawn"] == expected and "Cls" in expected  # the default shows errors
    _, high = explorer.update(image=image, min_score=0.9)
    assert sum(high["drawn"].values()) == sum(
        dets[i]["score"] >= 0.9 for i in verdicts.on_image(image_id)
    )
    category = raw.index.category_ids[0]
    _, one = explorer.update(image=image, min_score=0.0, category=category)
    assert sum(one["drawn"].values()) == sum(
        dets[i]["category_id"] == category for i in verdicts.on_image(image_id)
    )
    with pytest.raises(ValueError, match="category 12345"):
        explorer.update(image=image, category=12345)
    with pytest.raises(ValueError, match="image 99"):
        explorer.update(image=99)
    widget = explorer.widget()
    image_box, score_box, class_box = widget.children[0].children
    class_box.value = category
    assert explorer.facts == one
