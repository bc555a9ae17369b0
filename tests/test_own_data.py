"""Training on your own COCO-format data, and the full profile without COCO."""

from __future__ import annotations

import json

import pytest

from colad import config, data, engine
from colad.__main__ import main
from conftest import write_coco


def _own_dataset(tmp_path):
    ann = write_coco(tmp_path / "mine" / "images")  # categories 7 and 9
    return ["--train-ann", str(ann), "--train-images", str(ann.parent),
            "--val-ann", str(ann), "--val-images", str(ann.parent)]  # fmt: skip


def test_train_on_your_own_data_takes_its_classes_and_category_ids(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLAD_DATA", str(tmp_path / "data"))
    argv = ["train", "paa", "--profile", "smoke", "--max-steps", "2", "--batch-size", "2",
            "--no-progress"]  # fmt: skip
    assert main(argv + _own_dataset(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "2 images (0 without objects), 3 usable boxes, 2 categories" in out  # checked first
    (run,) = (tmp_path / "data" / "runs").iterdir()
    saved = json.loads((run / "config.json").read_text())["experiment"]
    assert saved["model"]["num_classes"] == 2
    files = _files(tmp_path)
    assert saved["data"]["train_ann"] == files["train_ann"]
    detections = json.loads((run / "detections.json").read_text())
    assert {d["category_id"] for d in detections} <= {7, 9}
    # the same command reuses the run; an edited annotation file trains a new one
    experiment = config.experiment("paa", "smoke", dataset=files)
    key = engine.run_key(experiment)
    ann = tmp_path / "mine" / "images" / "ann.json"
    ann.write_text(ann.read_text().replace('"seven"', '"SEVEN"'))
    assert engine.run_key(experiment) != key


def _files(tmp_path):
    args = _own_dataset(tmp_path)
    return {name: args[2 * i + 1] for i, name in enumerate(config.DATASET_FIELDS)}


def test_bad_own_data_is_refused_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLAD_DATA", str(tmp_path / "data"))
    args = _own_dataset(tmp_path)
    argv = ["train", "paa", "--profile", "smoke", "--max-steps", "2", "--batch-size", "2",
            "--no-progress"]  # fmt: skip
    assert main(argv + args[:4]) == 2  # only the training half
    assert "missing: --val-ann, --val-images" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [], "annotations": []}')
    assert main(argv + args[:5] + [str(broken)] + args[6:]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "categories" in err
    other = write_coco(tmp_path / "other", categories=[{"id": 7, "name": "seven"},
                                                       {"id": 8, "name": "eight"}],
                       annotations=[])  # fmt: skip
    assert main(argv + args[:4] + ["--val-ann", str(other), "--val-images", str(other.parent)]) == 2
    assert "different categories" in capsys.readouterr().err
    assert not (tmp_path / "data" / "runs").exists()


def test_full_profile_without_coco_fails_first_saying_where_coco_is_expected(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("COLAD_DATA", str(tmp_path))
    with pytest.raises(data.DatasetError, match="expected at .*coco") as caught:
        data.split_paths("full", "val")
    assert str(tmp_path / "coco" / "annotations" / "instances_val2017.json") in str(caught.value)
    assert main(["train", "paa", "--profile", "full", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the full profile trains and evaluates on COCO 2017")
    assert "--train-ann" in err and "COLAD_DATA" in err
    assert not (tmp_path / "synth").exists()  # no generated benchmark stands in
