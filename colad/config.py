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
    "HEADS",
    "IOU_BRANCHES",
    "ModelConfig",
    "model_preset",
    "DataConfig",
    "TrainConfig",
    "METHODS",
    "TEACHER_METHODS",
    "SWITCH_RULES",
    "DistillConfig",
    "Experiment",
    "EXPERIMENTS",
    "experiment",
    "TABLE1_ROWS",
    "training_twin",
    "describe_head",
    "CPU_WIDTH_MULT",
    "gfl_model",
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

    #: Fields holding a config or ``None``, and the config class to rebuild them with.
    _optional_configs: dict = {}

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
            elif name in cls._optional_configs and value is not None:
                value = cls._optional_configs[name].from_dict(value)
            elif isinstance(default, tuple) and isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)


#: Head variants (``ModelConfig.head``): the plain classifier, implicit objectness (IOP) and
#: conditional objectness (COP) of :mod:`colad.heads`, trained with PAA's assignment; and GFL's
#: joint score with box distributions (:mod:`colad.gfl`), trained with ATSS's.
HEADS = ("paa", "iop", "cop", "gfl")
#: What the IoU branch does (``ModelConfig.iou_branch``): ``"infer"`` it is trained and used in
#: the detection score (PAA); ``"train"`` trained but not used at inference (the paper's "*");
#: ``"none"`` absent (the paper's "base" heads).
IOU_BRANCHES = ("infer", "train", "none")


@dataclass(frozen=True)
class ModelConfig(_JsonConfig):
    """Everything that defines a detector: architecture, anchors, assignment, losses and
    post-processing. The defaults are the paper's PAA (ALGORITHMS.md §10) with a ResNet-50;
    :func:`gfl_model` turns a config into GFL's (§16.12); change fields with
    ``dataclasses.replace``.

    Attributes:
        num_classes: ``C`` (80 on COCO).
        backbone: a name in :data:`colad.backbone.BACKBONES`.
        weights: the backbone's initial weights: ``"none"`` (random), ``"imagenet"``
            (downloaded once into ``$TORCH_HOME``; GPU servers) or a state-dict file's path
            (:func:`colad.backbone.build_backbone`).
        frozen_stages, norm_eval: backbone freezing (applies to pretrained weights only).
        widths: channels of the ``tiny`` backbone's four stages.
        width_mult: scales every other backbone's channels (1: the published network; below 1:
            a randomly initialised CPU-sized version, :func:`colad.backbone.build_backbone`).
        fpn_channels: FPN and head width.
        num_levels: FPN levels from P3 (3 = P3-P5, 5 = P3-P7).
        head_convs, norm_groups: convolutions per head tower and their GroupNorm groups.
        head: one of :data:`HEADS` (``"iop"``/``"cop"`` fuse an objectness prediction into the
            class prediction and are trained with the probability focal loss; ``"gfl"`` is GFL:
            ATSS assignment, joint score, box distributions, and no IoU branch).
        iou_branch: one of :data:`IOU_BRANCHES`. Without the IoU branch the box loss is the
            plain mean over the positives (the paper's "base" heads) and the score is the class
            probability alone.
        anchor_scale: anchor side in strides (8 gives 64-1024 px on P3-P7).
        pos_iou_thr, topk: IoU pre-assignment threshold (PAA) and candidates per level (PAA's
            cheapest, ATSS's nearest).
        giou_weight, iou_weight, focal_alpha, focal_gamma: loss weights (``lambda`` = giou_weight
            also weighs PAA's anchor cost; GFL's GIoU weight is 2).
        reg_max, qfl_beta, dfl_weight: GFL's bins per box side minus one (16), its quality focal
            loss exponent (2) and its distribution focal loss weight (0.25).
        nms_pre, score_thresh, nms_thresh, detections_per_img: inference.
        score_voting, voting_sigma: PAA's score voting and its ``sigma_t``.
    """

    num_classes: int = 80
    backbone: str = "resnet50"
    weights: str = "none"
    frozen_stages: int = 1
    norm_eval: bool = True
    widths: tuple[int, int, int, int] = (32, 64, 128, 256)
    width_mult: float = 1.0
    fpn_channels: int = 256
    num_levels: int = 5
    head_convs: int = 4
    norm_groups: int = 32
    head: str = "paa"
    iou_branch: str = "infer"
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
    reg_max: int = 16
    qfl_beta: float = 2.0
    dfl_weight: float = 0.25

    @classmethod
    def from_dict(cls, data: dict):
        # Runs saved before ``weights`` existed have ``pretrained: bool``.
        if isinstance(data, dict) and "pretrained" in data and "weights" not in data:
            pretrained = bool(data["pretrained"])
            data = {k: v for k, v in data.items() if k != "pretrained"}
            data["weights"] = "imagenet" if pretrained else "none"
        return super().from_dict(data)

    def __post_init__(self) -> None:
        if not isinstance(self.weights, str) or not self.weights.strip():
            raise ValueError(f"ModelConfig.weights={self.weights!r}: 'none', 'imagenet' or the "
                             "path of a state-dict file")  # fmt: skip
        if self.head not in HEADS:
            raise ValueError(f"ModelConfig.head={self.head!r}; choose one of {', '.join(HEADS)}")
        if self.iou_branch not in IOU_BRANCHES:
            raise ValueError(f"ModelConfig.iou_branch={self.iou_branch!r}; choose one of "
                             f"{', '.join(IOU_BRANCHES)}")  # fmt: skip
        if self.head == "gfl" and (self.iou_branch != "none" or self.score_voting):
            raise ValueError(
                "ModelConfig.head='gfl' scores detections by its joint score alone: it needs "
                f"iou_branch='none' and score_voting=False (got {self.iou_branch!r}, "
                f"{self.score_voting}); build it with colad.config.gfl_model"
            )
        if self.reg_max < 1:
            raise ValueError(f"ModelConfig.reg_max={self.reg_max}; need at least 2 bins per side")


