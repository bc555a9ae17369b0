"""A deterministic, generated detection benchmark in COCO format.

The benchmark is built to make label assignment matter, not to be easy:

* six classes told apart by shape *and* by colour/texture: ``disc`` and ``ring`` share a red hue
  and differ only inside the outline; ``square`` and ``checker`` share a blue hue and differ only
  by texture; ``triangle`` is green; ``bar`` is an elongated, striped, orange rectangle;
* object sizes drawn log-uniformly over a wide range, so every pyramid level gets work;
* overlap and occlusion (an object may hide up to half of another), truncation at the borders;
* unannotated distractors (plus signs and stars in any colour, including the class hues), clutter
  lines and a textured background, so that background errors are possible.

Every image is drawn from its own random stream, seeded by ``(seed, split, index)``, so the output
is byte-identical for the same parameters, whatever the number of worker processes. The
annotations are modal (the visible extent): ``bbox`` is the tight box of the visible pixels,
``area`` their count and ``segmentation`` their run-length-encoded mask.

The output is cached under ``<data root>/synth/<name>-<hash>/``, the hash covering the parameters
and this module's source, and is written to a temporary folder that is renamed into place only
when complete: a half-written benchmark is never used.
"""

from __future__ import annotations

import colorsys
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from . import config

__all__ = ["CLASSES", "SynthConfig", "Benchmark", "preset", "generate", "render_image"]

#: Class names in category-id order (category ids are 1-based, as in COCO).
CLASSES = ("disc", "ring", "square", "checker", "triangle", "bar")

