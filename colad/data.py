"""COCO-format detection data: validated loading, the dataset, transforms and batching.

Any COCO-format detection json works: the generated benchmark (:mod:`colad.synth`) or COCO 2017.
Input is checked once, when the dataset is built, with the policy of DESIGN.md:

* a structural problem (not json, missing keys or fields, an unknown image or category id, a
  non-numeric box, a missing or unreadable image) raises :class:`DatasetError` naming the file,
  the record and the field;
* a recoverable one (a box of zero or negative size, a box partly or wholly outside its image) is
  repaired -- clipped to the image, or skipped when nothing is left -- and reported once per file as
  a :class:`DatasetWarning` with counts and the first record affected.

Crowd annotations (``iscrowd=1``) are dropped from training targets, as the reference does.
Targets follow torchvision: ``boxes`` ``float32[N, 4]`` xyxy in pixels of the (transformed)
image, ``labels`` ``int64[N]`` contiguous in ``[0, C)``, ``image_id``, ``orig_size`` ``(h, w)``
of the file, and ``image_size`` ``(h, w)`` after the transforms.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.models.detection.image_list import ImageList
from torchvision.transforms import v2

__all__ = [
    "DatasetError",
    "DatasetWarning",
    "read_coco_json",
    "CocoIndex",
    "index_coco",
    "CocoDetection",
    "train_transforms",
    "eval_transforms",
    "batch_images",
    "collate",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "SplitPaths",
    "split_paths",
    "dataset_paths",
]

#: RGB normalisation of ALGORITHMS.md §1.4, on the 0-1 scale.
IMAGE_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
IMAGE_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)


class DatasetError(ValueError):
    """A dataset file cannot be used; the message names the file, the record and the field."""


class DatasetWarning(UserWarning):
    """Records of a dataset file were repaired or skipped; the message gives counts."""


# ----------------------------------------------------------------------------------------------
# Reading and checking a COCO json


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _describe(kind: str, index: int, record) -> str:
    if isinstance(record, dict) and "id" in record:
        return f"{kind}[{index}] (id {record['id']!r})"
    return f"{kind}[{index}]"


def read_coco_json(path: str | Path) -> dict:
    """Read a COCO detection json and check its structure.

    Checks the top-level keys, that every category, image and annotation record has the fields
    detection needs with the right types, that ids are unique and that annotations refer to
    known images and categories. Box *values* (size, bounds) are checked by :func:`index_coco`.

    Args:
        path: the annotation file.

    Returns:
        The parsed json, unchanged.

    Raises:
        DatasetError: the file is missing, not json, or a record is malformed; the message names
            the file, the record and the field.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read annotation file ({e.strerror or e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top, got {type(data).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise DatasetError(f"{path}: missing top-level key(s) {', '.join(map(repr, missing))}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: top-level {key!r} must be a list")

    def fail(kind, index, record, message):
        raise DatasetError(f"{path}: {_describe(kind, index, record)}: {message}")

    def need(kind, index, record, name, check, what):
        if not isinstance(record, dict):
            fail(kind, index, record, "expected an object")
        if name not in record:
            fail(kind, index, record, f"missing field {name!r}")
        if not check(record[name]):
            fail(kind, index, record, f"field {name!r} must be {what}, got {record[name]!r}")

    def is_id(v):
        return isinstance(v, int) and not isinstance(v, bool)

    category_ids = set()
    for i, cat in enumerate(data["categories"]):
        need("categories", i, cat, "id", is_id, "an integer")
        if cat["id"] in category_ids:
            fail("categories", i, cat, "duplicate category id")
        category_ids.add(cat["id"])
    image_ids = set()
    for i, image in enumerate(data["images"]):
        need("images", i, image, "id", is_id, "an integer")
        need("images", i, image, "file_name", lambda v: isinstance(v, str) and v, "a file name")
        for name in ("width", "height"):
            need("images", i, image, name, lambda v: _is_number(v) and v > 0, "a positive number")
        if image["id"] in image_ids:
            fail("images", i, image, "duplicate image id")
        image_ids.add(image["id"])
    for i, ann in enumerate(data["annotations"]):
        need("annotations", i, ann, "id", is_id, "an integer")
        need("annotations", i, ann, "image_id", is_id, "an integer")
        need("annotations", i, ann, "category_id", is_id, "an integer")
        need(
            "annotations",
            i,
            ann,
            "bbox",
            lambda v: isinstance(v, list) and len(v) == 4 and all(map(_is_number, v)),
            "a list of 4 finite numbers [x, y, width, height]",
        )
        if ann["image_id"] not in image_ids:
            fail("annotations", i, ann, f"field 'image_id': unknown image id {ann['image_id']}")
        if ann["category_id"] not in category_ids:
            fail(
                "annotations",
                i,
                ann,
                f"field 'category_id': unknown category id {ann['category_id']}",
            )
    return data


@dataclass
class CocoIndex:
    """A checked COCO file, indexed per image, with boxes repaired for training.

    Attributes:
        path: the annotation file.
        images: image records in file order (``id``, ``file_name``, ``width``, ``height``).
        boxes: per image, ``float32[N, 4]`` xyxy boxes (clipped, degenerate ones removed).
        labels: per image, ``int64[N]`` contiguous labels in ``[0, C)``.
        category_ids: the file's category ids in label order (``category_ids[label]``).
        names: category names in label order.
        repairs: counts of repaired and skipped records by reason.
    """

    path: Path
    images: list[dict]
    boxes: list[Tensor]
    labels: list[Tensor]
    category_ids: list[int]
    names: list[str]
    repairs: dict[str, int] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)


def index_coco(data: dict, path: str | Path) -> CocoIndex:
    """Index a checked COCO dict per image, clipping boxes to their image.

    Boxes of zero or negative size are skipped; boxes partly outside the image are clipped; boxes
    left with less than a pixel of width or height after clipping are skipped. Each kind of
    repair is reported by one :class:`DatasetWarning` naming the file, the count and the first
    annotation affected. Crowd annotations are dropped silently (counted in ``repairs``).
    """
    path = Path(path)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    category_ids = [c["id"] for c in categories]
    label_of = {cid: label for label, cid in enumerate(category_ids)}
    names = [str(c.get("name", c["id"])) for c in categories]
    row_of = {image["id"]: row for row, image in enumerate(data["images"])}
    per_image: list[list[tuple[list[float], int]]] = [[] for _ in data["images"]]
    repairs = {"degenerate": 0, "clipped": 0, "outside": 0, "crowd": 0}
    first: dict[str, int] = {}

    def note(kind, ann):
        repairs[kind] += 1
        first.setdefault(kind, ann["id"])

    for ann in data["annotations"]:
        if ann.get("iscrowd", 0):
            repairs["crowd"] += 1
            continue
        image = data["images"][row_of[ann["image_id"]]]
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w <= 0 or h <= 0:
            note("degenerate", ann)
            continue
        x1, y1 = min(max(x, 0.0), image["width"]), min(max(y, 0.0), image["height"])
        x2, y2 = min(max(x + w, 0.0), image["width"]), min(max(y + h, 0.0), image["height"])
        if x2 - x1 < 1 or y2 - y1 < 1:
            note("outside", ann)
            continue
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            note("clipped", ann)
        per_image[row_of[ann["image_id"]]].append(([x1, y1, x2, y2], label_of[ann["category_id"]]))

    messages = {
        "degenerate": "boxes of zero or negative size skipped",
        "clipped": "boxes partly outside their image clipped to it",
        "outside": "boxes outside their image (nothing left after clipping) skipped",
    }
    for kind, message in messages.items():
        if repairs[kind]:
            warnings.warn(
                f"{path}: {repairs[kind]} {message} (first: annotation id {first[kind]})",
                DatasetWarning,
                stacklevel=3,
            )
    boxes = [
        torch.tensor([b for b, _ in objs], dtype=torch.float32).reshape(-1, 4) for objs in per_image
    ]
    labels = [torch.tensor([lab for _, lab in objs], dtype=torch.int64) for objs in per_image]
    return CocoIndex(path, list(data["images"]), boxes, labels, category_ids, names, repairs)


# ----------------------------------------------------------------------------------------------
# Where a profile's data lives


@dataclass(frozen=True)
class SplitPaths:
    """One split of a dataset: its annotation file, its image folder, and what it is."""

    ann_file: Path
    image_dir: Path
    source: str


def split_paths(profile: str, split: str = "val") -> SplitPaths:
    """Return the data of ``profile``'s ``split``, generating the benchmark when needed.

    ``smoke`` and ``quick`` use their generated benchmark. ``full`` uses COCO 2017 under
    :func:`colad.config.coco_root`.

    Raises:
        DatasetError: ``full`` and COCO 2017 is not where it is expected (the message says
            where, and how to point elsewhere or use your own data).
    """
    from . import config, synth

    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}; choose 'train' or 'val'")
    if profile == "full":
        coco = config.coco_root()
        ann_file = coco / "annotations" / f"instances_{split}2017.json"
        if not ann_file.is_file():
            raise DatasetError(
                f"the full profile trains and evaluates on COCO 2017, expected at {coco} "
                f"(no {ann_file}). Place it there as cocodataset.org ships it "
                "(annotations/instances_{train,val}2017.json, train2017/, val2017/), or set "
                "COLAD_DATA to the folder that holds coco/, or train on your own COCO-format "
                "data with --train-ann, --train-images, --val-ann and --val-images."
            )
        return SplitPaths(ann_file, coco / f"{split}2017", f"COCO 2017 {split}")
    bench = synth.generate(synth.preset(profile))
    source = f"generated benchmark ({profile}) {split}"
    return SplitPaths(bench.ann_file(split), bench.image_dir(split), source)


def dataset_paths(cfg, split: str = "val") -> SplitPaths:
    """The ``split`` of a :class:`colad.config.DataConfig`: your own files when it names them,
    else its profile's data (:func:`split_paths`)."""
    if not cfg.custom:
        return split_paths(cfg.profile, split)
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}; choose 'train' or 'val'")
    ann, images = Path(getattr(cfg, f"{split}_ann")), Path(getattr(cfg, f"{split}_images"))
    for path, what, option in ((ann, "annotation file", "ann"), (images, "image folder", "images")):
        if not (path.is_file() if option == "ann" else path.is_dir()):
            raise DatasetError(f"--{split}-{option} {path}: no such {what}")
    return SplitPaths(ann, images, f"{ann.name} ({split})")


