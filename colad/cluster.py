"""Runs as SLURM jobs through submitit: one multi-GPU job per run, resumable when pre-empted.

``python -m colad sweep NAME... --slurm PARTITION`` plans the runs as :func:`colad.sweep.plan`
does, leaves out those already complete in the run cache, and submits each of the others as one
job of ``nodes x gpus_per_node`` tasks (one process per GPU, as ``torchrun`` would start). Every
task sets the ``torch.distributed`` environment from SLURM's (submitit's
``TorchDistributedEnvironment``) and calls :func:`colad.engine.run`, which writes the run
directory from rank 0. A student whose teacher is also being trained waits for it through a
SLURM dependency (``afterok``).

When SLURM pre-empts a job or its time runs out, submitit calls :meth:`TrainRun.checkpoint`,
which requeues the same call; :func:`colad.engine.run` then resumes from the run's last
checkpoint (written every epoch and every 20 minutes). Finished runs are ordinary run
directories: the same sweep without ``--slurm``, or a chapter in the same profile, reads them.

``--slurm local`` uses submitit's local executor instead (processes on this machine, no SLURM):
a way to try the path, and how the tests exercise it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

from colad import config, engine
from colad.config import Experiment

__all__ = [
    "JobSpec",
    "TrainRun",
    "submit",
    "SubmittedRun",
    "estimate",
    "COCO_TRAIN_IMAGES",
    "PAPER_COMMANDS",
    "experiment_of",
]


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """The resources of every job of a submission.

    Attributes:
        partition: the SLURM partition, or ``"local"`` for submitit's local executor.
        nodes: nodes per run (the batch is split over ``nodes x gpus_per_node`` processes).
        gpus_per_node: GPUs (and processes) per node; 0 trains on CPUs (one process).
        cpus_per_task: CPU cores per process (data loading).
        hours: the time limit of one job; a run that needs longer is requeued and resumes.
        mem_gb: memory per node (0: the partition's default).
        folder: where submitit keeps its job files and logs (``%j`` is the job id).
        device: ``"cpu"`` forces the gloo backend (default: CUDA when the node has it).
    """

    partition: str
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 8
    hours: float = 72.0
    mem_gb: int = 0
    folder: str = ""
    device: str | None = None

    def __post_init__(self) -> None:
        if not self.partition:
            raise ValueError("--slurm needs a partition name (or 'local')")
        if self.nodes < 1 or self.gpus_per_node < 0 or self.cpus_per_task < 1 or self.hours <= 0:
            raise ValueError(
                f"job resources must be positive: nodes={self.nodes}, gpus_per_node="
                f"{self.gpus_per_node}, cpus_per_task={self.cpus_per_task}, hours={self.hours}"
            )
        if self.partition == "local" and self.nodes != 1:
            raise ValueError("the local executor runs on this machine: nodes must be 1")

    @property
    def tasks_per_node(self) -> int:
        return max(self.gpus_per_node, 1)


class TrainRun:
    """What each task of a job calls: one run of an experiment into its run directory.

    A plain picklable callable (submitit pickles it into the job folder); ``checkpoint`` makes
    it requeue itself when the job is pre-empted or times out.
    """

    def __init__(self, experiment: Experiment, path: Path, device: str | None = None) -> None:
        self.experiment = experiment.to_dict()
        self.path = str(path)
        self.device = device

    def __call__(self) -> dict:
        import submitit

        from colad import dist

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        dist.setup(self.device)
        try:
            result = engine.run(
                Experiment.from_dict(self.experiment),
                path=self.path,
                on_partial="resume",
                progress=False,
            )
        finally:
            dist.cleanup()
        return {"path": str(result.path), "metrics": result.metrics}

    def checkpoint(self, *args, **kwargs):
        """Pre-empted or out of time: submit the same call again (submitit requeues it); the
        run resumes from its last checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


@dataclasses.dataclass
class SubmittedRun:
    """One submitted run: its name and seed, the run directory it will fill, the submitit job."""

    name: str
    seed: int
    path: Path
    job: object

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)


def _executor(spec: JobSpec, folder: Path):
    import submitit

    cluster = "local" if spec.partition == "local" else "slurm"
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
    parameters = dict(
        nodes=spec.nodes,
        gpus_per_node=spec.gpus_per_node,
        tasks_per_node=spec.tasks_per_node,
        cpus_per_task=spec.cpus_per_task,
        timeout_min=int(spec.hours * 60),
        slurm_partition=spec.partition,
        slurm_signal_delay_s=180,  # time for the signal handler before the job is killed
    )
    if spec.mem_gb:
        parameters["mem_gb"] = spec.mem_gb
    executor.update_parameters(**parameters)
    return executor


def teacher_path(experiment: Experiment) -> Path | None:
    """The run directory of a named teacher that ``experiment`` trains with, else ``None``."""
    if experiment.distill.teacher not in config.EXPERIMENTS:
        return None
    return engine.run_path(engine.teacher_source(experiment))