def gfl_model(model: ModelConfig) -> ModelConfig:
    """The same network with GFL's head and settings (ALGORITHMS.md §16.12): joint score, box
    distributions with ``reg_max = 16``, ATSS with the same ``topk``, GIoU weight 2, no IoU
    branch and no score voting. Backbone, FPN, towers, anchors and inference thresholds stay."""
    return dataclasses.replace(
        model, head="gfl", iou_branch="none", giou_weight=2.0, score_voting=False
    )


def model_preset(profile: str, num_classes: int) -> ModelConfig:
    """The detector of each profile.

    * ``full``: the paper's PAA-R50 (ImageNet weights, FPN 256, P3-P7, four-conv towers).
    * ``quick``: a small GroupNorm backbone, a 64-channel FPN on P3-P5 and two-conv towers, with
      anchors of 4 strides (32-128 px) for the generated benchmark's 8-96 px objects.
    * ``smoke``: the same, narrower, for tests.
    """
    if profile == "full":
        return ModelConfig(num_classes=num_classes, backbone="resnet50", weights="imagenet")
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


#: The :class:`DataConfig` fields naming your own dataset (command line: ``--train-ann`` ...).
DATASET_FIELDS = ("train_ann", "train_images", "val_ann", "val_images")


@dataclass(frozen=True)
class DataConfig(_JsonConfig):
    """Which data and how it is fed.

    Attributes:
        profile: whose data: ``smoke``/``quick`` use their generated benchmark, ``full`` COCO 2017
            (:func:`colad.data.split_paths`).
        min_size, max_size: resize keeping the aspect ratio (short side, long side).
        hflip: horizontal-flip probability in training.
        num_workers: data-loading processes.
        train_min_sizes: multi-scale training: ``(low, high)`` draws each training image's short
            side uniformly from ``low..high`` (mmdetection's "range" mode, ``(480, 800)`` in the
            ``ms-2x`` recipes); empty: always ``min_size``. Evaluation uses ``min_size``.
        train_ann, train_images, val_ann, val_images: your own COCO-format dataset instead of
            the profile's (all four, or none): annotation files and the image folders their
            ``file_name`` fields are relative to. Set them with :func:`on_dataset`, which also
            takes the number of classes from the file.
    """

    profile: str = "full"
    min_size: int = 800
    max_size: int = 1333
    hflip: float = 0.5
    num_workers: int = 2
    train_min_sizes: tuple[int, ...] = ()
    train_ann: str = ""
    train_images: str = ""
    val_ann: str = ""
    val_images: str = ""

    @property
    def files(self) -> dict[str, str]:
        """The own-dataset fields, by name."""
        return {name: getattr(self, name) for name in DATASET_FIELDS}

    @property
    def custom(self) -> bool:
        """Whether the run uses your own dataset rather than the profile's."""
        return any(self.files.values())

    def __post_init__(self) -> None:
        given = [name for name, value in self.files.items() if value]
        if given and len(given) != len(DATASET_FIELDS):
            missing = [n for n in DATASET_FIELDS if n not in given]
            raise ValueError("your own dataset needs all of --train-ann, --train-images, "
                             "--val-ann and --val-images; missing: "
                             + ", ".join("--" + n.replace("_", "-") for n in missing))  # fmt: skip
        if self.profile not in PROFILES:
            raise ValueError(f"DataConfig.profile={self.profile!r}; choose one of {PROFILES}")
        if not 0 < self.min_size <= self.max_size:
            raise ValueError(f"DataConfig: need 0 < min_size <= max_size, got "
                             f"{self.min_size}, {self.max_size}")  # fmt: skip
        sizes = self.train_min_sizes
        if sizes and not (len(sizes) == 2 and 0 < sizes[0] <= sizes[1] <= self.max_size):
            raise ValueError(f"DataConfig.train_min_sizes={sizes}: need (low, high) with "
                             f"0 < low <= high <= max_size={self.max_size}")  # fmt: skip


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