# ----------------------------------------------------------------------------------------------
# Dataset


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset returning ``(image, target)`` pairs.

    Args:
        ann_file: the COCO annotation json.
        image_dir: the folder that ``file_name`` of each image record is relative to.
        transforms: a torchvision ``v2`` transform called as ``transforms(image, target)``
            (e.g. :func:`train_transforms`); ``None`` returns the ``uint8`` image.
        drop_empty: leave out images without (usable) boxes, as training does in the reference.

    Raises:
        DatasetError: the annotation file is malformed, an image file is missing, or no image is
            left; reading an unreadable image raises it too, naming the image and record.

    Example:
        >>> ds = CocoDetection(bench.ann_file("val"), bench.image_dir("val"))  # doctest: +SKIP
        >>> image, target = ds[0]  # doctest: +SKIP
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_dir: str | Path,
        transforms: Callable | None = None,
        *,
        drop_empty: bool = False,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        self.transforms = transforms
        self.index = index_coco(read_coco_json(self.ann_file), self.ann_file)
        for i, image in enumerate(self.index.images):
            if not (self.image_dir / image["file_name"]).is_file():
                raise DatasetError(
                    f"{self.ann_file}: {_describe('images', i, image)}: field 'file_name': "
                    f"no file {self.image_dir / image['file_name']}"
                )
        rows = range(len(self.index.images))
        self.rows = [r for r in rows if len(self.index.boxes[r])] if drop_empty else list(rows)
        if not self.rows:
            what = "no image with annotations" if drop_empty else "no images"
            raise DatasetError(f"{self.ann_file}: {what}; nothing to load")

    @property
    def num_classes(self) -> int:
        return self.index.num_classes

    @property
    def names(self) -> list[str]:
        return self.index.names

    def __len__(self) -> int:
        return len(self.rows)

    def image_record(self, i: int) -> dict:
        """The image record (``id``, ``file_name``, ``width``, ``height``) of item ``i``."""
        return self.index.images[self.rows[i]]

    def read_image(self, i: int) -> Tensor:
        """Return item ``i``'s image as ``uint8[3, H, W]`` RGB, checking its size."""
        row = self.rows[i]
        record = self.index.images[row]
        file = self.image_dir / record["file_name"]
        where = f"{self.ann_file}: {_describe('images', row, record)}"
        try:
            with Image.open(file) as im:
                pixels = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError on broken PNGs
            raise DatasetError(f"{where}: cannot read image {file}: {e}") from None
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
        height, width = image.shape[-2:]
        if (width, height) != (record["width"], record["height"]):
            raise DatasetError(
                f"{where}: image {file} is {width}x{height} but the record says "
                f"{record['width']}x{record['height']}"
            )
        return image

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        row = self.rows[i]
        record = self.index.images[row]
        image = tv_tensors.Image(self.read_image(i))
        size = (int(record["height"]), int(record["width"]))
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                self.index.boxes[row].clone(), format="XYXY", canvas_size=size
            ),
            "labels": self.index.labels[row].clone(),
            "image_id": torch.tensor(record["id"], dtype=torch.int64),
            "orig_size": torch.tensor(size, dtype=torch.int64),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        image = image.as_subclass(Tensor)
        target["boxes"] = target["boxes"].as_subclass(Tensor)
        target["image_size"] = torch.tensor(image.shape[-2:], dtype=torch.int64)
        return image, target