def submit(
    runs: Sequence[tuple[str, int, Experiment]],
    spec: JobSpec,
    *,
    log: Callable[[str], None] = print,
) -> list[SubmittedRun]:
    """Submit every run of ``runs`` (teachers first, as :func:`colad.sweep.plan` orders them)
    that is not complete in the run cache; returns the submitted ones.

    On SLURM a student waits for its teacher's job (``afterok``); the local executor has no
    dependencies, so there each teacher's job is waited for before its students are submitted.
    """
    folder = Path(spec.folder or config.data_root() / "slurm")
    executor = _executor(spec, folder)
    submitted: dict[Path, SubmittedRun] = {}
    for name, seed, experiment in runs:
        path = engine.run_path(experiment)
        if engine.load_run(path) is not None:
            log(f"{name} seed {seed}: complete in the run cache ({engine.shown_path(path)})")
            continue
        teacher = submitted.get(teacher_path(experiment) or Path())
        if teacher is not None and spec.partition == "local":
            teacher.job.result()  # raises if the teacher failed
        elif teacher is not None:
            executor.update_parameters(
                slurm_additional_parameters={"dependency": f"afterok:{teacher.job_id}"}
            )
        executor.update_parameters(name=f"colad-{name}-s{seed}")
        job = executor.submit(TrainRun(experiment, path, spec.device))
        executor.update_parameters(slurm_additional_parameters={})
        submitted[path] = SubmittedRun(name, seed, path, job)
        waits = f", after job {teacher.job_id}" if teacher is not None else ""
        log(f"{name} seed {seed}: job {job.job_id}{waits} -> {engine.shown_path(path)}")
    if submitted:
        log(f"logs: {folder}/<job id>/")
    return list(submitted.values())


# ----------------------------------------------------------------------------------------------
# What a run will cost, before asking for it

#: COCO 2017 training images with at least one object (those training keeps).
COCO_TRAIN_IMAGES = 117_266

#: Peak training memory per GPU that mmdetection measured for the same PAA networks (PAA head
#: with the IoU branch, 2 images per GPU, fp32, 1333x800; ``configs/paa/README.md``), by
#: backbone, in GB.
MMDET_PAA_MEMORY_GB = {"resnet50": 3.7, "resnet101": 6.2}


