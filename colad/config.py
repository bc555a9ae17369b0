"""Profiles and locations: the one place that reads colad's environment variables.

``COLAD_PROFILE`` selects how big everything is:

* ``smoke`` -- a few dozen tiny generated images; CI and tests.
* ``quick`` -- the generated benchmark at ~128-192 px; the book on a laptop (default).
* ``full`` -- COCO 2017 and the paper's settings; a GPU server.

``COLAD_DATA`` moves the data root (default: ``data/`` at the top of the checkout). The generated
benchmark lives in ``<root>/synth``, COCO 2017 in ``<root>/coco`` and training runs in
``<root>/runs``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PROFILES", "profile_from_env", "data_root", "coco_root", "ModelConfig", "model_preset"]

PROFILES = ("smoke", "quick", "full")
DEFAULT_PROFILE = "quick"


def profile_from_env(default: str = DEFAULT_PROFILE) -> str:
    """Return the active profile: ``$COLAD_PROFILE`` if set, else ``default``.

    Raises:
        ValueError: the variable names no known profile.
    """
    profile = os.environ.get("COLAD_PROFILE", "").strip().lower() or default
    if profile not in PROFILES:
        raise ValueError(
            f"COLAD_PROFILE={profile!r} is not a profile; choose one of {', '.join(PROFILES)}"
        )
    return profile


def data_root() -> Path:
    """Return the data root: ``$COLAD_DATA`` if set, else ``data/`` beside the package."""
    env = os.environ.get("COLAD_DATA", "").strip()
    if env:
        return Path(env).expanduser().resolve()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():
        return checkout / "data"
    # An installed (non-editable) package has no checkout around it: use the working directory.
    return Path.cwd() / "data"


def coco_root() -> Path:
    """Return where COCO 2017 is expected (``<data root>/coco``), laid out as cocodataset.org ships
    it: ``annotations/instances_{train,val}2017.json`` and ``{train,val}2017/`` image folders."""
    return data_root() / "coco"


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines a PAA detector: architecture, anchors, assignment, losses and
    post-processing. The defaults are the paper's (ALGORITHMS.md §10) with a ResNet-50; change
    fields with ``dataclasses.replace``.

    Attributes:
        num_classes: ``C`` (80 on COCO).
        backbone: a name in :data:`colad.backbone.BACKBONES`.
        pretrained: load ImageNet weights (downloads; GPU servers only).
        frozen_stages, norm_eval: backbone freezing (applies to pretrained weights only).
        widths: channels of the ``tiny`` backbone's four stages.
        fpn_channels: FPN and head width.
        num_levels: FPN levels from P3 (3 = P3-P5, 5 = P3-P7).
        head_convs, norm_groups: convolutions per head tower and their GroupNorm groups.
        anchor_scale: anchor side in strides (8 gives 64-1024 px on P3-P7).
        pos_iou_thr, topk: IoU pre-assignment threshold and candidates per level.
        giou_weight, iou_weight, focal_alpha, focal_gamma: loss weights (``lambda`` = giou_weight
            also weighs the anchor cost).
        nms_pre, score_thresh, nms_thresh, detections_per_img: inference.
        score_voting, voting_sigma: PAA's score voting and its ``sigma_t``.
    """

    num_classes: int = 80
    backbone: str = "resnet50"
    pretrained: bool = False
    frozen_stages: int = 1
    norm_eval: bool = True
    widths: tuple[int, int, int, int] = (32, 64, 128, 256)
    fpn_channels: int = 256
    num_levels: int = 5
    head_convs: int = 4
    norm_groups: int = 32
    anchor_scale: float = 8.0
    pos_iou_thr: float = 0.1
    topk: int = 9
    giou_weight: float = 1.3
    iou_weight: float = 0.5
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    nms_pre: int = 1000
    score_thresh: float = 0.05
    nms_thresh: float = 0.6
    detections_per_img: int = 100
    score_voting: bool = True
    voting_sigma: float = 0.025

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, not silently dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {', '.join(unknown)}")
        data = dict(data)
        if "widths" in data:
            data["widths"] = tuple(data["widths"])
        return cls(**data)


def model_preset(profile: str, num_classes: int) -> ModelConfig:
    """The detector of each profile.

    * ``full``: the paper's PAA-R50 (ImageNet weights, FPN 256, P3-P7, four-conv towers).
    * ``quick``: a small GroupNorm backbone, a 64-channel FPN on P3-P5 and two-conv towers, with
      anchors of 4 strides (32-128 px) for the generated benchmark's 8-96 px objects.
    * ``smoke``: the same, narrower, for tests.
    """
    if profile == "full":
        return ModelConfig(num_classes=num_classes, backbone="resnet50", pretrained=True)
    if profile == "quick":
        return ModelConfig(
            num_classes=num_classes, backbone="tiny", widths=(32, 64, 128, 256),
            fpn_channels=64, num_levels=3, head_convs=2, norm_groups=16, anchor_scale=4.0,
        )  # fmt: skip
    if profile == "smoke":
        return ModelConfig(
            num_classes=num_classes, backbone="tiny", widths=(16, 32, 64, 64),
            fpn_channels=32, num_levels=3, head_convs=1, norm_groups=8, anchor_scale=4.0,
        )  # fmt: skip
    raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
