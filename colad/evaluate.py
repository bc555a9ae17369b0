"""COCO evaluation: a quiet pycocotools wrapper, COCO results json, and hand-made detections.

This is the only module that speaks COCO's xywh: the model and the dataset use torchvision's xyxy
boxes in pixels of the transformed image; :func:`detections_to_coco` maps them back to the
original image and to the file's category ids.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .data import DatasetError, _is_number, read_coco_json

__all__ = [
    "METRIC_KEYS",
    "load_ground_truth",
    "load_detections",
    "coco_evaluate",
    "detections_to_coco",
    "write_detections",
    "handmade_detections",
    "HANDMADE_KINDS",
]

#: The keys of :func:`coco_evaluate`, in pycocotools' ``stats`` order.
METRIC_KEYS = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def _quiet_coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_ground_truth(gt: str | Path | COCO) -> COCO:
    """Return ``gt`` as a pycocotools ``COCO``, reading and checking a path first.

    Annotations without ``area`` get the box area, without ``iscrowd`` get 0 (pycocotools needs
    both). A ``COCO`` object is returned as is.

    Raises:
        DatasetError: the file is malformed (see :func:`colad.data.read_coco_json`).
    """
    if isinstance(gt, COCO):
        return gt
    data = read_coco_json(gt)
    annotations = []
    for ann in data["annotations"]:
        ann = dict(ann)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann.setdefault("iscrowd", 0)
        annotations.append(ann)
    return _quiet_coco({**data, "annotations": annotations})


def load_detections(detections: str | Path | Sequence[dict], gt: COCO) -> list[dict]:
    """Read and check COCO result dicts (``image_id``, ``category_id``, ``bbox`` xywh,
    ``score``) against ``gt``; return copies ready for pycocotools.

    Raises:
        DatasetError: a malformed file or record, or an image or category id not in ``gt``.
    """
    source = "detections"
    if isinstance(detections, str | os.PathLike):
        source = str(detections)
        try:
            detections = json.loads(Path(detections).read_text())
        except OSError as e:
            raise DatasetError(f"{source}: cannot read detections ({e.strerror or e})") from None
        except json.JSONDecodeError as e:
            raise DatasetError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(detections, list | tuple):
        raise DatasetError(f"{source}: expected a list of result dicts")
    image_ids, category_ids = set(gt.getImgIds()), set(gt.getCatIds())
    checked = []
    for i, det in enumerate(detections):
        where = f"{source}: result [{i}]"
        if not isinstance(det, dict):
            raise DatasetError(f"{where}: expected a dict")
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in det:
                raise DatasetError(f"{where}: missing field {key!r}")
        box = det["bbox"]
        if not (isinstance(box, list | tuple) and len(box) == 4 and all(map(_is_number, box))):
            raise DatasetError(f"{where}: field 'bbox' must be 4 finite numbers, got {box!r}")
        if not _is_number(det["score"]):
            raise DatasetError(f"{where}: field 'score' must be a finite number")
        if det["image_id"] not in image_ids:
            raise DatasetError(f"{where}: image_id {det['image_id']!r} is not in the ground truth")
        if det["category_id"] not in category_ids:
            raise DatasetError(
                f"{where}: category_id {det['category_id']!r} is not in the ground truth"
            )
        x, y, w, h = (float(v) for v in box)
        checked.append(
            {
                "id": i + 1,
                "image_id": det["image_id"],
                "category_id": det["category_id"],
                "bbox": [x, y, w, h],
                "score": float(det["score"]),
                "area": w * h,
                "iscrowd": 0,
            }
        )
    return checked


def coco_evaluate(
    gt: str | Path | COCO, detections: str | Path | Sequence[dict]
) -> dict[str, float]:
    """Evaluate box detections with pycocotools, without its printing.

    Args:
        gt: the ground truth, a COCO json path or a ``pycocotools.coco.COCO``.
        detections: a COCO results json path or a list of result dicts (``image_id``,
            ``category_id``, ``bbox`` as xywh in original image pixels, ``score``). An
            empty list is valid and scores zero.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
        "ARm", "ARl"}`` on pycocotools' 0-1 scale. A metric with no ground truth to
        measure (e.g. ``APl`` when no object is large) is NaN, where pycocotools
        prints -1.

    Raises:
        DatasetError: malformed ground truth or detections (see
            :func:`load_detections`).
    """
    gt = load_ground_truth(gt)
    results = load_detections(detections, gt)
    dt = _quiet_coco(
        {
            "images": gt.dataset["images"],
            "categories": gt.dataset["categories"],
            "annotations": results,
        }
    )
    evaluator = COCOeval(gt, dt, iouType="bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {
        k: (float(v) if v >= 0 else math.nan)
        for k, v in zip(METRIC_KEYS, evaluator.stats, strict=True)
    }


def detections_to_coco(
    detections: Sequence[dict[str, torch.Tensor]],
    targets: Sequence[dict[str, torch.Tensor]],
    category_ids: Sequence[int],
) -> list[dict]:
    """Convert per-image detections to COCO result dicts in original image coordinates.

    Args:
        detections: per image, ``boxes`` ``float[N, 4]`` xyxy in the transformed image,
            ``scores`` ``float[N]`` and ``labels`` ``int64[N]`` contiguous labels.
        targets: the matching targets, with ``image_id``, ``orig_size`` and ``image_size``
            (as :class:`colad.data.CocoDetection` returns them).
        category_ids: the file's category id of each label (``CocoIndex.category_ids``).

    Returns:
        A list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.
    """
    results = []
    for det, target in zip(detections, targets, strict=True):
        if len(det["boxes"]) == 0:
            continue
        h_orig, w_orig = target["orig_size"].tolist()
        h_now, w_now = target["image_size"].tolist()
        scale = torch.tensor([w_orig / w_now, h_orig / h_now] * 2)
        boxes = det["boxes"].detach().float().cpu() * scale
        boxes[:, 2:] -= boxes[:, :2]
        image_id = int(target["image_id"])
        for box, score, label in zip(
            boxes.tolist(), det["scores"].tolist(), det["labels"].tolist(), strict=True
        ):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(category_ids[label]),
                    "bbox": [round(v, 2) for v in box],
                    "score": round(score, 5),
                }
            )
    return results


def write_detections(results: Sequence[dict], path: str | Path) -> Path:
    """Write COCO result dicts to ``path`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(list(results), f)
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)
    return path


#: The kinds of :func:`handmade_detections`, each a different way to be wrong.
HANDMADE_KINDS = ("perfect", "jittered", "missing", "duplicated", "wrong_class", "background")


def handmade_detections(
    gt: str | Path | COCO, kind: str, *, seed: int = 0, fraction: float = 0.3
) -> list[dict]:
    """Make detections from the ground truth that are wrong in one controlled way.

    * ``perfect``: every ground-truth box, score 1.
    * ``jittered``: ``fraction`` of the boxes are moved and resized by about a third of their
      size (localisation errors); the rest are exact.
    * ``missing``: ``fraction`` of the objects are left out (missed ground truth).
    * ``duplicated``: every box, plus a slightly shifted, lower-scored copy of ``fraction`` of
      them (duplicate detections).
    * ``wrong_class``: ``fraction`` of the boxes carry another category (classification errors).
    * ``background``: every box, plus for ``fraction`` of the images as many boxes away from
      every object, at a lower score (background errors).

    Scores are random in ``[0.5, 1]`` except where said, so that ranking matters. Crowd
    annotations are not detected. The result is deterministic for a given ``seed``.
    """
    if kind not in HANDMADE_KINDS:
        raise ValueError(f"kind={kind!r}; choose one of {', '.join(HANDMADE_KINDS)}")
    gt = load_ground_truth(gt)
    rng = np.random.default_rng(seed)
    category_ids = sorted(gt.getCatIds())
    anns = [a for a in gt.dataset["annotations"] if not a.get("iscrowd", 0)]
    out = []
    for ann in anns:
        x, y, w, h = (float(v) for v in ann["bbox"])
        det = {
            "image_id": ann["image_id"],
            "category_id": ann["category_id"],
            "bbox": [x, y, w, h],
            "score": 1.0 if kind == "perfect" else rng.uniform(0.5, 1),
        }
        chosen = rng.uniform() < fraction
        if kind == "missing" and chosen:
            continue
        if kind == "jittered" and chosen:
            dx, dy = rng.uniform(-0.35, 0.35, size=2) * (w, h)
            sw, sh = np.exp(rng.uniform(-0.35, 0.35, size=2))
            det["bbox"] = [x + dx, y + dy, w * sw, h * sh]
        if kind == "wrong_class" and chosen and len(category_ids) > 1:
            others = [c for c in category_ids if c != ann["category_id"]]
            det["category_id"] = int(rng.choice(others))
        out.append(det)
        if kind == "duplicated" and chosen:
            dup = copy.deepcopy(det)
            dup["bbox"][0] += 0.05 * w
            dup["score"] = det["score"] * 0.9
            out.append(dup)
    if kind == "background":
        out += _background_boxes(gt, anns, category_ids, rng, fraction)
    return out


def _background_boxes(
    gt: COCO, anns: list[dict], category_ids: list[int], rng, fraction: float
) -> list[dict]:
    """Boxes that overlap no object (IoU < 0.1 with every box), one per object, in ``fraction``
    of the images."""
    from torchvision.ops import box_iou

    by_image: dict[int, list[list[float]]] = {}
    for ann in anns:
        x, y, w, h = ann["bbox"]
        by_image.setdefault(ann["image_id"], []).append([x, y, x + w, y + h])
    out = []
    for image in gt.dataset["images"]:
        boxes = by_image.get(image["id"], [])
        if not boxes or rng.uniform() >= fraction:
            continue
        objects = torch.tensor(boxes, dtype=torch.float32)
        for x1, y1, x2, y2 in boxes:
            for _ in range(20):  # try a few places; give up on crowded images
                w, h = x2 - x1, y2 - y1
                nx = rng.uniform(0, max(image["width"] - w, 1))
                ny = rng.uniform(0, max(image["height"] - h, 1))
                candidate = torch.tensor([[nx, ny, nx + w, ny + h]], dtype=torch.float32)
                if box_iou(candidate, objects).max() < 0.1:
                    out.append(
                        {
                            "image_id": image["id"],
                            "category_id": int(rng.choice(category_ids)),
                            "bbox": [nx, ny, w, h],
                            "score": rng.uniform(0.3, 0.6),
                        }
                    )
                    break
    return out