# ----------------------------------------------------------------------------------------------
# Transforms and batching


def _resize(min_size: int, max_size: int) -> v2.Resize:
    """Keep the aspect ratio; scale so that the short side is ``min_size`` unless the long side
    would then exceed ``max_size`` (mmdet's ``keep_ratio`` rescale)."""
    if max_size < min_size:
        raise ValueError(f"max_size={max_size} is smaller than min_size={min_size}")
    if max_size == min_size:  # then the long side decides
        return v2.Resize(size=None, max_size=max_size, antialias=True)
    return v2.Resize(min_size, max_size=max_size, antialias=True)


def _normalised(
    min_size: int, max_size: int, *flips: v2.Transform, resize: v2.Transform | None = None
) -> v2.Compose:
    """Keep-ratio resize (``resize``, default to ``min_size``), the given flips, float conversion
    and normalisation."""
    return v2.Compose(
        [
            resize or _resize(min_size, max_size),
            *flips,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGE_MEAN, IMAGE_STD),
        ]
    )


def train_transforms(
    min_size: int = 800,
    max_size: int = 1333,
    *,
    hflip: float = 0.5,
    min_sizes: tuple[int, ...] = (),
) -> v2.Compose:
    """Training transforms: keep-ratio resize, horizontal flip, float conversion, normalisation.

    Defaults are the COCO settings of ALGORITHMS.md §1.4; profiles pass smaller sizes.
    ``min_sizes = (low, high)`` draws each image's short side uniformly from ``low..high``
    (multi-scale training; the long side still at most ``max_size``).
    """
    resize = None
    if min_sizes:
        low, high = min_sizes
        resize = v2.RandomShortestSize(list(range(low, high + 1)), max_size, antialias=True)
    return _normalised(min_size, max_size, v2.RandomHorizontalFlip(hflip), resize=resize)


