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
from collections.abc import Callable, Sequence
from pathlib import Path

from colad import config, engine
from colad.config import Experiment

__all__ = ["JobSpec", "TrainRun", "submit", "SubmittedRun"]


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