@functools.lru_cache(maxsize=64)
def _forward_flops(model, size: tuple[int, int]) -> float:
    """Forward FLOPs of one image through backbone, FPN and head, counted by PyTorch's
    ``FlopCounterMode`` on the meta device (no memory, no weights). Counting takes about half a
    second per network, so counts are kept in ``<data root>/cache/flops``, keyed by the network's
    settings, the size, PyTorch's version and the library's code (:func:`engine.source_key`)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from colad.sweep import cached

    def count() -> float:
        detector = _meta_detector(model)
        with torch.device("meta"):
            image = torch.empty(1, 3, *size)
            counter = FlopCounterMode(display=False)
            with counter:
                detector.head(detector.features(image))
        return float(counter.get_total_flops())

    key = engine.source_key(dataclasses.asdict(model), list(size), torch.__version__)
    return float(cached("flops", [key], count, valid=lambda v: isinstance(v, int | float)))


def estimate(experiment: Experiment, *, sustained_tflops: float = 50.0,
             train_images: int = COCO_TRAIN_IMAGES) -> dict:  # fmt: skip
    """An estimate of a run's GPU-hours and memory per GPU, from counted FLOPs and an assumed
    sustained GPU throughput: the order of magnitude to request, not a measurement.

    GPU-hours = (FLOPs of every image of every epoch: forward and backward of each trained
    network, forward of a teacher) / ``sustained_tflops`` / 3600. Forward FLOPs are counted;
    a backward pass is taken as twice its forward (the usual rule; PyTorch's counter
    overcounts the backward of depthwise convolutions). FLOPs are counted for the
    largest training image (short side ``max(min_size, train_min_sizes)``, long side
    ``max_size``), for backbone, FPN and head only: assignment, losses, data loading and
    evaluation are left out. ``sustained_tflops`` is what one GPU really sustains in training
    (well below its peak); measure yours with ``python -m colad bench train --profile full``.

    Memory per GPU: mmdetection's measured peak for the same PAA network where it published
    one (:data:`MMDET_PAA_MEMORY_GB`, 2 images per GPU, fp32), plus a teacher's fp32 weights;
    ``None`` where no measurement exists for a trained network (other backbones and heads).

    Returns:
        ``{"networks", "images", "epochs", "forward_gflops", "pflops", "gpu_hours",
        "memory_gb"}``; ``forward_gflops`` is per image, summed over the networks run.
    """
    short = max([experiment.data.min_size, *experiment.data.train_min_sizes])
    size = (-(-short // 32) * 32, -(-experiment.data.max_size // 32) * 32)  # padded as batched
    trained = [experiment.model]
    if experiment.distill.network2 is not None:
        trained.append(experiment.distill.network2)
    teacher = experiment.distill.teacher
    teacher_model = (config.experiment(teacher, experiment.data.profile).model
                     if teacher in config.EXPERIMENTS else None)  # fmt: skip
    forward = sum(_forward_flops(model, size) for model in trained)
    total = 3 * forward  # a backward pass costs about twice the forward (inputs and weights)
    if teacher_model is not None:
        teacher_forward = _forward_flops(teacher_model, size)
        forward, total = forward + teacher_forward, total + teacher_forward
    work = total * train_images * experiment.train.epochs
    memory = [MMDET_PAA_MEMORY_GB.get(m.backbone) if m.head == "paa" else None for m in trained]
    memory_gb = None if None in memory else sum(memory)
    if memory_gb is not None and teacher_model is not None:
        params = sum(p.numel() for p in _meta_detector(teacher_model).parameters())
        memory_gb += 4 * params / 1e9
    return {
        "networks": len(trained) + (teacher_model is not None),
        "images": train_images,
        "epochs": experiment.train.epochs,
        "forward_gflops": forward / 1e9,
        "pflops": work / 1e15,
        "gpu_hours": work / (sustained_tflops * 1e12) / 3600,
        "memory_gb": memory_gb,
    }


def _meta_detector(model):
    import torch

    from colad.detector import Detector

    with torch.device("meta"):
        return Detector(dataclasses.replace(model, weights="none"))


# ----------------------------------------------------------------------------------------------
# The paper's tables as commands

#: Every row of the paper's tables that this library can train, as ``(table, row, arguments of
#: python -m colad)``; all in the ``full`` profile (COCO, 1333x800, ImageNet weights). The
#: chapter "Scaling to COCO and to a cluster" lists them with their estimates.
PAPER_COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("PAA baselines", "PAA-R50 12e", "train paa"),
    ("PAA baselines", "PAA-R50 24e", "train paa --epochs 24"),
    ("PAA baselines", "PAA-R101 12e", "train paa-big"),
    ("PAA baselines", "PAA-R101 24e", "train paa-big --epochs 24"),
    ("PAA baselines", "PAA-R18 12e", "train paa --backbone resnet18"),
    ("Table 2 (pilot)", "soft labels R101 -> R50", "train kd"),
    ("Table 2 (pilot)", "LAD R101 -> R50", "train lad"),
    ("Table 2 (pilot)", "SoLAD R101 -> R50", "train solad"),
    ("Table 3", "soft labels R50 -> R101", "train kd --backbone resnet101 --teacher paa"),
    ("Table 3", "LAD R50 -> R101", "train lad-up"),
    ("Table 7", "CoLAD R50 + R101-COP, 2x (net2 evaluated)", "train colad-cop"),
    *(
        ("Appendix Table 1", f"{row} {backbone}", f"train {name} --backbone {backbone}")
        for backbone in ("efficientnet_b0", "repvgg_a0", "resnet18", "resnet50")
        for row, name in (
            ("IoU", "paa"),
            ("IoU + IOP", "paa-iop"),
            ("IoU + COP", "paa-cop"),
            ("IoU* + IOP", "paa-iop-noiou-infer"),
            ("IoU* + COP", "paa-cop-noiou-infer"),
            ("IOP", "paa-iop-base"),
            ("COP", "paa-cop-base"),
        )
    ),
    ("Appendix Table 2", "LAD R50 -> R18", "train lad --backbone resnet18 --teacher paa"),
    ("Appendix Table 2", "SoLAD R50 -> R18", "train solad --backbone resnet18 --teacher paa"),
    ("Appendix Table 2", "GF R18", "train gfl --backbone resnet18"),
    ("Appendix Table 2", "LD R50 -> R18", "train ld --backbone resnet18 --teacher gfl"),
    ("Appendix Table 2", "LAD R101 -> R18", "train lad --backbone resnet18"),
    ("Appendix Table 2", "CoLAD R101 + R18", "train colad --backbone resnet18 --epochs 12"),
    ("Appendix Table 2", "SoLAD R101 -> R18", "train solad --backbone resnet18"),
    ("Appendix Table 2", "LD R101 -> R18", "train ld --backbone resnet18"),
    ("Appendix Table 2", "CoLAD R101 + R50", "train colad --epochs 12"),
    ("Appendix Table 2", "GF R50", "train gfl"),
    ("Appendix Table 2", "LD R101 -> R50", "train ld"),
)


def experiment_of(arguments: str) -> Experiment:
    """The experiment ``python -m colad ARGUMENTS`` (a ``train`` command) would run in the full
    profile, resolved by the command line's own parser."""
    import shlex

    from colad.cli import build_parser, train_experiment

    words = shlex.split(arguments)
    if words[:1] != ["train"]:
        raise ValueError(f"{arguments!r}: not a train command")
    return train_experiment(build_parser().parse_args([*words, "--profile", "full"]))