#: How one training step turns a batch into losses (ALGORITHMS.md §3-§6; :mod:`colad.distill`):
#: ``baseline`` PAA assigns for itself; ``lad`` a frozen teacher's PAA assignment trains the
#: student; ``kd`` the student learns the teacher's outputs (soft labels) and nothing else;
#: ``solad`` LAD plus soft labels; ``colad`` two networks train together on one assignment whose
#: costs a switch takes, per object and level, from one network or the other; ``ld`` a GFL
#: student learns a frozen GFL teacher's box distributions (ALGORITHMS.md §16.8).
METHODS = ("baseline", "lad", "kd", "solad", "colad", "ld")
#: The methods that learn from a frozen teacher.
TEACHER_METHODS = ("lad", "kd", "solad", "ld")
#: CoLAD's rules for which network's costs assign an (object, level): std/mean or Fisher.
SWITCH_RULES = ("std_mean", "fisher")


@dataclass(frozen=True)
class DistillConfig(_JsonConfig):
    """The settings of the distillation methods (unused by ``baseline``).

    Attributes:
        teacher: for ``lad``, ``kd``, ``solad`` and ``ld``: a named experiment (its seed-0 run in
            the same profile, trained first if the run cache lacks it), a run directory or a
            checkpoint.
        network2: for ``colad``: the second network (the experiment's ``model`` is the first,
            whose metrics are the run's).
        switch_rule: ``colad``'s switch, one of :data:`SWITCH_RULES`.
        kd_cls_weight, kd_iou_weight, kd_box_weight: weights of the soft-label losses
            (10, 10, 1.3 for ``kd``; 2, 10, 1.3 for ``solad``).
        kd_gamma: focal exponent of the focal-KL loss (0.5).
        kd_min_iou: a teacher box must overlap an object by more than this to be distilled
            (0.1 for ``kd``, 0.5 for ``solad``).
        ld_weight, ld_temperature: ``ld``'s loss weight (0.25) and temperature ``T`` (10).
        ld_reference_images: ``b_ref``, the images per GPU whose summed LD loss the weight was
            set for (2 in mmdetection's configs); a batch of ``B`` per process is rescaled by
            ``b_ref / B`` (:func:`colad.gfl.ld_loss`).
    """

    _optional_configs = {"network2": ModelConfig}

    teacher: str = ""
    network2: ModelConfig | None = None
    switch_rule: str = "std_mean"
    kd_cls_weight: float = 10.0
    kd_iou_weight: float = 10.0
    kd_box_weight: float = 1.3
    kd_gamma: float = 0.5
    kd_min_iou: float = 0.1
    ld_weight: float = 0.25
    ld_temperature: float = 10.0
    ld_reference_images: int = 2

    def __post_init__(self) -> None:
        if self.switch_rule not in SWITCH_RULES:
            raise ValueError(
                f"DistillConfig.switch_rule={self.switch_rule!r}; choose one of {SWITCH_RULES}"
            )
        if not (self.ld_temperature >= 1 and self.ld_weight >= 0 and self.ld_reference_images >= 1):
            raise ValueError(
                f"DistillConfig: need ld_temperature >= 1, ld_weight >= 0 and "
                f"ld_reference_images >= 1; got {self.ld_temperature}, {self.ld_weight}, "
                f"{self.ld_reference_images}"
            )


