"""The training engine: schedules, the non-finite guard, checkpoints, resume, the run cache,
DDP under torchrun and the train/eval commands, all on the smoke benchmark."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest
import torch

from colad import config, dist, engine, evaluate
from colad.__main__ import main
from colad.config import Experiment, TrainConfig
from conftest import env_with, torchrun_train

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def smoke(epochs: int = 12, **train) -> Experiment:
    experiment = config.experiment("paa", "smoke")
    schedule = dataclasses.replace(experiment.train, epochs=epochs, **train)
    return dataclasses.replace(experiment, train=schedule)


@pytest.fixture(scope="session")
def finished(data_root) -> engine.RunResult:
    """One complete smoke run (12 epochs, 72 steps), shared by the tests that only read it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLAD_DATA", str(data_root))
        return engine.run(smoke(), progress=False)


# ----------------------------------------------------------------------------------------------
# Schedules and configuration


def test_step_schedule_warms_up_then_divides_by_ten_at_each_step_epoch():
    cfg = TrainConfig(lr=0.01, warmup_steps=10, warmup_ratio=0.001, lr_steps=(8, 11))
    factor = [
        engine.lr_factor(s, cfg, steps_per_epoch=100, total_steps=1200)
        for s in (0, 5, 10, 799, 800, 1099, 1100)
    ]
    assert factor[0] == pytest.approx(0.001)
    assert factor[1] == pytest.approx(0.001 + 0.999 * 0.5)
    assert factor[2:4] == [1.0, 1.0]
    assert factor[4:6] == pytest.approx([0.1, 0.1])
    assert factor[6] == pytest.approx(0.01)


def test_cosine_schedule_falls_from_one_to_zero():
    cfg = TrainConfig(warmup_steps=0, schedule="cosine")
    values = [engine.lr_factor(s, cfg, 10, 100) for s in (0, 50, 100)]
    assert values == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)


def test_bad_schedule_settings_are_rejected():
    with pytest.raises(ValueError, match="schedule='linear'"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="max_nonfinite=0"):
        TrainConfig(max_nonfinite=0)


def test_batch_must_split_over_processes():
    with pytest.raises(ValueError, match="total over all processes"):
        dist.EpochBatchSampler(100, 6, world_size=4)


def test_global_batches_do_not_depend_on_the_number_of_processes():
    one = dist.EpochBatchSampler(40, 8, seed=3)
    two = [dist.EpochBatchSampler(40, 8, rank=r, world_size=2, seed=3) for r in range(2)]
    for sampler in (one, *two):
        sampler.set_epoch(2)
    joined = [a + b for a, b in zip(*two, strict=True)]
    assert list(one) == joined
    one.set_epoch(2, skip=3)
    assert list(one) == joined[3:]
    one.set_epoch(3)
    assert list(one) != joined  # a new order every epoch


# ----------------------------------------------------------------------------------------------
# Training, the cache and checkpoints


def test_short_training_improves_map_over_the_untrained_model(finished, in_data_root):
    _, val = finished.datasets()
    torch.manual_seed(0)
    untrained = engine.build_model(finished.experiment)
    before = evaluate.coco_evaluate(val.ann_file, engine.detect_dataset(untrained, val))
    after = finished.metrics
    assert after["AP50"] > before["AP50"] + 0.01, (before["AP50"], after["AP50"])
    assert after["AP"] > before["AP"], (before["AP"], after["AP"])
    history = finished.history
    assert len(history) == finished.summary["steps"] == 72
    first = sum(h["loss"] for h in history[:6]) / 6
    last = sum(h["loss"] for h in history[-6:]) / 6
    assert last < 0.85 * first


def test_run_files_are_complete_and_consistent(finished):
    files = sorted(p.name for p in finished.path.iterdir())
    assert files == sorted(
        [engine.CHECKPOINT, engine.CONFIG, engine.HISTORY, engine.METRICS, engine.DETECTIONS]
    )
    assert finished.path.name == f"paa-tiny-smoke-{engine.run_key(finished.experiment)}"
    saved = json.loads((finished.path / engine.CONFIG).read_text())
    assert Experiment.from_dict(saved["experiment"]) == finished.experiment
    state = engine.load_checkpoint(finished.checkpoint_path)
    assert state["step"] == state["total_steps"] == 72
    assert set(state) >= {"model", "optimizer", "scheduler", "scaler", "experiment", "epoch"}
    recomputed = evaluate.coco_evaluate(finished.datasets()[1].ann_file, finished.detections_path)
    assert recomputed == pytest.approx(finished.metrics, nan_ok=True)


