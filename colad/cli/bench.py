"""``bench assign|train|infer|head``: timings against the reference implementations."""

from __future__ import annotations

import argparse

from .. import config


def _bench_devices(args: argparse.Namespace) -> list[str]:
    """The CPU, and CUDA when present and not ``--cpu-only``; prints what runs the benchmark."""
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if "cuda" in devices:
        print(f"GPU: {torch.cuda.get_device_name()}")
    return devices


def _cmd_bench_assign(args: argparse.Namespace) -> int:

    from ..bench import bench_assign, format_table

    if args.repeats < 1 or any(n < 1 for n in args.gts) or args.candidates < 2:
        raise ValueError("--gts and --repeats must be positive and --candidates at least 2")
    rows = []
    for device in _bench_devices(args):
        rows += bench_assign(
            args.gts,
            max_candidates=args.candidates,
            repeats=args.repeats,
            device=device,
            seed=args.seed,
        )
    print(format_table(rows))
    return 0


def _cmd_bench_method(args: argparse.Namespace) -> int:
    """``bench train --method lad|colad|ld``: the distillation step against the steps it
    replaces (LD: GFL networks)."""
    from .. import bench
    from ..config import ModelConfig

    if args.profile:  # the profile's small and big networks at its image size and batch
        small = config.experiment("paa-small", args.profile)
        big = config.experiment("paa-big", args.profile)
        size = (small.data.max_size, small.data.max_size)
        batch = args.batch or small.train.batch_size
        student, other = small.model, big.model
    else:
        size, batch = tuple(args.size), args.batch or 2
        fields = {"num_classes": args.classes, "fpn_channels": args.fpn_channels}
        student = ModelConfig(backbone=args.backbone, **fields)
        other = ModelConfig(backbone=args.teacher_backbone, **fields)
    role = "network 2" if args.method == "colad" else "teacher"
    kind = " (GFL)" if args.method == "ld" else ""
    print(f"{args.method}: student{kind} {_describe_net(student)}, {role} {_describe_net(other)}; "
          f"{size[0]}x{size[1]} px, batch {batch}; median of {args.repeats} steps")  # fmt: skip
    for device in _bench_devices(args):
        r = bench.bench_method(args.method, student, other, image_size=size, batch=batch,
                               repeats=args.repeats, device=device, amp=args.amp)  # fmt: skip
        parts = ", ".join(
            f"{k[:-3]} {v:.1f} ms" for k, v in r.items() if k.endswith("_ms") and
            k not in ("method_ms", "reference_ms")
        )  # fmt: skip
        print(f"{device}{' amp' if r['amp'] else ''}: {parts}")
        print(f"  {args.method} / reference = {r['method_ms']:.1f} / {r['reference_ms']:.1f} ms"
              f" = {r['ratio']:.3f} (target <= {r['target']})")  # fmt: skip
        if args.method != "colad":
            print(f"  {args.method} / student alone = {r['student_ratio']:.3f}")
    return 0


def _describe_net(model) -> str:
    if model.backbone == "tiny":
        return f"tiny {'-'.join(map(str, model.widths))}, FPN {model.fpn_channels}"
    return f"{model.backbone}, FPN {model.fpn_channels}"


def _bench_setup(args: argparse.Namespace) -> tuple[bool, list[str], str]:
    """Check the options shared by ``bench train`` and ``bench infer``; return whether it times
    training, the devices to time on and what one timed pass is called."""
    if args.repeats < 1 or args.batch < 1 or min(args.size) < 32 or args.classes < 1:
        raise ValueError("--repeats, --batch and --classes must be positive, --size at least 32")
    training = args.bench_command == "train"
    return training, _bench_devices(args), "training steps" if training else "inference passes"


def _cmd_bench_head(args: argparse.Namespace) -> int:
    """``bench train|infer --head iop|cop|gfl``: the head variant against the plain PAA head."""
    from .. import bench
    from ..config import describe_head

    training, devices, what = _bench_setup(args)
    height, width = args.size
    branch = "none" if args.head == "gfl" else args.iou_branch
    print(f"{describe_head(args.head, branch)} vs the plain PAA head: {args.backbone}, "
          f"FPN {args.fpn_channels}, {height}x{width} px, batch {args.batch}, {args.classes} "
          f"classes; median of {args.repeats} {what}")  # fmt: skip
    print(
        f"{'device':>7} {'PAA ms':>9} {args.head.upper() + ' ms':>9} {'ratio':>6} "
        f"{'target':>7} {'P3 memory (PAA, ' + args.head.upper() + ')':>26} {'ratio':>6}"
    )
    for device in devices:
        amp = args.amp and device == "cuda"
        r = bench.bench_head(
            args.head, training=training, iou_branch=args.iou_branch, backbone=args.backbone,
            fpn_channels=args.fpn_channels, image_size=tuple(args.size), batch=args.batch,
            num_classes=args.classes, repeats=args.repeats, device=device, amp=amp,
            **({} if training else {"candidates": args.candidates}),
        )  # fmt: skip
        label = device + (" amp" if amp else "")
        memory = f"{r['paa_p3_mb']:.1f} MB, {r['variant_p3_mb']:.1f} MB"
        target = "—" if r["target"] is None else f"<= {r['target']}"
        print(
            f"{label:>7} {r['paa_ms']:>9.1f} {r['variant_ms']:>9.1f} {r['ratio']:>6.3f} "
            f"{target:>7} {memory:>26} {r['memory_ratio']:>6.3f}"
        )
    return 0


def _cmd_bench_model(args: argparse.Namespace) -> int:
    """``bench train`` and ``bench infer``: PAA against the matching RetinaNet."""
    from .. import bench

    if getattr(args, "method", None):
        return _cmd_bench_method(args)
    args.batch = args.batch or 2
    if args.head:
        return _cmd_bench_head(args)

    training, devices, what = _bench_setup(args)
    height, width = args.size
    print(
        f"{args.backbone}, FPN {args.fpn_channels}, {height}x{width} px, batch {args.batch}, "
        f"{args.classes} classes; median of {args.repeats} {what}"
    )
    header = f"{'device':>7} {'PAA ms':>9} {'RetinaNet ms':>13} {'ratio':>6} {'PAA img/s':>10}"
    print(header + (f" {'assignment':>16}" if training else ""))
    for device in devices:
        amp = args.amp and device == "cuda"
        measure = bench.bench_train if training else bench.bench_infer
        r = measure(
            backbone=args.backbone,
            fpn_channels=args.fpn_channels,
            image_size=tuple(args.size),
            batch=args.batch,
            num_classes=args.classes,
            repeats=args.repeats,
            device=device,
            amp=amp,
            **({} if training else {"candidates": args.candidates}),
        )
        label = device + (" amp" if amp else "")
        line = (
            f"{label:>7} {r['paa_ms']:>9.1f} {r['retinanet_ms']:>13.1f} {r['ratio']:>6.2f} "
            f"{r['paa_images_s']:>10.1f}"
        )
        if training:
            line += f" {r['assign_ms']:>7.1f} ms ({r['assign_ms'] / r['paa_ms']:.1%})"
        print(line)
    return 0
