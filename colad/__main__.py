"""colad's command line: ``python -m colad <command> ...`` (or ``colad <command> ...``).

Commands:

* ``data synth`` -- write the generated benchmark of a profile (or with your parameters) and
  report its throughput and size on disk.
* ``data check`` -- check a COCO-format annotation file (and its images) against the bad-input
  policy and print a summary.
* ``train`` -- train and evaluate a named experiment (the run cache of DESIGN.md: a complete run
  with the same settings and library source is reused); one process or many under ``torchrun``.
* ``eval`` -- evaluate a run directory or a checkpoint on its validation split or any COCO file.
* ``sweep`` -- train (or find in the run cache) named experiments over several seeds and print
  mean ± std per experiment.
* ``results`` -- the README's results: every run the book reads, from the run directories
  (nothing is trained); ``--write README.md`` replaces the README's generated part.
* ``bench assign`` -- time PAA's batched mixture split against the reference implementations'
  per-object scikit-learn loop on the same inputs, and check that they agree.
* ``bench train`` / ``bench infer`` -- time a PAA training step / inference against
  torchvision's RetinaNet with the same backbone, FPN width, image size and batch.

Examples::

    python -m colad data synth --profile quick
    python -m colad data synth --profile smoke --num-train 200 --seed 3
    python -m colad data check data/coco/annotations/instances_val2017.json \\
        --images data/coco/val2017
    COLAD_PROFILE=smoke python -m colad train paa
    python -m colad train lad                       # the big network's assignment teaches
    python -m colad train lad --teacher data/runs/paa-big-tiny-quick-<key>
    python -m colad sweep paa-small lad kd solad --seeds 0 1 2
    torchrun --nproc_per_node=8 -m colad train paa --profile full --backbone resnet18
    python -m colad eval data/runs/paa-tiny-quick-<key>
    python -m colad results --profile quick --write README.md
    python -m colad bench assign --gts 10 100 1000
    python -m colad bench train --backbone resnet18 --size 512 768 --batch 2
    python -m colad bench train --method lad --teacher-backbone resnet50
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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


def _check_dataset(ann_file: Path, images: Path | None, read_images: bool = False) -> None:
    """``data check``: read and check an annotation file (and its images), print what it holds
    and every repair; raises :class:`colad.data.DatasetError` on what cannot be repaired."""
    from .data import CocoDetection, DatasetWarning, index_coco, read_coco_json

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


def _dataset_option(args: argparse.Namespace) -> dict[str, str] | None:
    """Your own dataset from --train-ann, --train-images, --val-ann, --val-images, checked as
    ``data check`` checks it (on the first process only), or ``None``."""
    files = {name: getattr(args, name) for name in config.DATASET_FIELDS}
    if not any(files.values()):
        return None
    # all four or none: DataConfig says which are missing
    config.DataConfig(**{name: str(value or "") for name, value in files.items()})
    if os.environ.get("RANK", "0") == "0":
        for split in ("train", "val"):
            _check_dataset(Path(files[f"{split}_ann"]), Path(files[f"{split}_images"]))
    return {name: str(value) for name, value in files.items()}


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
    from . import bench
    from .config import ModelConfig

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
    from . import bench
    from .config import describe_head

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
    from . import bench

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


WEIGHTS_HELP = (
    "the backbones' initial weights: none (random), imagenet (downloaded once into "
    "$TORCH_HOME/hub/checkpoints; offline, place the file there) or the path of a state-dict "
    "file (default: the profile's, imagenet in full); pretrained networks have their "
    "published width"
)


def _add_dataset_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "your own dataset",
        "train and evaluate on any COCO-format dataset (all four options): the files are "
        "checked as `data check` does, and the classes are the training file's categories",
    )
    group.add_argument("--train-ann", type=Path, help="the training annotation json")
    group.add_argument("--train-images", type=Path, help="the folder its file_name fields are in")
    group.add_argument("--val-ann", type=Path, help="the validation annotation json")
    group.add_argument("--val-images", type=Path, help="the validation image folder")


TRAIN_HELP = """\
Train and evaluate a named experiment, or load its results when a complete run with the same
settings and library source exists: runs live in <data root>/runs/<name>-<key>/ (config.json,
checkpoint.pt, history.json, detections.json, metrics.json). The options below override the
profile's settings (and so change the key).