def test_run_cache_reuses_a_complete_run(finished, in_data_root):
    started = time.perf_counter()
    again = engine.run(finished.experiment, progress=False)
    assert again.reused and again.path == finished.path
    assert again.metrics == finished.metrics
    assert time.perf_counter() - started < 5  # loading, not training (training takes longer)
    changed = smoke(lr=0.02)
    assert engine.run_path(changed) != finished.path  # another setting, another run


def test_run_cache_redoes_partial_and_corrupt_runs(finished, tmp_path, in_data_root):
    partial = tmp_path / "partial"
    shutil.copytree(finished.path, partial)
    (partial / engine.METRICS).unlink()  # killed before the end
    assert engine.load_run(partial, finished.experiment) is None
    with pytest.raises(engine.RunExists, match="unfinished run"):
        engine.run(finished.experiment, path=partial, on_partial="error")
    redone = engine.run(finished.experiment, path=partial, on_partial="restart", progress=False)
    assert not redone.reused
    assert redone.metrics == pytest.approx(finished.metrics, nan_ok=True)  # deterministic

    corrupt = tmp_path / "corrupt"
    shutil.copytree(finished.path, corrupt)
    with open(corrupt / engine.CHECKPOINT, "r+b") as f:
        f.truncate(1000)
    assert engine.load_run(corrupt, finished.experiment) is None
    redone = engine.run(finished.experiment, path=corrupt, progress=False)  # resume -> over
    assert not redone.reused and engine.load_checkpoint(redone.checkpoint_path)["step"] == 72


def test_truncated_checkpoint_is_detected_not_loaded(finished, tmp_path):
    broken = tmp_path / "checkpoint.pt"
    payload = finished.checkpoint_path.read_bytes()
    broken.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(engine.CheckpointError, match="truncated or corrupt"):
        engine.load_checkpoint(broken)
    assert main(["eval", str(broken), "--no-progress"]) == 2


