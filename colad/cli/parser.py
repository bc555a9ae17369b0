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
from pathlib import Path

from .. import config
from .bench import _cmd_bench_assign, _cmd_bench_model
from .data import _add_synth_options, _cmd_check, _cmd_synth
from .runs import _add_dataset_options, _cmd_eval, _cmd_results, _cmd_sweep, _cmd_train

WEIGHTS_HELP = (
    "the backbones' initial weights: none (random), imagenet (downloaded once into "
    "$TORCH_HOME/hub/checkpoints; offline, place the file there) or the path of a state-dict "
    "file (default: the profile's, imagenet in full); pretrained networks have their "
    "published width"
)


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
