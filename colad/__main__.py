"""colad's command line: ``python -m colad <command> ...`` (or ``colad <command> ...``).

Commands:

* ``data synth`` -- write the generated benchmark of a profile (or with your parameters) and
  report its throughput and size on disk.
* ``data check`` -- check a COCO-format annotation file (and its images) against the bad-input
  policy and print a summary.
* ``bench assign`` -- time PAA's batched mixture split against the reference implementations'
  per-object scikit-learn loop on the same inputs, and check that they agree.
* ``bench train`` -- time a PAA training step against torchvision's RetinaNet with the same
  backbone, FPN width, image size and batch.

Examples::

    python -m colad data synth --profile quick
    python -m colad data synth --profile smoke --num-train 200 --seed 3
    python -m colad data check data/coco/annotations/instances_val2017.json \\
        --images data/coco/val2017
    python -m colad bench assign --gts 10 100 1000
    python -m colad bench train --backbone resnet18 --size 512 768 --batch 2
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

from . import config

__all__ = ["main"]


def _add_synth_options(parser: argparse.ArgumentParser) -> None:
    """Add one option per :class:`colad.synth.SynthConfig` field (``--num-train``, ...)."""
    from .synth import SynthConfig

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
    from . import synth

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


def _cmd_check(args: argparse.Namespace) -> int:
    from .data import CocoDetection, DatasetWarning, index_coco, read_coco_json

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DatasetWarning)
        if args.images is not None:
            dataset = CocoDetection(args.ann_file, args.images)
            index = dataset.index
            if args.read_images:
                for i in range(len(dataset)):
                    dataset.read_image(i)
        else:
            index = index_coco(read_coco_json(args.ann_file), args.ann_file)
    for w in caught:
        print(f"warning: {w.message}")
    num_boxes = sum(len(b) for b in index.boxes)
    empty = sum(1 for b in index.boxes if len(b) == 0)
    print(
        f"{args.ann_file}: {len(index.images)} images ({empty} without objects), "
        f"{num_boxes} usable boxes, {index.num_classes} categories; "
        f"crowd annotations dropped: {index.repairs['crowd']}"
    )
    return 0


def _bench_devices(args: argparse.Namespace) -> list[str]:
    """The CPU, and CUDA when present and not ``--cpu-only``; prints what runs the benchmark."""
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if "cuda" in devices:
        print(f"GPU: {torch.cuda.get_device_name()}")
    return devices


def _cmd_bench_assign(args: argparse.Namespace) -> int:

    from .bench import bench_assign, format_table

    if args.repeats < 1 or any(n < 1 for n in args.gts) or args.candidates < 2:
        raise ValueError("--gts and --repeats must be positive and --candidates at least 2")
    rows = []
    for device in _bench_devices(args):
        rows += bench_assign(
            args.gts, max_candidates=args.candidates, repeats=args.repeats, device=device,
            seed=args.seed,
        )  # fmt: skip
    print(format_table(rows))
    return 0


def _cmd_bench_train(args: argparse.Namespace) -> int:

    from .bench import bench_train

    if args.repeats < 1 or args.batch < 1 or min(args.size) < 32 or args.classes < 1:
        raise ValueError("--repeats, --batch and --classes must be positive, --size at least 32")
    devices = _bench_devices(args)
    height, width = args.size
    print(f"{args.backbone}, FPN {args.fpn_channels}, {height}x{width} px, batch {args.batch}, "
          f"{args.classes} classes; median of {args.repeats} steps")  # fmt: skip
    print(f"{'device':>7} {'PAA ms':>9} {'RetinaNet ms':>13} {'ratio':>6} {'assignment':>16}")
    for device in devices:
        r = bench_train(
            backbone=args.backbone, fpn_channels=args.fpn_channels, image_size=tuple(args.size),
            batch=args.batch, num_classes=args.classes, repeats=args.repeats, device=device,
        )  # fmt: skip
        share = r["assign_ms"] / r["paa_ms"]
        print(f"{device:>7} {r['paa_ms']:>9.1f} {r['retinanet_ms']:>13.1f} {r['ratio']:>6.2f} "
              f"{r['assign_ms']:>7.1f} ms ({share:.1%})")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m colad",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser(
        "data",
        help="generate or check datasets",
        description="Generate the benchmark or check a COCO file.",
    )
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    synth = data_commands.add_parser(
        "synth",
        help="write the generated benchmark",
        description="Write the generated shapes benchmark (deterministic; cached under "
        "<data root>/synth/<name>-<hash>, the hash covering the parameters and the "
        "generator's source). Options override the profile's preset.",
    )
    synth.add_argument(
        "--profile",
        choices=("smoke", "quick"),
        default=None,
        help="preset to start from (default: $COLAD_PROFILE if smoke or quick, else quick)",
    )
    synth.add_argument(
        "--root",
        type=Path,
        default=None,
        help="parent folder (default: <data root>/synth; $COLAD_DATA moves the data root)",
    )
    synth.add_argument("--force", action="store_true", help="regenerate even if cached")
    synth.add_argument(
        "--workers",
        type=int,
        default=None,
        help="drawing processes (default: up to 4, one per core)",
    )
    _add_synth_options(synth)
    synth.set_defaults(run=_cmd_synth)

    check = data_commands.add_parser(
        "check",
        help="check a COCO annotation file",
        description="Check a COCO-format detection json: structure, ids, boxes (repairs are "
        "reported as warnings), and with --images that every image file exists.",
    )
    check.add_argument("ann_file", type=Path, help="the annotation json")
    check.add_argument("--images", type=Path, default=None, help="the image folder")
    check.add_argument(
        "--read-images",
        action="store_true",
        help="also decode every image and check its size (slow on COCO)",
    )
    check.set_defaults(run=_cmd_check)

    bench = commands.add_parser(
        "bench",
        help="benchmarks against reference implementations",
        description="Benchmarks measured side by side in one process.",
    )
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    assign = bench_commands.add_parser(
        "assign",
        help="PAA's batched mixture split vs a per-object scikit-learn loop",
        description="Time colad.paa.split_candidates (all objects at once) against one "
        "scikit-learn GaussianMixture per object (mmdetection's and the CoLAD code's approach) "
        "on the same detector-like candidate costs, alternating the two; print the agreement "
        "(objects with identical positives) and the speed-up, on the CPU and on CUDA if present.",
    )
    assign.add_argument(
        "--gts", type=int, nargs="+", default=[10, 100, 1000], help="objects per problem"
    )
    assign.add_argument("--candidates", type=int, default=45, help="candidate slots per object")
    assign.add_argument("--repeats", type=int, default=5, help="timed runs of each (median)")
    assign.add_argument("--seed", type=int, default=0, help="seed of the generated costs")
    assign.add_argument("--cpu-only", action="store_true", help="skip the GPU even if present")
    assign.set_defaults(run=_cmd_bench_assign)

    train = bench_commands.add_parser(
        "train",
        help="a PAA training step vs torchvision's RetinaNet",
        description="Time one SGD step (forward, losses, backward, update) of the PAA detector and "
        "of torchvision's RetinaNet built with the same ResNet, FPN width, P3-P7 levels and "
        "GroupNorm towers (RetinaNet keeps its 9 anchors per location), on the same random images "
        "and targets, alternating the two; print the medians, their ratio and the time of PAA's "
        "assignment alone. Random weights: nothing is downloaded.",
    )
    train.add_argument(
        "--backbone", default="resnet18", choices=("resnet18", "resnet50", "resnet101")
    )
    train.add_argument("--fpn-channels", type=int, default=256, help="FPN and head width")
    train.add_argument("--size", type=int, nargs=2, default=[512, 768], metavar=("H", "W"))
    train.add_argument("--batch", type=int, default=2, help="images per step")
    train.add_argument("--classes", type=int, default=80, help="number of classes")
    train.add_argument("--repeats", type=int, default=10, help="timed steps of each (median)")
    train.add_argument("--cpu-only", action="store_true", help="skip the GPU even if present")
    train.set_defaults(run=_cmd_bench_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from .data import DatasetError

    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except (DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