@dataclass(frozen=True)
class Experiment(_JsonConfig):
    """A named, complete description of one training run: data, model, schedule and method.

    ``method`` is one of :data:`METHODS`; ``distill`` holds the teacher (``lad``, ``kd``,
    ``solad``, ``ld``) or the second network (``colad``).
    """

    name: str = "paa"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    method: str = "baseline"
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"Experiment {self.name!r}: method={self.method!r}; choose one of "
                             f"{', '.join(METHODS)}")  # fmt: skip
        wants_teacher = self.method in TEACHER_METHODS
        if wants_teacher != bool(self.distill.teacher):
            need = "needs a teacher" if wants_teacher else "takes no teacher"
            raise ValueError(f"Experiment {self.name!r}: method {self.method!r} {need} "
                             f"(distill.teacher={self.distill.teacher!r})")  # fmt: skip
        if (self.method == "colad") != (self.distill.network2 is not None):
            need = "needs" if self.method == "colad" else "takes no"
            raise ValueError(f"Experiment {self.name!r}: method {self.method!r} {need} "
                             "distill.network2")  # fmt: skip
        if (self.method == "ld") != (self.model.head == "gfl") and self.method != "baseline":
            raise ValueError(
                f"Experiment {self.name!r}: method {self.method!r} with a {self.model.head!r} "
                "head; LD distils GFL's box distributions (a 'gfl' student), and LAD, soft labels "
                "and CoLAD build on PAA's assignment (not a 'gfl' network)"
            )
        network2 = self.distill.network2
        if network2 is not None and network2.head == "gfl":
            raise ValueError(f"Experiment {self.name!r}: CoLAD's network 2 cannot be GFL")


#: On the CPU (``quick``, ``smoke``) a published backbone given by ``--backbone`` is built at
#: this fraction of its width (same blocks and depths, random weights), so that one run takes
#: about as long as one with the ``tiny`` backbone (ResNet-18/RepVGG-A0 at 1/4: ~1x;
#: EfficientNet-B0/ResNet-50 at 1/8: ~1.5x; measured steps of 16 images at 128x176).
CPU_WIDTH_MULT = dict(resnet18=0.25, repvgg_a0=0.25, efficientnet_b0=0.125, resnet50=0.125,
                      resnet101=0.125)  # fmt: skip