A killed run is continued with --resume (from its last checkpoint: every epoch, every
--checkpoint-every steps and every 20 minutes); --restart discards it instead.

GPU servers: one process per GPU through torchrun, e.g. on 8 GPUs

    torchrun --nproc_per_node=8 -m colad train paa --profile full --backbone resnet50

--batch-size is the total over all processes (16 in the paper: 8 GPUs x 2 images) and the
schedule is in steps of that batch, so changing the number of GPUs changes nothing else. The
learning rate follows the linear scaling rule: lr = 0.01 x batch / 16; with --batch-size 32 pass
--lr 0.02. On the CPU, torchrun uses the gloo backend (add --cpu on a GPU machine to force it).
"""


def _print_metrics(metrics: dict[str, float]) -> None:
    names = list(metrics)
    print("  ".join(f"{k:>6}" for k in names))
    print("  ".join(f"{v:>6.3f}" for v in metrics.values()))


def _train_experiment(args: argparse.Namespace):
    """The experiment named on the command line, with the options' overrides."""
    from .config import Experiment

    if isinstance(args.resume, str):
        overrides = [
            "backbone",
            "weights",
            *config.DATASET_FIELDS,
            "epochs",
            "max_steps",
            "batch_size",
            "lr",
            "seed",
            "amp",
            "grad_clip",
            "workers",
            "out",
            "teacher",
        ]
        given = [name for name in overrides if getattr(args, name) not in (None, False)]
        if given or args.eval_every_epoch or args.profile:
            raise ValueError(
                "--resume RUN_DIR continues that run with its own settings; drop "
                "the other settings (--" + ", --".join(given or ["profile"]) + ")"
            )
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            raise ValueError(f"--resume {args.resume}: no config.json there; not a run directory")
        return Experiment.from_dict(json.loads(saved.read_text())["experiment"])
    options = {k: v for k, v in (("backbone", args.backbone), ("weights", args.weights)) if v}
    dataset = _dataset_option(args)
    if dataset:
        options["dataset"] = dataset
    if args.teacher:
        _check_teacher_option(args.experiment, args.profile)
        options["teacher"] = args.teacher
    experiment = config.experiment(args.experiment, args.profile, **options)
    train = {
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "amp": args.amp,
        "grad_clip": args.grad_clip,
        "eval_every_epoch": args.eval_every_epoch or None,
    }
    train = {k: v for k, v in train.items() if v is not None}
    workers = {} if args.workers is None else {"num_workers": args.workers}
    return dataclasses.replace(
        experiment,
        train=dataclasses.replace(experiment.train, **train),
        data=dataclasses.replace(experiment.data, **workers),
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from . import dist, engine

    if args.resume and args.restart:
        raise ValueError("--resume and --restart contradict each other")
    env = dist.setup("cpu" if args.cpu else None)
    try:
        experiment = _train_experiment(args)
        path = args.out or (Path(args.resume) if isinstance(args.resume, str) else None)
        on_partial = "resume" if args.resume else "restart" if args.restart else "error"
        try:
            result = engine.run(
                experiment,
                path=path,
                redo=args.redo,
                on_partial=on_partial,
                progress=not args.no_progress,
                checkpoint_every=args.checkpoint_every,
            )
        except engine.RunExists as e:
            raise ValueError(
                f"{e}; pass --resume to continue it or --restart to discard it"
            ) from None
        if env.is_main:
            summary = result.summary
            what = "reused the complete run" if result.reused else "trained"
            print(f"{experiment.name}: {what} in {result.path}")
            print(
                f"{summary['steps']} steps ({summary['skipped_steps']} skipped), "
                f"{summary['train_seconds']:.0f} s on {summary['device']}, "
                f"{summary['images_per_second']:.1f} images/s; data: {summary['data']}"
            )
            if len(result.networks) == 1:
                _print_metrics(result.metrics)
            else:  # CoLAD: both networks, each named
                models = {"net1": experiment.model, "net2": experiment.distill.network2}
                for network, metrics in result.networks.items():
                    model = models[network]
                    head = f", {model.head.upper()} head" if model.head != "paa" else ""
                    print(f"{network} ({_describe_net(model)}{head}):")
                    _print_metrics(metrics)
    finally:
        dist.cleanup()
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from . import data, dist, engine, evaluate

    source = Path(args.source)
    checkpoint = source / engine.CHECKPOINT if source.is_dir() else source
    if args.save is not None and (args.save / engine.CHECKPOINT).exists():
        raise ValueError(
            f"--save {args.save} is a run directory; its own results would be "
            "replaced. Choose another folder"
        )
    env = dist.setup("cpu" if args.cpu else None)
    try:
        state = engine.load_checkpoint(checkpoint)
        experiment = config.Experiment.from_dict(state["experiment"])
        model = engine.build_model(experiment, args.network)
        weights = engine.network_weights(state["model"], experiment, args.network)
        engine.load_weights(model, weights, str(checkpoint))
        model.to(env.device)
        if args.ann_file is not None:
            if args.image_dir is None:
                raise ValueError("--ann-file needs --image-dir")
            sizes = (experiment.data.min_size, experiment.data.max_size)
            dataset = data.CocoDetection(
                args.ann_file, args.image_dir, data.eval_transforms(*sizes)
            )
        else:
            dataset = engine.build_datasets(experiment)[1]
        if dataset.num_classes != experiment.model.num_classes:
            raise ValueError(
                f"{dataset.ann_file} has {dataset.num_classes} categories, the model "
                f"{experiment.model.num_classes}"
            )
        results = engine.detect_dataset(
            model, dataset, batch_size=args.batch_size, env=env, progress=not args.no_progress
        )
        if env.is_main:
            metrics = evaluate.coco_evaluate(dataset.ann_file, results)
            print(
                f"{checkpoint} (step {state['step']}) on {dataset.ann_file}: "
                f"{len(results)} detections on {len(dataset)} images"
            )
            _print_metrics(metrics)
            if args.tide:
                from .tide import tide_errors

                errors = tide_errors(dataset.ann_file, results)
                main_errors = ", ".join(f"{k} {v:.2f}" for k, v in errors["main"].items())
                print(f"TIDE dAP: {main_errors}")
            if args.save is not None:
                args.save.mkdir(parents=True, exist_ok=True)
                evaluate.write_detections(results, args.save / engine.DETECTIONS)
                (args.save / engine.METRICS).write_text(json.dumps(metrics, indent=1))
                print(f"wrote {args.save / engine.DETECTIONS} and {args.save / engine.METRICS}")
    finally:
        dist.cleanup()
    return 0


def _check_teacher_option(name: str, profile: str | None) -> None:
    if not config.experiment(name, profile).distill.teacher:
        raise ValueError(f"--teacher: experiment {name!r} has no teacher to replace (those with "
                         "one: lad, lad-up, kd, solad, ld, ld-up)")  # fmt: skip


def _cmd_sweep(args: argparse.Namespace) -> int:
    from . import sweep

    options = {k: v for k, v in (("backbone", args.backbone), ("weights", args.weights)) if v}
    dataset = _dataset_option(args)
    if dataset:
        options["dataset"] = dataset
    if args.teacher:
        for name in args.experiments:
            _check_teacher_option(name, args.profile)
        options["teacher"] = args.teacher
    if "book" in args.experiments:
        if len(args.experiments) > 1 or options:
            raise ValueError(
                "sweep book trains the book's own runs: give it no other names and no "
                "--backbone, --weights, --teacher or dataset options"
            )
        if args.slurm:
            return _submit_sweep(args, sweep.book_plan(args.profile))
        result = sweep.sweep_book(args.profile, jobs=args.jobs)
    elif args.slurm:
        runs = sweep.plan(args.experiments, args.seeds, profile=args.profile, **options)
        return _submit_sweep(args, runs)
    else:
        result = sweep.sweep(
            args.experiments, args.seeds, profile=args.profile, jobs=args.jobs, **options
        )
    summary = result.summary(args.metrics)
    columns = ["experiment", "network", "seeds", *args.metrics, "train s"]
    print(summary[columns].to_string(index=False))
    return 0


def _submit_sweep(args: argparse.Namespace, runs: list) -> int:
    """Submit the incomplete ``runs`` of a sweep as SLURM jobs; with ``--wait``, summarise."""
    from . import cluster

    spec = cluster.JobSpec(
        partition=args.slurm,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        hours=args.hours,
        mem_gb=args.mem_gb,
        folder=str(args.slurm_folder or ""),
        device="cpu" if args.cpu else None,
    )
    submitted = cluster.submit(runs, spec)
    if not submitted:
        print("nothing to submit: every run is complete")
    elif not args.wait:
        print(
            f"{len(submitted)} job(s) submitted; when they have finished, the same command "
            "without --slurm prints the table (it reads the runs)"
        )
        return 0
    for run in submitted:
        run.job.result()  # raises with the job's error
    args.slurm, args.jobs = None, 1
    return _cmd_sweep(args)


def _cmd_results(args: argparse.Namespace) -> int:
    from . import status

    text = status.results_markdown(args.profile or config.profile_from_env())
    if args.write:
        status.write_results(args.write, text)
        print(f"wrote the generated results into {args.write}")
    else:
        print(text)
    return 0


def _add_process_options(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--cpu", action="store_true", help=f"{verb} on the CPU even if CUDA is present"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_train_parser(commands) -> None:
    train = commands.add_parser(
        "train",
        help="train and evaluate an experiment (cached runs are reused)",
        description=TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument(
        "experiment",
        nargs="?",
        default="paa",
        choices=sorted(config.EXPERIMENTS),
        help="the named experiment (default: paa, the PAA baseline)",
    )
    train.add_argument(
        "--profile",
        choices=config.PROFILES,
        default=None,
        help="settings and data (default: $COLAD_PROFILE, else quick)",
    )
    train.add_argument("--backbone", default=None, help="e.g. resnet18, resnet50, efficientnet_b0")
    train.add_argument("--weights", default=None, metavar="none|imagenet|FILE", help=WEIGHTS_HELP)
    _add_dataset_options(train)
    train.add_argument(
        "--teacher",
        default=None,
        metavar="RUN_DIR|NAME",
        help="the teacher of lad, lad-up, kd, solad, ld and ld-up: a run directory, a "
        "checkpoint or a named experiment (its seed-0 run, trained first if needed)",
    )
    group = train.add_argument_group("schedule overrides")
    group.add_argument("--epochs", type=int, help="passes over the training set")
    group.add_argument("--max-steps", type=int, help="stop after this many steps instead")
    group.add_argument("--batch-size", type=int, help="images per step, over all processes")
    group.add_argument("--lr", type=float, help="peak learning rate (0.01 x batch / 16)")
    group.add_argument("--seed", type=int, help="initialisation, data order and augmentation")
    group.add_argument("--grad-clip", type=float, help="clip the gradient norm (0: off)")
    group.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mixed precision on CUDA (default: on)",
    )
    group.add_argument("--eval-every-epoch", action="store_true", help="also evaluate per epoch")
    group.add_argument("--workers", type=int, help="data-loading processes per training process")
    runs = train.add_argument_group("the run directory")
    runs.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run directory (default: <data root>/runs/<name>-<key>)",
    )
    runs.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN_DIR",
        help="continue an unfinished run from its checkpoint; with RUN_DIR, that "
        "run's own settings are used",
    )
    runs.add_argument("--restart", action="store_true", help="discard an unfinished run")
    runs.add_argument("--redo", action="store_true", help="train again even if a run is complete")
    runs.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="also checkpoint every STEPS steps (default: each epoch)",
    )
    _add_process_options(train, "train")
    train.set_defaults(run=_cmd_train)

    ev = commands.add_parser(
        "eval",
        help="evaluate a run directory or a checkpoint",
        description="Detect on a dataset with a trained checkpoint and print the COCO metrics "
        "(pycocotools). By default the dataset is the run's own validation split; --ann-file "
        "and --image-dir name another COCO-format dataset with the same categories. Works under "
        "torchrun too (each process detects its share).",
    )
    ev.add_argument("source", help="a run directory or a checkpoint.pt")
    ev.add_argument(
        "--network",
        default=None,
        choices=("net1", "net2"),
        help="which of a CoLAD run's two networks (default: net1, the run's first)",
    )
    ev.add_argument("--ann-file", type=Path, default=None, help="a COCO annotation json")
    ev.add_argument("--image-dir", type=Path, default=None, help="its image folder")
    ev.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    ev.add_argument("--tide", action="store_true", help="also print TIDE's error breakdown")
    ev.add_argument(
        "--save",
        type=Path,
        default=None,
        metavar="DIR",
        help="write detections.json and metrics.json into DIR",
    )
    _add_process_options(ev, "evaluate")
    ev.set_defaults(run=_cmd_eval)