# class name -> (hue in [0, 1), outline, texture)
_CLASS_STYLE = {
    "disc": (0.00, "ellipse", "solid"),
    "ring": (0.00, "ring", "solid"),
    "square": (0.60, "rect", "solid"),
    "checker": (0.60, "rect", "checker"),
    "triangle": (0.33, "triangle", "solid"),
    "bar": (0.08, "rect", "stripes"),
}
_DISTRACTOR_OUTLINES = ("plus", "star")
_SPLITS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the generated benchmark; the cache folder is keyed by a hash of
    them.

    Ranges are ``(low, high)``, inclusive for counts. Object size is the square root of
    the object's box area before occlusion, in pixels, drawn log-uniformly.
    """

    name: str = "shapes"
    seed: int = 0
    num_train: int = 4000
    num_val: int = 500
    image_size: tuple[int, int] = (128, 192)  # each side drawn uniformly in this range
    objects_per_image: tuple[int, int] = (1, 8)
    object_size: tuple[float, float] = (8.0, 96.0)
    # width / height of every class but ``bar``
    aspect_ratio: tuple[float, float] = (0.7, 1.4)
    # long side / short side of a ``bar``
    bar_aspect_ratio: tuple[float, float] = (3.0, 6.0)
    # fraction of its in-image pixels an annotated object keeps visible
    min_visible: float = 0.5
    # fraction of an object's box that may fall outside the image
    max_truncation: float = 0.25
    hue_jitter: float = 0.05  # uniform jitter around each class hue
    distractors_per_image: tuple[int, int] = (0, 4)
    clutter_lines: tuple[int, int] = (2, 10)
    noise_std: float = 4.0  # Gaussian pixel noise, in 0-255 units

    def __post_init__(self) -> None:
        for field in (
            "image_size",
            "objects_per_image",
            "object_size",
            "aspect_ratio",
            "bar_aspect_ratio",
            "distractors_per_image",
            "clutter_lines",
        ):
            low, high = getattr(self, field)
            if low > high or low < 0:
                raise ValueError(
                    f"SynthConfig.{field}={(low, high)}: need 0 <= low <= high",
                )
        if self.num_train < 0 or self.num_val < 0:
            raise ValueError("SynthConfig: num_train and num_val must be >= 0")
        if self.image_size[0] < 16:
            raise ValueError(
                f"SynthConfig.image_size={self.image_size}: sides below 16 px",
            )
        if not 0.0 < self.min_visible <= 1.0:
            raise ValueError(
                f"SynthConfig.min_visible={self.min_visible}: need 0 < x <= 1",
            )
        if not 0.0 <= self.max_truncation < 1.0:
            raise ValueError(
                f"SynthConfig.max_truncation={self.max_truncation}: need 0 <= x < 1",
            )

    def key(self) -> str:
        """Return the cache key: a hash of the parameters and of this module's
        source."""
        digest = hashlib.sha1(
            json.dumps(dataclasses.asdict(self), sort_keys=True).encode(),
        )
        digest.update(Path(__file__).read_bytes())
        return digest.hexdigest()[:10]


def preset(profile: str) -> SynthConfig:
    """Return the benchmark of a profile: ``smoke`` (a few dozen small images) or ``quick``.

    ``full`` trains on COCO; asking for its generated benchmark is an error.
    """
    if profile == "smoke":
        return SynthConfig(
            name="shapes-smoke",
            num_train=48,
            num_val=16,
            image_size=(96, 128),
            object_size=(8.0, 64.0),
            objects_per_image=(1, 6),
        )
    if profile == "quick":
        return SynthConfig()
    if profile == "full":
        raise ValueError("the 'full' profile uses COCO 2017, not the generated benchmark")
    raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(config.PROFILES)}")


@dataclass(frozen=True)
class Benchmark:
    """Where a generated (or any COCO-layout) benchmark lives on disk."""

    root: Path

    def ann_file(self, split: str) -> Path:
        """Path of the COCO annotation json of ``split`` (``train`` or ``val``)."""
        return self.root / "annotations" / f"instances_{split}.json"

    def image_dir(self, split: str) -> Path:
        """Folder holding the images of ``split``."""
        return self.root / split


# ----------------------------------------------------------------------------------------------
# Drawing


def _rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32) * 255


def _outline_mask(outline: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Return ``bool[h, w]``: the pixels of a shape filling a ``w x h`` box."""
    if outline == "rect":
        return np.ones((h, w), dtype=bool)
    image = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(image)
    if outline in ("ellipse", "ring"):
        draw.ellipse([0, 0, w - 1, h - 1], fill=255)
        if outline == "ring":
            t = max(2.0, 0.3 * min(w, h) / 2)  # ring thickness
            draw.ellipse([t, t, w - 1 - t, h - 1 - t], fill=0)
    elif outline == "triangle":
        apex = rng.integers(4)  # apex up, down, left or right
        corners = {
            0: [(w / 2, 0), (0, h - 1), (w - 1, h - 1)],
            1: [(w / 2, h - 1), (0, 0), (w - 1, 0)],
            2: [(0, h / 2), (w - 1, 0), (w - 1, h - 1)],
            3: [(w - 1, h / 2), (0, 0), (0, h - 1)],
        }[int(apex)]
        draw.polygon(corners, fill=255)
    elif outline == "plus":
        t = max(2.0, 0.3 * min(w, h))
        draw.rectangle([(w - t) / 2, 0, (w + t) / 2, h - 1], fill=255)
        draw.rectangle([0, (h - t) / 2, w - 1, (h + t) / 2], fill=255)
    elif outline == "star":
        cx, cy, turn = (w - 1) / 2, (h - 1) / 2, rng.uniform(0, 2 * math.pi)
        points = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.4
            a = turn + k * math.pi / 5
            points.append((cx + r * cx * math.cos(a), cy + r * cy * math.sin(a)))
        draw.polygon(points, fill=255)
    else:
        raise ValueError(f"unknown outline {outline!r}")
    return np.asarray(image) > 0


