"""Profiles and data locations: the one place that reads colad's environment."""

from __future__ import annotations

import pytest

from colad import config
from colad.__main__ import main


def test_profile_defaults_to_quick_and_reads_the_environment(monkeypatch):
    monkeypatch.delenv("COLAD_PROFILE", raising=False)
    assert config.profile_from_env() == "quick"
    monkeypatch.setenv("COLAD_PROFILE", " Smoke ")
    assert config.profile_from_env() == "smoke"


def test_invalid_profile_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("COLAD_PROFILE", "huge")
    with pytest.raises(ValueError, match="COLAD_PROFILE='huge' is not a profile; choose one of"):
        config.profile_from_env()
    assert main(["data", "synth"]) == 2
    assert "COLAD_PROFILE='huge' is not a profile" in capsys.readouterr().err


def test_data_root_follows_colad_data(monkeypatch, tmp_path):
    monkeypatch.delenv("COLAD_DATA", raising=False)
    assert config.data_root().name == "data"
    monkeypatch.setenv("COLAD_DATA", str(tmp_path))
    assert config.data_root() == tmp_path.resolve()
    assert config.coco_root() == tmp_path.resolve() / "coco"


def test_full_profile_uses_coco_when_present(monkeypatch, tmp_path):
    from colad import data
    from conftest import write_coco

    monkeypatch.setenv("COLAD_DATA", str(tmp_path))
    ann = write_coco(tmp_path / "coco" / "val2017")
    (tmp_path / "coco" / "annotations").mkdir()
    ann.rename(tmp_path / "coco" / "annotations" / "instances_val2017.json")
    paths = data.split_paths("full", "val")
    assert paths.source == "COCO 2017 val"
    assert len(data.CocoDetection(paths.ann_file, paths.image_dir)) == 2


def test_splits_are_train_and_val():
    from colad import data

    with pytest.raises(ValueError, match="split='test'"):
        data.split_paths("quick", "test")


@pytest.mark.parametrize("profile", ["smoke", "quick", "full"])
def test_experiments_round_trip_through_json(profile):
    import json

    from colad.config import Experiment, experiment

    exp = experiment("paa", profile)
    assert Experiment.from_dict(json.loads(json.dumps(exp.to_dict()))) == exp
    assert isinstance(Experiment.from_dict(exp.to_dict()).train.lr_steps, tuple)


def test_experiment_options_and_errors():
    from colad.config import Experiment, ModelConfig, TrainConfig, experiment

    assert experiment("paa", "full", backbone="resnet18").model.backbone == "resnet18"
    with pytest.raises(ValueError, match="unknown experiment"):
        experiment("nope", "quick")
    with pytest.raises(ValueError, match="unknown field"):
        Experiment.from_dict({"name": "x", "trian": {}})
    with pytest.raises(ValueError, match="unknown field.*lrr"):
        Experiment.from_dict({"train": {"lrr": 1.0}})
    with pytest.raises(ValueError, match="expected a dict"):
        ModelConfig.from_dict([1, 2])
    with pytest.raises(ValueError, match="lr=0"):
        TrainConfig(lr=0)


def test_the_weights_option_reaches_every_network_a_run_trains():
    from colad import config

    colad = config.experiment("colad", "quick", weights="/models/r18.pth")
    assert colad.model.weights == colad.distill.network2.weights == "/models/r18.pth"
    assert config.experiment("colad", "quick").model.weights == "none"
    narrowed = config.experiment("paa-small", "quick", backbone="resnet18")
    assert narrowed.model.width_mult < 1
    pretrained = config.experiment("paa-small", "quick", backbone="resnet18", weights="imagenet")
    assert pretrained.model.width_mult == 1 and pretrained.model.weights == "imagenet"
    assert config.experiment("paa", "full").model.weights == "imagenet"
    lad = config.experiment("lad", "quick", weights="none")
    assert lad.distill.teacher == config.experiment("lad", "quick").distill.teacher
