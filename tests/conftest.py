"""Shared fixtures: a generated benchmark in a temporary folder and a tiny hand-written COCO set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from colad import synth


@pytest.fixture(scope="session")
def smoke_bench(tmp_path_factory) -> synth.Benchmark:
    """The smoke benchmark, generated once per test session in a temporary folder."""
    return synth.generate(
        synth.preset("smoke"), root=tmp_path_factory.mktemp("synth"), progress=False
    )


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A data root (``COLAD_DATA``) holding the smoke benchmark, generated once per session;
    runs trained in it are shared by the tests that ask for the same experiment."""
    root = tmp_path_factory.mktemp("data")
    synth.generate(synth.preset("smoke"), root=root / "synth", progress=False)
    return root


@pytest.fixture
def in_data_root(data_root, monkeypatch) -> Path:
    monkeypatch.setenv("COLAD_DATA", str(data_root))
    return data_root


def env_with(root: Path) -> dict[str, str]:
    """The environment of a subprocess that uses ``root`` as its data root and this checkout."""
    repo = Path(__file__).resolve().parent.parent
    return {**os.environ, "COLAD_DATA": str(root), "PYTHONPATH": str(repo)}


def torchrun_train(root: Path, out: Path, *arguments: str) -> dict:
    """``torchrun --nproc_per_node=2 -m colad train ARGUMENTS --cpu --out OUT`` (gloo) in the
    data root ``root``; returns the run's ``metrics.json`` after checking that both processes
    ended well."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    command = [*torchrun, "-m", "colad", "train", *arguments, "--cpu", "--out", str(out)]
    done = subprocess.run(command, env=env_with(root), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained in") == 1  # rank 0 alone reports
    return json.loads((out / "metrics.json").read_text())


def write_coco(
    folder: Path, *, images=None, annotations=None, categories=None, make_files: bool = True
) -> Path:
    """Write a small COCO json (two 40x30 images, two categories by default) and its images."""
    images = (
        images
        if images is not None
        else [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
        ]
    )
    annotations = (
        annotations
        if annotations is not None
        else [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 12], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [20, 5, 8, 8], "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 9, "bbox": [5, 5, 20, 10], "iscrowd": 0},
        ]
    )
    categories = (
        categories
        if categories is not None
        else [
            {"id": 7, "name": "seven"},
            {"id": 9, "name": "nine"},
        ]
    )
    folder.mkdir(parents=True, exist_ok=True)
    if make_files:
        rng = np.random.default_rng(0)
        for image in images:
            if isinstance(image, dict) and "file_name" in image:
                pixels = rng.integers(0, 255, (image["height"], image["width"], 3), np.uint8)
                Image.fromarray(pixels).save(folder / image["file_name"])
    path = folder / "ann.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path


@pytest.fixture
def tiny_coco(tmp_path) -> Path:
    """A valid two-image COCO file (category ids 7 and 9) with its images in ``tmp_path``."""
    return write_coco(tmp_path)