def _texture(texture: str, w: int, h: int, color: np.ndarray, rng: np.random.Generator):
    """Return ``float32[h, w, 3]`` pixel colours of a textured, softly shaded object."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    dark = color * 0.45
    if texture == "checker":
        cell = max(2, min(w, h) // 4)
        pattern = ((xs // cell + ys // cell) % 2).astype(bool)
    elif texture == "stripes":
        along = xs if w >= h else ys  # stripes cross the long axis
        period = max(3, min(w, h))
        pattern = (along % period) < period / 2
    elif texture == "solid":
        pattern = np.ones((h, w), dtype=bool)
    else:
        raise ValueError(f"unknown texture {texture!r}")
    pixels = np.where(pattern[..., None], color, dark)
    # a gentle linear shading in a random direction
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (xs * math.cos(angle) + ys * math.sin(angle)) / max(w, h)
    return pixels * (1.0 + 0.15 * (ramp - ramp.mean()))[..., None]


def _background(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Return ``uint8[h, w, 3]``: a low-saturation colour field with smooth blotches."""
    base = _rgb(rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.3, 0.85))
    blotches = base + rng.uniform(-40, 40, size=(4, 4, 3))
    small = Image.fromarray(np.clip(blotches, 0, 255).astype(np.uint8))
    return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR)).copy()


def _draw_clutter(canvas: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    h, w = canvas.shape[:2]
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for _ in range(count):
        color = tuple(int(c) for c in _rgb(rng.uniform(), rng.uniform(0, 1), rng.uniform(0.2, 1)))
        x0, x1 = rng.uniform(-0.2 * w, 1.2 * w, size=2)
        y0, y1 = rng.uniform(-0.2 * h, 1.2 * h, size=2)
        if rng.uniform() < 0.7:
            draw.line([(x0, y0), (x1, y1)], fill=color, width=int(rng.integers(1, 3)))
        else:
            box = [min(x0, x1), min(y0, y1), max(x0, x1) + 1, max(y0, y1) + 1]
            start = rng.uniform(0, 360)
            draw.arc(box, start, start + rng.uniform(60, 300), fill=color, width=1)
    return np.asarray(image).copy()


def _box_size(cfg: SynthConfig, name: str, w_img: int, h_img: int, rng: np.random.Generator):
    """Draw an object's box width and height (pixels, >= 4) for class ``name``."""
    low, high = cfg.object_size
    size = math.exp(rng.uniform(math.log(low), math.log(high)))
    if name == "bar":
        ratio = rng.uniform(*cfg.bar_aspect_ratio)
        ratio = ratio if rng.uniform() < 0.5 else 1.0 / ratio
    else:
        ratio = rng.uniform(*cfg.aspect_ratio)
    w, h = size * math.sqrt(ratio), size / math.sqrt(ratio)
    shrink = min(1.0, 0.9 * w_img / w, 0.9 * h_img / h)
    return max(4, round(w * shrink)), max(4, round(h * shrink))


def _place(box_w: int, box_h: int, w_img: int, h_img: int, cfg, rng) -> tuple[int, int]:
    """Draw the top-left corner; at most ``max_truncation`` of each side may leave the image."""
    t = cfg.max_truncation
    x0 = rng.uniform(-t * box_w, w_img - (1 - t) * box_w)
    y0 = rng.uniform(-t * box_h, h_img - (1 - t) * box_h)
    return int(math.floor(x0)), int(math.floor(y0))


def _clip_window(x0: int, y0: int, w: int, h: int, w_img: int, h_img: int):
    """Return the image slice and the matching slice of a ``w x h`` patch placed at (x0, y0)."""
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x0 + w, w_img), min(y0 + h, h_img)
    if ix0 >= ix1 or iy0 >= iy1:
        return None
    image_slice = (slice(iy0, iy1), slice(ix0, ix1))
    patch_slice = (slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0))
    return image_slice, patch_slice