def test_weights_for_another_architecture_are_an_error(finished):
    weights = engine.load_checkpoint(finished.checkpoint_path)["model"]
    wider = dataclasses.replace(finished.experiment.model, fpn_channels=64)
    model = engine.build_model(dataclasses.replace(finished.experiment, model=wider))
    with pytest.raises(engine.CheckpointError, match="does not match the model's architecture"):
        engine.load_weights(model, weights, "the run")
    del weights["head.cls_logits.bias"]
    with pytest.raises(engine.CheckpointError, match="missing: head.cls_logits.bias"):
        engine.load_weights(engine.build_model(finished.experiment), weights, "the run")
    del weights["head.iou_logits.weight"]  # now it looks like a head without the IoU branch
    with pytest.raises(engine.CheckpointError, match="holds a plain PAA head without the IoU"):
        engine.load_weights(engine.build_model(finished.experiment), weights, "the run")


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    engine.save_checkpoint(target, {"format": 1, "model": {}, "experiment": {}, "step": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        engine.save_checkpoint(target, {"step": 2})
    assert engine.load_checkpoint(target)["step"] == 1  # the old one survives
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left


class _Poisoned(torch.nn.Module):
    """Wraps a detector; its losses become NaN on the listed calls."""

    def __init__(self, inner: torch.nn.Module, poisoned: set[int] | None) -> None:
        super().__init__()
        self.inner, self.poisoned, self.calls = inner, poisoned, 0

    def forward(self, images, targets=None):
        out = self.inner(images, targets)
        if self.training:
            if self.poisoned is None or self.calls in self.poisoned:
                out = {k: v * math.nan for k, v in out.items()}
            self.calls += 1
        return out


def test_non_finite_losses_are_skipped_and_counted(in_data_root, tmp_path, monkeypatch):
    build = engine.build_trainee
    monkeypatch.setattr(engine, "build_trainee", lambda e, t: _Poisoned(build(e, t), {2, 3}))
    engine.train(smoke(epochs=1), tmp_path / "run", progress=False, log=lambda m: None)
    summary = json.loads((tmp_path / "run" / engine.METRICS).read_text())
    history = json.loads((tmp_path / "run" / engine.HISTORY).read_text())
    assert summary["skipped_steps"] == 2 and summary["steps"] == 6
    assert [h["step"] for h in history if h.get("skipped")] == [2, 3]
    assert all(math.isfinite(h["loss"]) for h in history if not h.get("skipped"))


def test_repeated_non_finite_losses_stop_the_run(in_data_root, tmp_path, monkeypatch):
    build = engine.build_trainee
    monkeypatch.setattr(engine, "build_trainee", lambda e, t: _Poisoned(build(e, t), None))
    messages = []
    with pytest.raises(engine.TrainingDiverged, match="4 non-finite losses in a row"):
        engine.train(
            smoke(epochs=2, max_nonfinite=4), tmp_path / "run", progress=False, log=messages.append
        )
    assert len(messages) == 4 and "step skipped" in messages[0]
    assert not (tmp_path / "run" / engine.METRICS).exists()  # not a complete run


# ----------------------------------------------------------------------------------------------
# Processes: kill and resume, torchrun


#: ``python -m colad train`` of the smoke baseline, as torchrun's ``-m`` argument too.
SMOKE_TRAIN = "-m colad train paa --profile smoke --no-progress".split()


def _train_command(out: Path, *extra: str) -> list[str]:
    options = ["--epochs", "12", "--checkpoint-every", "3", "--out", str(out)]
    return [sys.executable, *SMOKE_TRAIN, *options, *extra]


def test_a_killed_run_resumes_to_the_uninterrupted_result(finished, data_root, tmp_path):
    out, env = tmp_path / "killed", env_with(data_root)
    process = subprocess.Popen(
        _train_command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if len(json.loads((out / engine.HISTORY).read_text())) >= 12:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / engine.METRICS).exists(), "the run ended before it could be killed"
    killed_at = engine.load_checkpoint(out / engine.CHECKPOINT)["step"]
    assert 12 <= killed_at < 72

    refused = subprocess.run(_train_command(out), env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr

    resumed = subprocess.run(
        _train_command(out, "--resume"), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out.name} at step {killed_at}/72" in resumed.stderr + resumed.stdout
    state = engine.load_checkpoint(out / engine.CHECKPOINT)
    assert state["step"] == 72 and len(state["history"]) == 72
    summary = json.loads((out / engine.METRICS).read_text())
    assert summary["metrics"] == pytest.approx(finished.metrics, abs=1e-3, nan_ok=True)
    assert summary["replica_digests"] == finished.summary["replica_digests"]  # bit for bit


def test_two_gloo_processes_under_torchrun_keep_identical_replicas(data_root, tmp_path):
    out = tmp_path / "ddp"
    summary = torchrun_train(data_root, out, *SMOKE_TRAIN[3:], "--epochs", "2")
    assert summary["world_size"] == 2
    first, second = summary["replica_digests"]
    assert first == second
    result = engine.load_run(out)
    assert result is not None and result.summary["steps"] == 12
    model = result.load_model()
    assert engine._weights_digest(model) == first  # what rank 0 saved is what both ranks had


# ----------------------------------------------------------------------------------------------
# The command line


def test_train_help_gives_the_launch_command_and_the_scaling_rule(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "torchrun --nproc_per_node=8 -m colad train" in text
    assert "lr = 0.01 x batch / 16" in text and "--resume" in text


def test_train_command_reuses_the_run_and_eval_reproduces_its_metrics(
    finished, in_data_root, capsys, tmp_path
):
    assert main(["train", "paa", "--profile", "smoke", "--epochs", "12", "--no-progress"]) == 0
    assert "reused the complete run" in capsys.readouterr().out
    assert main(["eval", str(finished.path), "--no-progress", "--save", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{finished.metrics['AP']:.3f}" in out
    saved = json.loads((tmp_path / engine.METRICS).read_text())
    assert saved == pytest.approx(finished.metrics, nan_ok=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_precision_training_on_cuda(in_data_root, tmp_path):
    engine.train(smoke(epochs=2), tmp_path / "amp", progress=False)
    summary = json.loads((tmp_path / "amp" / engine.METRICS).read_text())
    assert summary["skipped_steps"] == 0 and "CPU" not in summary["device"]


# ----------------------------------------------------------------------------------------------
# Two processes asking for the same run


def test_a_stale_lock_is_taken_over(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process now
    lock = tmp_path / "run.lock"
    lock.write_text(f"{gone.pid} {socket.gethostname()}")
    with engine.exclusive(tmp_path / "run", poll=0.01):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()


def test_a_second_caller_waits_for_the_run_and_reuses_it(finished, tmp_path):
    path, messages = tmp_path / "shared", []
    holding = threading.Event()

    def first_caller():  # trains the run (here: copies a finished one) while holding the lock
        with engine.exclusive(path, log=messages.append):
            holding.set()
            time.sleep(0.5)
            shutil.copytree(finished.path, path)

    thread = threading.Thread(target=first_caller)
    thread.start()
    holding.wait()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            engine, "exclusive", partial(engine.exclusive, poll=0.05, log=messages.append)
        )
        second = engine.run(finished.experiment, path=path, progress=False)
    thread.join()
    assert second.reused and second.metrics == finished.metrics
    assert len(messages) == 1 and "is being trained by process" in messages[0]


def test_command_line_refuses_ambiguous_requests(finished, in_data_root, capsys):
    run_dir = str(finished.path)
    assert main(["train", "--resume", run_dir, "--lr", "0.5"]) == 2
    assert "continues that run with its own settings" in capsys.readouterr().err
    assert main(["eval", run_dir, "--save", run_dir, "--no-progress"]) == 2
    assert "is a run directory" in capsys.readouterr().err
    assert engine.load_run(finished.path, finished.experiment) is not None  # untouched
    assert main(["train", "--resume", run_dir, "--no-progress"]) == 0  # its own settings
    assert f"reused the complete run in {run_dir}" in capsys.readouterr().out


def test_the_run_key_follows_code_not_comments_docstrings_or_formatting(tmp_path):
    def digest(text: str) -> str:
        module = tmp_path / "module.py"
        module.write_text(text)
        stat = module.stat()
        return engine._code_digest(str(module), stat.st_mtime_ns, stat.st_size)

    code = '"""Module."""\n\n\ndef f(x):\n    """Double."""\n    return 2 * x  # twice\n'
    reworded = (
        '"""Another text."""\n\n\ndef f(x):\n    """Two times x."""\n'
        "    return (2\n            * x)\n"
    )
    changed = '"""Module."""\n\n\ndef f(x):\n    """Double."""\n    return 3 * x  # twice\n'
    class_only_doc = 'class A:\n    """Only a docstring."""\n'
    assert digest(code) == digest(reworded)
    assert digest(code) != digest(changed)
    assert digest(class_only_doc) == digest("class A:\n    pass\n")
    # the library's key covers the top-level modules that train and evaluate; not the sweep
    # runner, nor the figures (the colad.viz package: source_key reads top-level modules only)
    package = Path(engine.__file__).parent
    hashed = {m.name for m in package.glob("*.py")} - set(engine.NOT_IN_KEY)
    assert {"engine.py", "paa.py", "distill.py"} <= hashed and "sweep.py" not in hashed
    assert (package / "viz" / "__init__.py").is_file() and "viz.py" not in hashed


def test_log_lines_name_runs_by_the_data_root_not_the_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("COLAD_DATA", str(tmp_path))
    run = tmp_path / "runs" / "paa-tiny-quick-0123456789"
    assert engine.shown_path(run) == "$COLAD_DATA/runs/paa-tiny-quick-0123456789"
    assert str(tmp_path) not in engine.shown_path(run)
    assert engine.shown_path(Path("/elsewhere/run")) == "/elsewhere/run"