def eval_transforms(min_size: int = 800, max_size: int = 1333) -> v2.Compose:
    """Evaluation transforms: the training ones without the flip."""
    return _normalised(min_size, max_size)


def batch_images(images: Sequence[Tensor], size_divisible: int = 32) -> ImageList:
    """Pad images ``Tensor[3, h, w]`` into one ``ImageList`` whose sides are multiples of
    ``size_divisible`` (zeros at the bottom and right; ``image_sizes`` keeps each ``(h, w)``)."""
    if not images:
        raise ValueError("batch_images: no images")
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    height = math.ceil(max(h for h, _ in sizes) / size_divisible) * size_divisible
    width = math.ceil(max(w for _, w in sizes) / size_divisible) * size_divisible
    padded = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    for k, (image, (h, w)) in enumerate(zip(images, sizes, strict=True)):
        padded[k, :, :h, :w].copy_(image)
    return ImageList(padded, sizes)


def collate(batch: Sequence[tuple[Tensor, dict]], size_divisible: int = 32):
    """Pad a list of ``(image, target)`` to one tensor whose sides are multiples of
    ``size_divisible``.

    Returns:
        ``(images, targets)``: a torchvision ``ImageList`` (``tensors`` ``float[B, 3, H, W]``,
        zero-padded at the bottom and right; ``image_sizes`` the valid ``(h, w)`` of each
        image) and the list of targets.
    """
    if not batch:
        raise ValueError("collate: empty batch")
    images = batch_images([image for image, _ in batch], size_divisible)
    return images, [target for _, target in batch]