def _with_backbone(model: ModelConfig, profile: str, backbone: str | None) -> ModelConfig:
    """``model`` with another backbone: the published network in ``full``, a narrower one
    (:data:`CPU_WIDTH_MULT`) on the generated benchmark."""
    if backbone is None:
        return model
    width_mult = 1.0 if profile == "full" else CPU_WIDTH_MULT.get(backbone, 1.0)
    return dataclasses.replace(model, backbone=backbone, width_mult=width_mult)


def _paa_baseline(profile: str, backbone: str | None = None) -> Experiment:
    """PAA assigning for itself: the paper's 1x schedule on COCO (``full``) or a short schedule
    on the generated benchmark."""
    num_classes = 80 if profile == "full" else 6
    model = _with_backbone(model_preset(profile, num_classes), profile, backbone)
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


def _schedule(profile: str) -> tuple[DataConfig, TrainConfig]:
    """Data and schedule of the distillation experiments, students and teachers alike.

    ``full`` is the paper's 1x; ``quick`` is shorter than the baseline's 900 steps, so that the
    many runs of the distillation chapters (methods x seeds) fit the book's budget; ``smoke`` is
    a few steps for tests.
    """
    if profile == "full":
        return DataConfig("full"), TrainConfig()
    if profile == "quick":
        data = DataConfig("quick", min_size=128, max_size=192, num_workers=0)
        return data, TrainConfig(epochs=2, max_steps=QUICK_DISTILL_STEPS, batch_size=16, lr=0.03,
                                 warmup_steps=40, schedule="cosine")  # fmt: skip
    data = DataConfig("smoke", min_size=96, max_size=128, num_workers=0)
    return data, TrainConfig(epochs=3, batch_size=8, lr=0.03, warmup_steps=4, schedule="cosine")


#: Steps of every quick distillation run (students, their baselines, the CoLAD pairs).
QUICK_DISTILL_STEPS = 350