def _add_sweep_parser(commands) -> None:
    sweep = commands.add_parser(
        "sweep",
        help="train named experiments over seeds; mean ± std per experiment",
        description="Train (or find in the run cache) every named experiment for every seed, "
        "one progress line per run with the time left, then print mean ± std per experiment "
        "(and per network for CoLAD). Named teachers are trained first. Runs land in the same "
        "run directories as `train`, so the book reads them.",
    )
    sweep.add_argument(
        "experiments",
        nargs="+",
        choices=["book", *sorted(config.EXPERIMENTS)],
        metavar="NAME",
        help="named experiments: " + ", ".join(config.EXPERIMENTS) + "; or book: every run "
        "the book's chapters read in the profile (their own seeds and backbones), so that a "
        "build only reads runs",
    )
    sweep.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    sweep.add_argument(
        "--profile",
        choices=config.PROFILES,
        default=None,
        help="settings and data (default: $COLAD_PROFILE, else quick)",
    )
    sweep.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, each in its own process with cores/jobs threads",
    )
    sweep.add_argument("--backbone", default=None, help="override every experiment's backbone")
    sweep.add_argument("--weights", default=None, metavar="none|imagenet|FILE", help=WEIGHTS_HELP)
    _add_dataset_options(sweep)
    sweep.add_argument(
        "--teacher",
        default=None,
        metavar="RUN_DIR|NAME",
        help="override the teacher of the distillation experiments",
    )
    sweep.add_argument(
        "--metrics", nargs="+", default=["AP", "AP50"], help="COCO metrics to summarise"
    )
    slurm = sweep.add_argument_group(
        "SLURM",
        "submit each run that is not complete as one multi-GPU job through submitit, "
        "requeued and resumed when pre-empted (--slurm local: submitit's local executor, "
        "processes on this machine)",
    )
    slurm.add_argument("--slurm", metavar="PARTITION", help="the partition to submit to")
    slurm.add_argument("--nodes", type=int, default=1, help="nodes per run (default 1)")
    slurm.add_argument("--gpus-per-node", type=int, default=8, help="GPUs and processes per node")
    slurm.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per process")
    slurm.add_argument("--hours", type=float, default=72.0, help="time limit of one job")
    slurm.add_argument("--mem-gb", type=int, default=0, help="memory per node (0: default)")
    slurm.add_argument("--slurm-folder", type=Path, help="job files and logs (data/slurm)")
    slurm.add_argument("--wait", action="store_true", help="wait for the jobs, then summarise")
    slurm.add_argument("--cpu", action="store_true", help="train on CPUs (gloo) in the jobs")
    sweep.set_defaults(run=_cmd_sweep)  # fmt: skip


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

    _add_train_parser(commands)
    _add_sweep_parser(commands)

    bench = commands.add_parser(
        "bench",
        help="benchmarks against reference implementations",
        description="Benchmarks measured side by side in one process.",
    )
    results = commands.add_parser(
        "results",
        help="the README's results, from the runs the book reads",
        description="Print (or --write into the README between its markers) the results of "
        "every run the book reads in a profile, read from the run directories: mean ± std over "
        "seeds and the gains over each baseline beside the paper's. Trains nothing; runs not in "
        "the run cache are listed as missing.",
    )
    results.add_argument(
        "--profile", choices=config.PROFILES, default=None,
        help="whose runs (default: $COLAD_PROFILE, else quick)",
    )  # fmt: skip
    results.add_argument(
        "--write", type=Path, metavar="README",
        help="replace the generated part of this file instead of printing",
    )  # fmt: skip
    results.set_defaults(run=_cmd_results)

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

    common = (
        "with the same ResNet, FPN width, P3-P7 levels and GroupNorm towers (RetinaNet keeps its "
        "9 anchors per location), on the same random images, alternating the two; print the "
        "medians, their ratio and PAA's images/s. Random weights: nothing is downloaded. "
        "--size 800 1216 --amp on a GPU is the full profile's resolution."
    )
    descriptions = {
        "train": "Time one SGD step (forward, losses, backward, update) of the PAA detector and "
        "of torchvision's RetinaNet " + common + " Also the time of PAA's assignment alone.",
        "infer": "Time inference (network, decoding, NMS; PAA also its score voting) of the PAA "
        "detector and of torchvision's RetinaNet " + common + " Random weights would leave "
        "the amount of post-processing to chance (how many scores pass the threshold), so each "
        "model's score threshold is set so that --candidates (box, class) pairs per image pass "
        "it, as in a trained detector; both then keep their top 1000 anchors per level, run NMS "
        "at IoU 0.6 and keep 100 detections.",
    }
    for name, description in descriptions.items():
        sub = bench_commands.add_parser(
            name,
            help=f"PAA {'training step' if name == 'train' else 'inference'} vs "
            "torchvision's RetinaNet",
            description=description,
        )
        sub.add_argument(
            "--backbone", default="resnet18", choices=("resnet18", "resnet50", "resnet101")
        )
        sub.add_argument("--fpn-channels", type=int, default=256, help="FPN and head width")
        sub.add_argument("--size", type=int, nargs=2, default=[512, 768], metavar=("H", "W"))
        sub.add_argument(
            "--batch", type=int, default=None, help="images per step (default: 2; with "
            "--profile, its batch)",
        )  # fmt: skip
        sub.add_argument("--classes", type=int, default=80, help="number of classes")
        sub.add_argument("--repeats", type=int, default=10, help="timed runs of each (median)")
        sub.add_argument("--amp", action="store_true", help="float16 autocast on CUDA")
        sub.add_argument("--cpu-only", action="store_true", help="skip the GPU even if present")
        sub.add_argument(
            "--head", choices=("iop", "cop", "gfl"), default=None,
            help="instead: time this head variant (gfl: GFL's head, ATSS, losses and decoding) "
            "against the plain PAA head in the same detector, and the memory each head holds "
            "for backward on P3",
        )  # fmt: skip
        sub.add_argument(
            "--iou-branch", choices=("infer", "train", "none"), default="infer",
            help="with --head: the variant's IoU branch (scored, trained only, or absent)",
        )  # fmt: skip
        if name == "train":
            sub.add_argument(
                "--method",
                choices=("lad", "colad", "ld"),
                default=None,
                help="instead: time a LAD step against the student's PAA step plus the "
                "teacher's forward pass, a CoLAD step against the two networks' PAA steps, or "
                "an LD step against the GFL student's step (and its teacher's forward pass)",
            )
            sub.add_argument(
                "--teacher-backbone",
                default="resnet50",
                choices=("resnet18", "resnet50", "resnet101"),
                help="with --method: the teacher (lad) or network 2 (colad)",
            )
            sub.add_argument(
                "--profile",
                choices=("smoke", "quick"),
                default=None,
                help="with --method: time that profile's small and big networks at its image "
                "size and batch instead of ResNets",
            )
        if name == "infer":
            sub.add_argument(
                "--candidates",
                type=int,
                default=1000,
                help="(box, class) pairs per image that pass the score threshold",
            )
        sub.set_defaults(run=_cmd_bench_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from .backbone import WeightsUnavailable
    from .data import DatasetError
    from .engine import CheckpointError, TrainingDiverged

    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except (DatasetError, ValueError, CheckpointError, WeightsUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
