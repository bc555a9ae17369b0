"""``train``, ``eval``, ``sweep`` and ``results``: runs through the run cache."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from .. import config
from .bench import _describe_net
from .data import _check_dataset


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


def _print_metrics(metrics: dict[str, float]) -> None:
    names = list(metrics)
    print("  ".join(f"{k:>6}" for k in names))
    print("  ".join(f"{v:>6.3f}" for v in metrics.values()))


def train_experiment(args: argparse.Namespace):
    """The experiment named on the command line, with the options' overrides."""
    from ..config import Experiment

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
    from .. import dist, engine

    if args.resume and args.restart:
        raise ValueError("--resume and --restart contradict each other")
    env = dist.setup("cpu" if args.cpu else None)
    try:
        experiment = train_experiment(args)
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
    from .. import data, dist, engine, evaluate

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
                from ..tide import tide_errors

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
    from .. import sweep

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
    from .. import cluster

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
    from .. import status

    text = status.results_markdown(args.profile or config.profile_from_env())
    if args.write:
        status.write_results(args.write, text)
        print(f"wrote the generated results into {args.write}")
    else:
        print(text)
    return 0