def _network(profile: str, size: str, backbone: str | None = None) -> ModelConfig:
    """The two sizes of network the distillation experiments pair.

    ``full``: ResNet-50 (small) and ResNet-101 (big), the paper's pair. ``quick`` and ``smoke``:
    the baseline's own network is the big one; the small one halves every width.
    """
    num_classes = 80 if profile == "full" else 6
    model = model_preset(profile, num_classes)
    if profile == "full":
        model = dataclasses.replace(model, backbone="resnet50" if size == "small" else "resnet101")
    elif size == "small":
        widths = tuple(w // 2 for w in model.widths)
        model = dataclasses.replace(model, widths=widths, fpn_channels=model.fpn_channels // 2,
                                    norm_groups=model.norm_groups // 2)  # fmt: skip
    return _with_backbone(model, profile, backbone)


def _distill_experiment(
    label: str, profile: str, size: str, method: str = "baseline", backbone: str | None = None,
    **distill,
) -> Experiment:  # fmt: skip
    model = _network(profile, size, backbone)
    data, train = _schedule(profile)
    name = f"{label}-{model.backbone}-{profile}"
    return Experiment(name=name, data=data, model=model, train=train, method=method,
                      distill=DistillConfig(**distill))  # fmt: skip


def _paa_sized(size: str):
    def build(profile: str, backbone: str | None = None) -> Experiment:
        if profile == "full":  # the paper's PAA-R50 / PAA-R101 1x: the baseline's own runs
            return _paa_baseline(profile, backbone or _network(profile, size).backbone)
        return _distill_experiment(f"paa-{size}", profile, size, backbone=backbone)

    build.__doc__ = f"PAA alone, the {size} network of the distillation pairs."
    return build


def _big_teacher(profile: str) -> str:
    """The teacher of the small students: PAA-R101 1x on COCO (the paper's); on the generated
    benchmark, the baseline of the training chapter (the big network trained 900 steps), which
    the book has trained already."""
    return "paa-big" if profile == "full" else "paa"


def _lad(profile: str, backbone: str | None = None, teacher: str | None = None) -> Experiment:
    """LAD: the big network's PAA assignment trains the small one (ALGORITHMS.md §4)."""
    teacher = teacher or _big_teacher(profile)
    return _distill_experiment("lad", profile, "small", "lad", backbone, teacher=teacher)


def _lad_up(profile: str, backbone: str | None = None, teacher: str = "paa-small") -> Experiment:
    """LAD upwards: the small network's assignment trains the big one (the paper's Table 3)."""
    return _distill_experiment("lad-up", profile, "big", "lad", backbone, teacher=teacher)


def _kd(profile: str, backbone: str | None = None, teacher: str | None = None) -> Experiment:
    """Soft labels alone: the small network learns the big one's outputs (ALGORITHMS.md §6.3)."""
    teacher = teacher or _big_teacher(profile)
    return _distill_experiment("kd", profile, "small", "kd", backbone, teacher=teacher)


def _solad(profile: str, backbone: str | None = None, teacher: str | None = None) -> Experiment:
    """SoLAD: LAD plus soft labels, with SoLAD's weights (ALGORITHMS.md §6.4)."""
    teacher = teacher or _big_teacher(profile)
    return _distill_experiment("solad", profile, "small", "solad", backbone, teacher=teacher,
                               kd_cls_weight=2.0, kd_min_iou=0.5)  # fmt: skip


def _colad_with(rule: str, cop: bool = False):
    label = ("colad" if rule == "std_mean" else "colad-fisher") + ("-cop" if cop else "")

    def build(profile: str, backbone: str | None = None) -> Experiment:
        network2 = _network(profile, "big")
        if cop:  # the released recipe: network 2 (R101 in full) has a COP head
            network2 = dataclasses.replace(network2, head="cop")
        experiment = _distill_experiment(
            label, profile, "small", "colad", backbone, network2=network2, switch_rule=rule
        )
        if profile == "full":  # the released recipe's 2x (its multi-scale resize is not here)
            train = dataclasses.replace(experiment.train, epochs=24, lr_steps=(16, 22))
            experiment = dataclasses.replace(experiment, train=train)
        return experiment

    build.__doc__ = (
        f"CoLAD: the small and the big network{' (with a COP head)' if cop else ''} co-train on "
        f"one assignment, switched per (object, level) by the {rule} rule (ALGORITHMS.md §5)."
    )
    return build


def _auxiliary(head: str, iou_branch: str, label: str):
    def build(profile: str, backbone: str | None = None) -> Experiment:
        base = _paa_sized("small")(profile, backbone)
        model = dataclasses.replace(base.model, head=head, iou_branch=iou_branch)
        return dataclasses.replace(base, name=f"{label}-{model.backbone}-{profile}", model=model)

    build.__doc__ = (
        f"PAA with {describe_head(head, iou_branch)}, otherwise ``paa-small`` (the paper's "
        "appendix Table 1; ALGORITHMS.md §7-§9)."
    )
    return build


def describe_head(head: str, iou_branch: str) -> str:
    """A short name for a head variant, e.g. ``"COP head without the IoU branch"``."""
    if head == "gfl":
        return "GFL head"
    name = {"paa": "plain PAA head", "iop": "IOP head", "cop": "COP head"}[head]
    branch = {"infer": "with the IoU branch", "train": "with the IoU branch (not scored)",
              "none": "without the IoU branch"}[iou_branch]  # fmt: skip
    return f"{name} {branch}"


#: The rows of the paper's appendix Table 1 as experiments: ``(experiment, head, iou_branch)``.
#: Row 1 is PAA itself (``paa-small``: in ``full`` the PAA baseline run, on the CPU the small
#: network of the distillation chapters, which every row shares). ``-noiou-infer`` rows are
#: evaluated from their twin's trained weights (:func:`training_twin`).
TABLE1_ROWS = (
    ("paa-small", "paa", "infer"),
    ("paa-iop", "iop", "infer"),
    ("paa-cop", "cop", "infer"),
    ("paa-iop-noiou-infer", "iop", "train"),
    ("paa-cop-noiou-infer", "cop", "train"),
    ("paa-iop-base", "iop", "none"),
    ("paa-cop-base", "cop", "none"),
)


def training_twin(experiment: Experiment) -> Experiment | None:
    """The experiment whose training is this one's, when they differ only in whether the IoU
    branch scores detections: ``iou_branch="train"`` networks are the ``"infer"`` ones, trained
    identically and scored without the IoU branch. ``None`` for every other experiment.

    The engine trains (or finds in the run cache) the twin and evaluates its weights, so the
    "trained but not used" rows cost one evaluation and differ from their twin in scoring only.
    """
    if experiment.model.iou_branch != "train" or experiment.method != "baseline":
        return None
    model = dataclasses.replace(experiment.model, iou_branch="infer")
    name = experiment.name.replace("-noiou-infer", "", 1)
    return dataclasses.replace(experiment, name=name, model=model)


def _gfl_like(build, label: str, describe: str, *, full_2x: bool = False):
    """The GFL counterpart of a PAA-side experiment: the same data, networks, schedule, seeds
    and (for ``ld``) pairing, with :func:`gfl_model`'s head. ``full_2x``: in ``full``, the ms-2x
    recipe of the LD teachers (24 epochs, steps 16/22, short side 480-800; §16.8.5)."""

    def gfl_build(profile: str, backbone: str | None = None, **options) -> Experiment:
        base = build(profile, backbone, **options)
        model = gfl_model(base.model)
        experiment = dataclasses.replace(
            base, name=f"{label}-{model.backbone}-{profile}", model=model,
            method="ld" if base.method == "lad" else base.method,
        )  # fmt: skip
        if profile == "full" and full_2x:
            data = dataclasses.replace(experiment.data, train_min_sizes=(480, 800))
            train = dataclasses.replace(experiment.train, epochs=24, lr_steps=(16, 22))
            experiment = dataclasses.replace(experiment, data=data, train=train)
        return experiment

    gfl_build.__doc__ = describe
    return gfl_build


def _ld(profile: str, backbone: str | None = None, teacher: str | None = None) -> Experiment:
    """LD: a frozen GFL teacher's box distributions teach a GFL student (ALGORITHMS.md §16.8).

    The pairs are LAD's: on the CPU the big GFL network (``gfl``, trained as long as ``paa``)
    teaches the small one; in ``full`` GFL-R101 ms-2x (``gfl-big``, mmdetection's LD teacher)
    teaches R50, or R18 with ``--backbone resnet18``; ``--teacher gfl`` gives the R50 teacher.
    """
    teacher = teacher or ("gfl-big" if profile == "full" else "gfl")
    return _gfl_like(_lad, "ld", "")(profile, backbone, teacher=teacher)


def _ld_up(profile: str, backbone: str | None = None, teacher: str = "gfl-small") -> Experiment:
    """LD upwards: the small GFL network's distributions teach the big one (LAD-up's pair)."""
    return _gfl_like(_lad_up, "ld-up", "")(profile, backbone, teacher=teacher)


#: Named experiments: ``experiment(name, profile)`` builds them.
EXPERIMENTS = {
    "paa": _paa_baseline,
    "paa-small": _paa_sized("small"),
    "paa-big": _paa_sized("big"),
    "lad": _lad,
    "lad-up": _lad_up,
    "kd": _kd,
    "solad": _solad,
    "colad": _colad_with("std_mean"),
    "colad-fisher": _colad_with("fisher"),
    "colad-cop": _colad_with("std_mean", cop=True),
    **{name: _auxiliary(head, iou, name) for name, head, iou in TABLE1_ROWS[1:]},
    "gfl": _gfl_like(
        _paa_baseline,
        "gfl",
        "GFL alone, trained as ``paa`` (GFL-R50 1x in ``full``, 40.2 AP in mmdetection).",
    ),
    "gfl-small": _gfl_like(
        _paa_sized("small"),
        "gfl-small",
        "GFL alone, the small network of "
        "the distillation pairs (``paa-small``'s network and schedule).",
    ),
    "gfl-big": _gfl_like(
        _paa_sized("big"),
        "gfl-big",
        "GFL alone, the big network (``paa-big``"
        "'s); in ``full`` GFL-R101 ms-2x, mmdetection's LD teacher (44.7 AP).",
        full_2x=True,
    ),
    "ld": _ld,
    "ld-up": _ld_up,
}


def on_dataset(
    experiment: Experiment, *, train_ann: str, train_images: str, val_ann: str, val_images: str
) -> Experiment:
    """``experiment`` on your own COCO-format dataset: its annotation files and image folders,
    and the number of classes of its training file (every network the run trains).

    Raises:
        colad.data.DatasetError: a file is malformed (as ``data check`` says) or the two files
            have different categories.
    """
    from .data import DatasetError, read_coco_json

    files = {"train_ann": train_ann, "train_images": train_images,
             "val_ann": val_ann, "val_images": val_images}  # fmt: skip
    files = {k: str(Path(v).expanduser().resolve()) for k, v in files.items()}
    categories = {}
    for split in ("train", "val"):
        path = Path(files[f"{split}_ann"])
        if not path.is_file():
            raise DatasetError(f"--{split}-ann {path}: no such annotation file")
        categories[split] = [c["id"] for c in read_coco_json(path)["categories"]]
    if categories["train"] != categories["val"]:
        raise DatasetError(
            f"{files['train_ann']} and {files['val_ann']} have different categories (ids "
            f"{categories['train'][:10]} vs {categories['val'][:10]}); a model's classes are "
            "its training file's, so the validation file needs the same ones, in the same order"
        )
    num_classes = len(categories["train"])
    data = dataclasses.replace(experiment.data, **files)
    experiment = dataclasses.replace(experiment, data=data)
    return _each_network(experiment, lambda m: dataclasses.replace(m, num_classes=num_classes))


def _each_network(experiment: Experiment, change) -> Experiment:
    """``experiment`` with ``change(model_config)`` applied to every network it trains (the
    model, and CoLAD's second network); a teacher is its own run and keeps its settings."""
    distill = experiment.distill
    if distill.network2 is not None:
        distill = dataclasses.replace(distill, network2=change(distill.network2))
    return dataclasses.replace(experiment, model=change(experiment.model), distill=distill)


def experiment(
    name: str,
    profile: str | None = None,
    *,
    weights: str | None = None,
    dataset: dict[str, str] | None = None,
    **options,
) -> Experiment:
    """Build the named experiment for a profile (default: ``$COLAD_PROFILE``).

    ``weights`` replaces the initial backbone weights of every network the experiment trains
    (both of CoLAD's; a teacher keeps its own run's): ``"none"``, ``"imagenet"`` or a file.
    Pretrained weights exist only for the published networks, so a backbone that the profile
    narrows (``width_mult < 1``) gets its full width with them. ``dataset`` (the keys of
    :data:`DATASET_FIELDS`) trains and evaluates on your own COCO-format data
    (:func:`on_dataset`). Other ``options`` (``backbone``, ``teacher``) go to the experiment's
    builder.

    Example:
        >>> experiment("paa", "smoke").model.backbone
        'tiny'
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    profile = profile or profile_from_env()
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    built = EXPERIMENTS[name](profile, **options)
    if dataset:
        built = on_dataset(built, **dataset)
    if weights is None:
        return built

    def initialised(model: ModelConfig) -> ModelConfig:
        width_mult = model.width_mult if weights == "none" else 1.0
        return dataclasses.replace(model, weights=weights, width_mult=width_mult)

    return _each_network(built, initialised)
