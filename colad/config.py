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

__all__ = [
    "PROFILES",
    "profile_from_env",
    "data_root",
    "coco_root",
    "ModelConfig",
    "model_preset",
    "DataConfig",
    "TrainConfig",
    "Experiment",
    "EXPERIMENTS",
    "experiment",
]

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


class _JsonConfig:
    """``to_dict``/``from_dict`` for the frozen config dataclasses: json-safe, tuples restored,
    nested configs rebuilt, unknown keys an error rather than silently dropped."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a dict, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        kwargs = {}
        for name, value in data.items():
            field = fields[name]
            default = (
                field.default_factory()
                if field.default_factory is not dataclasses.MISSING
                else field.default
            )
            if isinstance(default, _JsonConfig):
                value = type(default).from_dict(value)
            elif isinstance(default, tuple) and isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class ModelConfig(_JsonConfig):
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


@dataclass(frozen=True)
class DataConfig(_JsonConfig):
    """Which data and how it is fed.

    Attributes:
        profile: whose data: ``smoke``/``quick`` use their generated benchmark, ``full`` COCO 2017
            (:func:`colad.data.split_paths`).
        min_size, max_size: resize keeping the aspect ratio (short side, long side).
        hflip: horizontal-flip probability in training.
        num_workers: data-loading processes.
    """

    profile: str = "full"
    min_size: int = 800
    max_size: int = 1333
    hflip: float = 0.5
    num_workers: int = 2

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"DataConfig.profile={self.profile!r}; choose one of {PROFILES}")
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(f"DataConfig: need 0 < min_size <= max_size, got "
                             f"{self.min_size}, {self.max_size}")  # fmt: skip


SCHEDULES = ("step", "cosine")


@dataclass(frozen=True)
class TrainConfig(_JsonConfig):
    """The optimisation schedule (ALGORITHMS.md §1.4 for the paper's 1x).

    Attributes:
        epochs: passes over the training set.
        max_steps: stop after this many iterations instead (0: run all epochs).
        batch_size: images per iteration (per process under torchrun).
        lr, momentum, weight_decay: SGD.
        warmup_steps, warmup_ratio: linear warm-up from ``warmup_ratio * lr``.
        schedule: ``"step"`` (multiply by 0.1 after each epoch in ``lr_steps``) or ``"cosine"``
            (half a cosine from ``lr`` to 0 over the run; better for very short runs).
        lr_steps: epochs after which the step schedule multiplies the learning rate by 0.1.
        grad_clip: clip the gradient norm to this (0: no clipping).
        max_nonfinite: stop the run after this many non-finite losses in a row (each one is
            skipped: no update).
        amp: mixed precision on CUDA (ignored on the CPU).
        seed: seeds Python, NumPy and PyTorch, and the data order.
        eval_every_epoch: evaluate after every epoch, not only at the end.
    """

    epochs: int = 12
    max_steps: int = 0
    batch_size: int = 16
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 500
    warmup_ratio: float = 0.001
    schedule: str = "step"
    lr_steps: tuple[int, ...] = (8, 11)
    grad_clip: float = 0.0
    max_nonfinite: int = 10
    amp: bool = True
    seed: int = 0
    eval_every_epoch: bool = False

    def __post_init__(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}
        bad = [f"{k}={v}" for k, v in positive.items() if not v > 0]
        checks = {
            "max_steps": self.max_steps >= 0,
            "warmup_steps": self.warmup_steps >= 0,
            "warmup_ratio": 0 < self.warmup_ratio <= 1,
            "grad_clip": self.grad_clip >= 0,
            "max_nonfinite": self.max_nonfinite >= 1,
            "schedule": self.schedule in SCHEDULES,
        }
        bad += [f"{k}={getattr(self, k)!r}" for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"TrainConfig: bad value(s) {', '.join(bad)} (schedules: {', '.join(SCHEDULES)})"
            )


@dataclass(frozen=True)
class Experiment(_JsonConfig):
    """A named, complete description of one training run: data, model, schedule and method.

    ``method`` is ``"baseline"`` (PAA assigns for itself); later chapters add ``"lad"`` and
    ``"colad"``.
    """

    name: str = "paa"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    method: str = "baseline"


def _paa_baseline(profile: str, backbone: str | None = None) -> Experiment:
    """PAA assigning for itself: the paper's 1x schedule on COCO (``full``) or a short schedule
    on the generated benchmark."""
    num_classes = 80 if profile == "full" else 6
    model = model_preset(profile, num_classes)
    if backbone is not None:
        model = dataclasses.replace(model, backbone=backbone)
    if profile == "full":
        data, train = DataConfig("full"), TrainConfig()
    elif profile == "quick":
        # 900 steps of 16 images (3.6 epochs of the 4000 training images): about 4 minutes on
        # 2 CPU cores. Loading in the training process is faster there than a worker process.
        data = DataConfig("quick", min_size=128, max_size=192, num_workers=0)
        train = TrainConfig(epochs=4, max_steps=900, batch_size=16, lr=0.03, warmup_steps=90,
                            schedule="cosine")  # fmt: skip
    else:
        data = DataConfig("smoke", min_size=96, max_size=128, num_workers=0)
        train = TrainConfig(epochs=30, batch_size=8, lr=0.03, warmup_steps=10,
                            schedule="cosine")  # fmt: skip
    name = f"paa-{model.backbone}-{profile}"
    return Experiment(name=name, data=data, model=model, train=train)


#: Named experiments: ``experiment(name, profile)`` builds them.
EXPERIMENTS = {"paa": _paa_baseline}


def experiment(name: str, profile: str | None = None, **options) -> Experiment:
    """Build the named experiment for a profile (default: ``$COLAD_PROFILE``).

    Example:
        >>> experiment("paa", "smoke").model.backbone
        'tiny'
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    profile = profile or profile_from_env()
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return EXPERIMENTS[name](profile, **options)