def render_image(cfg: SynthConfig, split: str, index: int):
    """Draw one image of the benchmark.

    Args:
        cfg: the benchmark parameters.
        split: ``"train"`` or ``"val"``.
        index: image index within the split (0-based).

    Returns:
        ``(image, objects, num_distractors)``: ``uint8[H, W, 3]`` RGB pixels; a list with one dict
        per annotated object (``category_id`` 1-based, ``bbox`` as integer xywh of the visible
        pixels, ``area`` their count, ``mask`` ``bool[H, W]``); and how many unannotated
        distractor shapes were drawn.
    """
    rng = np.random.default_rng([cfg.seed, _SPLITS[split], index])
    w_img = int(rng.integers(cfg.image_size[0], cfg.image_size[1] + 1))
    h_img = int(rng.integers(cfg.image_size[0], cfg.image_size[1] + 1))
    canvas = _background(w_img, h_img, rng)
    canvas = _draw_clutter(canvas, int(rng.integers(*cfg.clutter_lines, endpoint=True)), rng)

    # Distractors first: annotated objects may cover them, never the other way round.
    num_distractors = int(rng.integers(*cfg.distractors_per_image, endpoint=True))
    for _ in range(num_distractors):
        outline = _DISTRACTOR_OUTLINES[int(rng.integers(len(_DISTRACTOR_OUTLINES)))]
        w, h = _box_size(cfg, "disc", w_img, h_img, rng)
        x0, y0 = _place(w, h, w_img, h_img, cfg, rng)
        color = _rgb(rng.uniform(), rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
        window = _clip_window(x0, y0, w, h, w_img, h_img)
        if window is None:
            continue
        mask = _outline_mask(outline, w, h, rng)[window[1]]
        pixels = _texture("solid", w, h, color, rng)[window[1]]
        canvas[window[0]][mask] = np.clip(pixels[mask], 0, 255).astype(np.uint8)

    # Objects: drawn in order, each on top of the previous ones. A placement that would leave an
    # earlier object less than ``min_visible`` of its pixels is redrawn (up to 20 tries).
    owner = np.full((h_img, w_img), -1, dtype=np.int32)
    full_area: list[int] = []
    visible: list[int] = []
    kept: list[tuple[int, tuple[slice, slice]]] = []  # (category index, image window)
    for _ in range(int(rng.integers(*cfg.objects_per_image, endpoint=True))):
        label = int(rng.integers(len(CLASSES)))
        hue, outline, texture = _CLASS_STYLE[CLASSES[label]]
        for _attempt in range(20):
            w, h = _box_size(cfg, CLASSES[label], w_img, h_img, rng)
            x0, y0 = _place(w, h, w_img, h_img, cfg, rng)
            window = _clip_window(x0, y0, w, h, w_img, h_img)
            if window is None:
                continue
            mask = _outline_mask(outline, w, h, rng)[window[1]]
            area = int(mask.sum())
            if area < 12:
                continue
            covered = owner[window[0]][mask]
            hidden = np.bincount(covered[covered >= 0], minlength=len(kept))
            if all(
                visible[j] - hidden[j] >= cfg.min_visible * full_area[j] for j in range(len(kept))
            ):
                break
        else:
            continue  # no placement found: leave this object out
        color = _rgb(
            hue + rng.uniform(-cfg.hue_jitter, cfg.hue_jitter),
            rng.uniform(0.55, 1.0),
            rng.uniform(0.6, 1.0),
        )
        pixels = _texture(texture, w, h, color, rng)[window[1]]
        canvas[window[0]][mask] = np.clip(pixels[mask], 0, 255).astype(np.uint8)
        owner_window = owner[window[0]]
        owner_window[mask] = len(kept)
        for j in range(len(kept)):
            visible[j] -= int(hidden[j])
        full_area.append(area)
        visible.append(area)
        kept.append((label, window[0]))

    if cfg.noise_std > 0:
        noise = rng.standard_normal(canvas.shape, dtype=np.float32) * cfg.noise_std
        canvas = np.clip(canvas + noise, 0, 255).astype(np.uint8)

    objects = []
    for k, (label, window) in enumerate(kept):
        mask = owner == k
        ys, xs = np.nonzero(mask[window])
        x0, y0 = int(xs.min()) + window[1].start, int(ys.min()) + window[0].start
        x1, y1 = int(xs.max()) + window[1].start, int(ys.max()) + window[0].start
        objects.append(
            {
                "category_id": label + 1,
                "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1],
                "area": int(mask.sum()),
                "mask": mask,
            }
        )
    return canvas, objects, num_distractors


# ----------------------------------------------------------------------------------------------
# Writing the benchmark


def _render_and_save(job: tuple[SynthConfig, str, int, str]) -> tuple[dict, list[dict]]:
    cfg, split, index, folder = job
    pixels, objects, num_distractors = render_image(cfg, split, index)
    file_name = f"{index:06d}.png"
    Image.fromarray(pixels).save(os.path.join(folder, file_name), optimize=False)
    h, w = pixels.shape[:2]
    image = {
        "id": index + 1,
        "file_name": file_name,
        "width": w,
        "height": h,
        "num_distractors": num_distractors,
    }
    annotations = []
    for obj in objects:
        rle = mask_utils.encode(np.asfortranarray(obj["mask"].astype(np.uint8)))
        annotations.append(
            {
                "image_id": index + 1,
                "category_id": obj["category_id"],
                "bbox": obj["bbox"],
                "area": obj["area"],
                "iscrowd": 0,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            }
        )
    return image, annotations


def _iter_split(cfg, split, folder, workers) -> Iterator[tuple[dict, list[dict]]]:
    count = cfg.num_train if split == "train" else cfg.num_val
    jobs = [(cfg, split, i, str(folder)) for i in range(count)]
    if workers <= 1 or count < 64:
        yield from map(_render_and_save, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_render_and_save, jobs, chunksize=32)


def _coco_json(cfg: SynthConfig, split: str, records) -> dict:
    images, annotations = [], []
    for image, anns in records:
        images.append(image)
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, **ann})
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)
    ]
    info = {
        "description": "colad generated shapes benchmark",
        "split": split,
        "params": dataclasses.asdict(cfg),
        "key": cfg.key(),
    }
    return {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def generate(
    cfg: SynthConfig | None = None,
    *,
    root: str | Path | None = None,
    force: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> Benchmark:
    """Write the benchmark (or find it already written) and return where it is.

    Args:
        cfg: the parameters; defaults to the active profile's preset.
        root: parent folder; defaults to ``<data root>/synth``.
        force: regenerate even if a complete copy exists.
        workers: processes drawing images (default: up to 4, one per core).
        progress: show a progress bar.

    Returns:
        The :class:`Benchmark` at ``<root>/<name>-<key>``.
    """
    from tqdm.auto import tqdm

    cfg = cfg or preset(config.profile_from_env())
    parent = Path(root) if root is not None else config.data_root() / "synth"
    bench = Benchmark(parent / f"{cfg.name}-{cfg.key()}")
    marker = bench.root / "COMPLETE"
    if marker.is_file() and not force:
        return bench
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)

    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".{bench.root.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "annotations").mkdir(parents=True)
    start = time.perf_counter()
    total = 0
    for split in _SPLITS:
        (staging / split).mkdir()
        count = cfg.num_train if split == "train" else cfg.num_val
        records = _iter_split(cfg, split, staging / split, workers)
        records = list(
            tqdm(
                records,
                total=count,
                desc=f"{bench.root.name} {split}",
                unit="img",
                disable=not progress,
                leave=False,
            )
        )
        with open(staging / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(_coco_json(cfg, split, records), f, separators=(",", ":"))
        total += count
    seconds = time.perf_counter() - start
    (staging / "params.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    (staging / "COMPLETE").write_text(
        json.dumps({"images": total, "seconds": round(seconds, 2), "workers": workers}) + "\n"
    )
    if bench.root.exists():
        shutil.rmtree(bench.root)
    try:
        os.replace(staging, bench.root)
    except OSError:
        # Another process (a second rank, a parallel build) finished the same benchmark first:
        # the content is identical by construction, so keep theirs.
        if not marker.is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return bench


def generation_stats(bench: Benchmark) -> dict:
    """Return what the generator recorded for ``bench`` (images, seconds, workers) and its size
    on disk in bytes."""
    stats = json.loads((bench.root / "COMPLETE").read_text())
    stats["bytes"] = sum(p.stat().st_size for p in bench.root.rglob("*") if p.is_file())
    return stats
