"""``data synth`` and ``data check``: write the generated benchmark; check a COCO dataset."""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path

from .. import config


def _add_synth_options(parser: argparse.ArgumentParser) -> None:
    """Add one option per :class:`colad.synth.SynthConfig` field (``--num-train``, ...)."""
    from ..synth import SynthConfig

    defaults = SynthConfig()
    for field in dataclasses.fields(SynthConfig):
        default = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(default, tuple):
            parser.add_argument(
                flag,
                nargs=2,
                type=type(default[0]),
                metavar=("LOW", "HIGH"),
                help=f"(default in the quick preset: {default[0]} {default[1]})",
            )
        else:
            parser.add_argument(
                flag, type=type(default), help=f"(default in the quick preset: {default})"
            )


def _cmd_synth(args: argparse.Namespace) -> int:
    from .. import synth

    profile = args.profile or config.profile_from_env()
    cfg = synth.preset("quick" if profile == "full" else profile)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cfg)}
    overrides = {
        k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None
    }
    cfg = dataclasses.replace(cfg, **overrides)
    bench = synth.generate(cfg, root=args.root, force=args.force, workers=args.workers)
    stats = synth.generation_stats(bench)
    rate = stats["images"] / max(stats["seconds"], 1e-9)
    print(f"benchmark  {bench.root}")
    print(f"images     {stats['images']} (train {cfg.num_train}, val {cfg.num_val})")
    print(
        f"generated  in {stats['seconds']:.1f} s with {stats['workers']} worker(s): "
        f"{rate:.0f} images/s"
    )
    print(f"on disk    {stats['bytes'] / 2**20:.1f} MiB")
    for split in ("train", "val"):
        print(f"{split:5s}      {bench.ann_file(split)}")
    return 0


def _check_dataset(ann_file: Path, images: Path | None, read_images: bool = False) -> None:
    """``data check``: read and check an annotation file (and its images), print what it holds
    and every repair; raises :class:`colad.data.DatasetError` on what cannot be repaired."""
    from ..data import CocoDetection, DatasetWarning, index_coco, read_coco_json

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DatasetWarning)
        if images is not None:
            dataset = CocoDetection(ann_file, images)
            index = dataset.index
            if read_images:
                for i in range(len(dataset)):
                    dataset.read_image(i)
        else:
            index = index_coco(read_coco_json(ann_file), ann_file)
    for w in caught:
        print(f"warning: {w.message}")
    num_boxes = sum(len(b) for b in index.boxes)
    empty = sum(1 for b in index.boxes if len(b) == 0)
    print(
        f"{ann_file}: {len(index.images)} images ({empty} without objects), "
        f"{num_boxes} usable boxes, {index.num_classes} categories; "
        f"crowd annotations dropped: {index.repairs['crowd']}"
    )


def _cmd_check(args: argparse.Namespace) -> int:
    _check_dataset(args.ann_file, args.images, args.read_images)
    return 0
