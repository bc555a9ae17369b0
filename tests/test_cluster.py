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
