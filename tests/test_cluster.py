"""Sweeps submitted as jobs through submitit: the local executor end to end, and the SLURM
parameters (partition, GPUs, dependencies) with a recording stand-in for the executor."""

from __future__ import annotations

import json
import os

import pytest

from colad import cluster, config, engine, sweep
from colad.__main__ import main

pytestmark = pytest.mark.slow


@pytest.fixture
def fresh_root(data_root, tmp_path, monkeypatch):
    """An empty run cache beside the session's generated smoke benchmark."""
    (tmp_path / "synth").symlink_to(data_root / "synth", target_is_directory=True)
    monkeypatch.setenv("COLAD_DATA", str(tmp_path))
    return tmp_path


def test_sweep_through_submitits_local_executor_trains_teacher_then_student(fresh_root, capsys):
    argv = ["sweep", "lad", "--seeds", "0", "--profile", "smoke", "--slurm", "local",
            "--gpus-per-node", "0", "--cpus-per-task", "1", "--cpu", "--wait",
            "--slurm-folder", str(fresh_root / "slurm")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "paa seed 0: job " in out and "lad seed 0: job " in out
    assert out.index("paa seed 0: job") < out.index("lad seed 0: job")
    assert "lad   model" in out or "lad  model" in out  # the summary table of the finished runs
    for name in ("paa", "lad"):
        path = engine.run_path(config.experiment(name, "smoke"))
        assert engine.load_run(path) is not None, f"{name} did not finish"
    logs = list((fresh_root / "slurm").glob("*/*_log.out"))
    assert len(logs) == 2
    # submitting again finds both complete and submits nothing
    assert main(argv) == 0
    assert "nothing to submit" in capsys.readouterr().out


def test_a_preempted_job_requeues_the_same_run():
    import submitit

    experiment = config.experiment("paa", "smoke")
    job = cluster.TrainRun(experiment, engine.run_path(experiment))
    again = job.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert again.function is job  # the same run directory: engine.run resumes it


class _RecordingExecutor:
    """Stands in for submitit.AutoExecutor on a machine without SLURM."""

    made: list[_RecordingExecutor] = []

    def __init__(self, folder, cluster=None):
        self.folder, self.cluster, self.parameters, self.jobs = folder, cluster, {}, []
        _RecordingExecutor.made.append(self)

    def update_parameters(self, **kwargs):
        self.parameters.update(kwargs)

    def submit(self, function):
        job = type("Job", (), {"job_id": str(100 + len(self.jobs))})()
        self.jobs.append((dict(self.parameters), function, job))
        return job


def test_slurm_jobs_ask_for_the_gpus_and_wait_for_their_teacher(fresh_root, monkeypatch):
    import submitit

    monkeypatch.setattr(submitit, "AutoExecutor", _RecordingExecutor)
    spec = cluster.JobSpec(partition="gpu", nodes=2, gpus_per_node=8, hours=24)
    runs = sweep.plan(["lad"], (0, 1), profile="full")
    lines = []
    submitted = cluster.submit(runs, spec, log=lines.append)
    (executor,) = _RecordingExecutor.made[-1:]
    teacher = config.experiment("lad", "full").distill.teacher  # PAA-R101 in full
    assert executor.cluster == "slurm" and [s.name for s in submitted] == [teacher, "lad", "lad"]
    first, *students = executor.jobs
    assert first[0]["slurm_partition"] == "gpu" and first[0]["tasks_per_node"] == 8
    assert first[0]["nodes"] == 2 and first[0]["timeout_min"] == 24 * 60
    assert not first[0].get("slurm_additional_parameters")
    for parameters, function, _ in students:
        assert parameters["slurm_additional_parameters"] == {"dependency": "afterok:100"}
        assert json.loads(json.dumps(function.experiment))["method"] == "lad"
    assert any("after job 100" in line for line in lines)
    with pytest.raises(ValueError, match="partition"):
        cluster.JobSpec(partition="")
    assert os.environ["COLAD_DATA"] == str(fresh_root)


def test_the_full_books_runs_go_to_slurm_in_one_command(fresh_root, monkeypatch, capsys):
    import submitit

    monkeypatch.setattr(submitit, "AutoExecutor", _RecordingExecutor)
    assert main(["sweep", "book", "--profile", "full", "--slurm", "gpu"]) == 0
    (executor,) = _RecordingExecutor.made[-1:]
    planned = sweep.book_plan("full")
    assert len(executor.jobs) == len(planned) > 50  # none complete in an empty run cache
    names = {json.loads(json.dumps(f.experiment))["name"] for _, f, _ in executor.jobs}
    assert names == {e.name for _, _, e in planned}
    assert f"{len(planned)} job(s) submitted" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# The paper's commands and their estimates


def test_every_paper_command_resolves_to_a_full_profile_experiment():
    rows = [(table, row) for table, row, _ in cluster.PAPER_COMMANDS]
    assert len(set(rows)) == len(rows)
    for _, row, arguments in cluster.PAPER_COMMANDS:
        experiment = cluster.experiment_of(arguments)
        assert experiment.data.profile == "full" and experiment.model.weights == "imagenet", row
        for part in row.split():
            if part.startswith("R") and part[1:].isdigit():  # every network the row names
                backbones = [experiment.model.backbone]
                if experiment.distill.network2 is not None:
                    backbones.append(experiment.distill.network2.backbone)
                if experiment.distill.teacher:
                    teacher = config.experiment(experiment.distill.teacher, "full")
                    backbones.append(teacher.model.backbone)
                assert f"resnet{part[1:]}" in backbones, (row, backbones)
    assert cluster.experiment_of("train paa-big --epochs 24").train.epochs == 24
    with pytest.raises(ValueError, match="not a train command"):
        cluster.experiment_of("eval somewhere")


def test_estimates_add_up_from_counted_flops():
    paa = cluster.estimate(cluster.experiment_of("train paa"))
    big = cluster.estimate(cluster.experiment_of("train paa-big"))
    lad = cluster.estimate(cluster.experiment_of("train lad"))  # R101 teaches R50
    assert 300 < paa["forward_gflops"] < 600 and big["forward_gflops"] > paa["forward_gflops"]
    images = cluster.COCO_TRAIN_IMAGES * 12
    assert paa["pflops"] == pytest.approx(3 * paa["forward_gflops"] * 1e9 * images / 1e15)
    # the student trains (forward and backward), the teacher only runs forward
    expected = (3 * paa["forward_gflops"] + big["forward_gflops"]) * 1e9 * images / 1e15
    assert lad["pflops"] == pytest.approx(expected) and lad["networks"] == 2
    fast = cluster.estimate(cluster.experiment_of("train paa"), sustained_tflops=100.0)
    assert fast["gpu_hours"] == pytest.approx(paa["gpu_hours"] / 2)
    twice = cluster.estimate(cluster.experiment_of("train paa --epochs 24"))
    assert twice["gpu_hours"] == pytest.approx(2 * paa["gpu_hours"])
    assert paa["memory_gb"] == 3.7 and big["memory_gb"] == 6.2 and lad["memory_gb"] > 3.7
    assert cluster.estimate(cluster.experiment_of("train paa-cop"))["memory_gb"] is None
