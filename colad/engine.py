"""Training and evaluation, checkpoints and the run cache.

:func:`run` is what chapters and the command line call: give it an :class:`~colad.config.Experiment`
and it returns a :class:`RunResult` (metrics, per-step history, detections, checkpoint), training
only when no complete run with the same key exists under ``<data root>/runs/<name>-<key>/``. The
key hashes the experiment and the library's source, so a number in the book always comes from
the code in the book.

One run directory holds::

    config.json      the experiment and its key (written first)
    checkpoint.pt    model, optimizer, scheduler, AMP scaler, step, history (rewritten atomically)
    history.json     one record per training step
    detections.json  the validation detections, COCO results format
    metrics.json     COCO metrics and run facts; written last, it marks the run complete

The same code runs on one process or many (``torchrun``; see :mod:`colad.dist`): every process
trains its share of each batch, rank 0 logs and writes, and evaluation is gathered to rank 0.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.models.detection.image_list import ImageList
from tqdm.auto import tqdm

from colad import config, data, dist, evaluate
from colad.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from colad.config import Experiment, TrainConfig
from colad.data import collate

__all__ = [
    "get_device",
    "seed_everything",
    "lr_factor",
    "build_datasets",
    "build_model",
    "CheckpointError",
    "TrainingDiverged",
    "RunExists",
    "save_checkpoint",
    "load_checkpoint",
    "load_weights",
    "train",
    "detect_dataset",
    "source_key",
    "run_key",
    "run_path",
    "RunResult",
    "load_run",
    "exclusive",
    "run",
]

CHECKPOINT, CONFIG, HISTORY, METRICS, DETECTIONS = (
    "checkpoint.pt",
    "config.json",
    "history.json",
    "metrics.json",
    "detections.json",
)


def get_device() -> torch.device:
    """CUDA if present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 -- seeds code that uses the global generator
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Building blocks


def lr_factor(step: int, train: TrainConfig, steps_per_epoch: int, total_steps: int) -> float:
    """The learning rate at ``step`` as a fraction of ``train.lr``.

    A linear warm-up from ``warmup_ratio`` to 1 over ``warmup_steps``, multiplied by the decay:
    0.1 for every epoch of ``lr_steps`` already passed (``"step"``), or half a cosine from 1 to 0
    over ``total_steps`` (``"cosine"``).
    """
    warm = 1.0
    if step < train.warmup_steps:
        warm = train.warmup_ratio + (1 - train.warmup_ratio) * step / train.warmup_steps
    if train.schedule == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    else:
        decay = 0.1 ** sum(step >= epoch * steps_per_epoch for epoch in train.lr_steps)
    return warm * decay


def build_datasets(experiment: Experiment) -> tuple[data.CocoDetection, data.CocoDetection, str]:
    """The training set (with its augmentation, images without objects left out), the
    validation set and a line naming the data."""
    cfg = experiment.data
    paths = {split: data.split_paths(cfg.profile, split) for split in ("train", "val")}
    train_set = data.CocoDetection(
        paths["train"].ann_file,
        paths["train"].image_dir,
        data.train_transforms(cfg.min_size, cfg.max_size, hflip=cfg.hflip),
        drop_empty=True,
    )
    val_set = data.CocoDetection(
        paths["val"].ann_file,
        paths["val"].image_dir,
        data.eval_transforms(cfg.min_size, cfg.max_size),
    )
    if train_set.num_classes != experiment.model.num_classes:
        raise ValueError(
            f"experiment {experiment.name!r} has num_classes={experiment.model.num_classes} but "
            f"{paths['train'].ann_file} has {train_set.num_classes} categories "
            f"(data: {paths['train'].source})"
        )
    return train_set, val_set, paths["train"].source


def build_model(experiment: Experiment) -> nn.Module:
    """The network an experiment trains (PAA assigning for itself: ``method="baseline"``)."""
    from colad.detector import Detector

    if experiment.method != "baseline":
        raise ValueError(f"method {experiment.method!r} is not implemented; use 'baseline'")
    return Detector(experiment.model)


# ----------------------------------------------------------------------------------------------
# Failures


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


class RunExists(RuntimeError):
    """An unfinished run is in the way and nobody said whether to resume or restart it."""


# ----------------------------------------------------------------------------------------------
# Training


def _to_device(device: torch.device, images, targets):
    non_blocking = device.type == "cuda"
    images = ImageList(images.tensors.to(device, non_blocking=non_blocking), images.image_sizes)
    targets = [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in targets]
    return images, targets


def _weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _write_json(path: Path, payload) -> None:
    """Write json atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


@torch.inference_mode()
def detect_dataset(
    model: nn.Module,
    dataset: data.CocoDetection,
    *,
    batch_size: int = 8,
    env: dist.DistEnv | None = None,
    progress: bool = False,
    num_workers: int = 0,
) -> list[dict]:
    """Detections on every image of ``dataset`` as COCO result dicts (original image pixels).

    Under ``torchrun`` each process detects its share and every process gets the whole list.
    """
    env = env or dist.current()
    was_training = model.training
    model.eval()
    shard = Subset(dataset, dist.shard_indices(len(dataset), env))
    loader = DataLoader(shard, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    results = []
    bar = tqdm(loader, desc="evaluating", leave=False, disable=not (progress and env.is_main))
    for images, targets in bar:
        detections = model(images.to(env.device))
        results += evaluate.detections_to_coco(detections, targets, dataset.index.category_ids)
    model.train(was_training)
    return dist.gather_lists(results)


def _ema(previous: float, value: float, rate: float = 0.1) -> float:
    return value if math.isnan(previous) else (1 - rate) * previous + rate * value


@dataclass
class _Progress:
    """Rank 0's progress bar, showing the smoothed loss and the throughput."""

    bar: tqdm
    loss: float = math.nan
    speed: float = math.nan

    def update(self, record: dict, images: int) -> None:
        if math.isfinite(record["loss"]):
            self.loss = _ema(self.loss, record["loss"])
        self.speed = _ema(self.speed, images / max(record["seconds"], 1e-9))
        self.bar.set_postfix(loss=f"{self.loss:.3f}", img_s=f"{self.speed:.1f}", refresh=False)
        self.bar.update()


def train(
    experiment: Experiment,
    path: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    checkpoint_every: int = 0,
    checkpoint_minutes: float = 20.0,
    log: Callable[[str], None] | None = None,
) -> None:
    """Train ``experiment`` into the run directory ``path``, evaluate it, and write the run's
    files (see the module docstring). :func:`run` is the usual entry point.

    Args:
        resume: continue from ``path/checkpoint.pt`` (its experiment must be this one). A
            checkpoint that cannot be read is reported and training starts over.
        checkpoint_every: also checkpoint every this many steps (0: at the end of each epoch
            and every ``checkpoint_minutes`` only).
        log: where rank 0's messages go (default: above the progress bar).

    Raises:
        TrainingDiverged: ``max_nonfinite`` non-finite losses in a row.
        CheckpointError: the checkpoint to resume belongs to another experiment.
    """
    path = Path(path)
    env = dist.current()
    cfg = experiment.train
    log = log or tqdm.write
    say = log if env.is_main else (lambda message: None)
    seed_everything(cfg.seed)
    train_set, val_set, source = build_datasets(experiment)
    model = build_model(experiment).to(env.device)
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(train_set)} training images cannot fill one batch of {cfg.batch_size}"
        )
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    schedule = partial(
        lr_factor, train=cfg, steps_per_epoch=steps_per_epoch, total_steps=total_steps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    use_amp = cfg.amp and env.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    step, history, per_epoch, nonfinite, seconds = 0, [], [], 0, 0.0

    checkpoint_file = path / CHECKPOINT
    if resume and checkpoint_file.exists():
        try:
            state = load_checkpoint(checkpoint_file)
        except CheckpointError as e:
            say(f"{e}; starting the run over")
        else:
            if state["experiment"] != _plain(experiment):
                raise CheckpointError(
                    f"{checkpoint_file} belongs to another experiment "
                    f"({state['experiment'].get('name')!r}); not resuming"
                )
            load_weights(model, state["model"], str(checkpoint_file))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            step, history = state["step"], list(state["history"])
            per_epoch, seconds = list(state["per_epoch"]), state["train_seconds"]
            nonfinite = state["nonfinite_in_a_row"]
            say(f"resuming {path.name} at step {step}/{total_steps}")
    if env.is_main:
        path.mkdir(parents=True, exist_ok=True)
        payload = {"experiment": experiment.to_dict(), "key": run_key(experiment), "data": source}
        _write_json(path / CONFIG, payload)

    net = model
    if env.distributed:
        ids = [env.local_rank] if env.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    sampler = dist.EpochBatchSampler(
        len(train_set), cfg.batch_size, rank=env.rank, world_size=env.world_size, seed=cfg.seed
    )
    loader = DataLoader(
        dist.SeededItems(train_set, cfg.seed),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=experiment.data.num_workers,
        pin_memory=env.device.type == "cuda",
    )

    def save() -> None:
        if env.is_main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "experiment": _plain(experiment),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "epoch": step // steps_per_epoch,
                "total_steps": total_steps,
                "history": history,
                "per_epoch": per_epoch,
                "train_seconds": seconds,
                "nonfinite_in_a_row": nonfinite,
            }
            save_checkpoint(checkpoint_file, state)
            _write_json(path / HISTORY, history)

    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=experiment.name,
        dynamic_ncols=True,
        disable=not (progress and env.is_main),
    )
    shown = _Progress(bar)
    last_save = time.monotonic()
    model.train()
    while step < total_steps:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch, skip=step % steps_per_epoch)
        tick = time.perf_counter()  # a step's time includes waiting for its batch
        for images, targets in loader:
            images, targets = _to_device(env.device, images, targets)
            with torch.autocast(env.device.type, dtype=torch.float16, enabled=use_amp):
                losses = net(images, targets)
            loss = sum(losses.values())
            names = ["loss", *losses]
            values = dist.mean_across(torch.stack([loss, *losses.values()]).float())
            record = {
                "step": step,
                "epoch": epoch,
                "lr": scheduler.get_last_lr()[0],
                **dict(zip(names, values.tolist(), strict=True)),
            }
            if math.isfinite(record["loss"]):
                nonfinite = 0
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
            else:
                nonfinite += 1
                record["skipped"] = True
                parts = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k.startswith("loss"))
                say(
                    f"step {step}: non-finite loss ({parts}); step skipped "
                    f"({nonfinite} in a row, the run stops at {cfg.max_nonfinite})"
                )
            with warnings.catch_warnings():
                # Skipped steps (ours, or the AMP scaler's) advance the schedule without an
                # optimizer step, which is what we want; PyTorch warns about it.
                warnings.filterwarnings(
                    "ignore", "Detected call of `lr_scheduler.step", UserWarning
                )
                scheduler.step()
            if env.device.type == "cuda":
                torch.cuda.synchronize(env.device)
            record["seconds"] = time.perf_counter() - tick
            seconds += record["seconds"]
            history.append(record)
            step += 1
            if env.is_main:
                shown.update(record, cfg.batch_size)
            if nonfinite >= cfg.max_nonfinite:
                save()
                raise TrainingDiverged(
                    f"{experiment.name}: {nonfinite} non-finite losses in a row (last at step "
                    f"{step - 1}); the run stopped. Lower the learning rate ({cfg.lr}) or set "
                    f"grad_clip; the checkpoint before the failure is in {path}"
                )
            epoch_done = step % steps_per_epoch == 0 or step == total_steps
            if epoch_done and cfg.eval_every_epoch and step < total_steps:
                detections = detect_dataset(
                    model, val_set, env=env, batch_size=max(1, cfg.batch_size // env.world_size)
                )
                if env.is_main:
                    metrics = evaluate.coco_evaluate(val_set.ann_file, detections)
                    per_epoch.append({"epoch": epoch + 1, "step": step, **metrics})
                    say(f"epoch {epoch + 1}: AP {metrics['AP']:.3f}, AP50 {metrics['AP50']:.3f}")
            due = checkpoint_every and step % checkpoint_every == 0
            late = time.monotonic() - last_save > 60 * checkpoint_minutes
            if epoch_done or due or late:
                save()
                last_save = time.monotonic()
            if step >= total_steps:
                break
            tick = time.perf_counter()
    bar.close()

    started = time.perf_counter()
    detections = detect_dataset(
        model,
        val_set,
        env=env,
        progress=progress,
        batch_size=max(1, cfg.batch_size // env.world_size),
    )
    digests = dist.gather_lists([_weights_digest(model)])
    if env.is_main:
        metrics = evaluate.coco_evaluate(val_set.ann_file, detections)
        evaluate.write_detections(detections, path / DETECTIONS)
        summary = {
            "complete": True,
            "key": run_key(experiment),
            "name": experiment.name,
            "metrics": metrics,
            "per_epoch": per_epoch,
            "steps": step,
            "skipped_steps": sum(1 for h in history if h.get("skipped")),
            "train_seconds": round(seconds, 2),
            "eval_seconds": round(time.perf_counter() - started, 2),
            "images_per_second": round(cfg.batch_size * len(history) / max(seconds, 1e-9), 2),
            "device": _describe_device(env),
            "world_size": env.world_size,
            "replica_digests": digests,
            "data": source,
            "checkpoint_bytes": checkpoint_file.stat().st_size,
        }
        _write_json(path / METRICS, summary)
        say(
            f"{experiment.name}: AP {metrics['AP']:.3f}, AP50 {metrics['AP50']:.3f} "
            f"({step} steps, {seconds:.0f} s) -> {path}"
        )
    dist.barrier()


def _describe_device(env: dist.DistEnv) -> str:
    if env.device.type == "cuda":
        name = torch.cuda.get_device_name(env.device)
    else:
        name = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return f"{env.world_size} x {name}" if env.distributed else name


# ----------------------------------------------------------------------------------------------
# The run cache


def source_key(*parts) -> str:
    """A short hash of ``parts`` (json-serialisable) and of every module of the library, so that a
    cached result is redone whenever the code that made it changes."""
    digest = hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode())
    for module in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(module.read_bytes())
    return digest.hexdigest()[:10]


def _plain(experiment: Experiment) -> dict:
    """The experiment as json reads it back (lists, not tuples), for comparisons."""
    return json.loads(json.dumps(experiment.to_dict()))


def run_key(experiment: Experiment) -> str:
    """The cache key of a run: the experiment's settings and the library's source."""
    return source_key(experiment.to_dict())


def run_path(experiment: Experiment) -> Path:
    """``<data root>/runs/<name>-<key>``."""
    return config.data_root() / "runs" / f"{experiment.name}-{run_key(experiment)}"


@dataclass
class RunResult:
    """A finished run, as :func:`run` returns it.

    Attributes:
        experiment: what was run.
        path: the run directory.
        metrics: COCO metrics of the validation split (:func:`colad.evaluate.coco_evaluate`).
        history: one dict per training step (``step``, ``epoch``, ``lr``, ``loss``, each
            ``loss_*``, ``seconds``; ``skipped`` on skipped steps).
        summary: the whole ``metrics.json`` (steps, timings, device, data, ...).
        reused: loaded from the cache rather than trained by this call.
    """

    experiment: Experiment
    path: Path
    metrics: dict[str, float]
    history: list[dict]
    summary: dict
    reused: bool

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def detections_path(self) -> Path:
        return self.path / DETECTIONS

    def load_model(self, device: str | torch.device = "cpu") -> nn.Module:
        """The trained network, in eval mode."""
        model = build_model(self.experiment)
        load_weights(
            model, load_checkpoint(self.checkpoint_path)["model"], str(self.checkpoint_path)
        )
        return model.to(device).eval()

    def datasets(self) -> tuple[data.CocoDetection, data.CocoDetection]:
        """The run's training and validation sets (with their transforms)."""
        train_set, val_set, _ = build_datasets(self.experiment)
        return train_set, val_set


def _read_json(file: Path):
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def load_run(path: str | Path, experiment: Experiment | None = None) -> RunResult | None:
    """The complete run in ``path``, or ``None`` when it is missing, partial or corrupt.

    Complete means: ``metrics.json`` marks it complete (with ``experiment``'s key when given),
    ``config.json`` names the same experiment, ``history.json`` and ``detections.json`` parse,
    and the checkpoint has the size recorded when the run finished.
    """
    path = Path(path)
    summary, saved = _read_json(path / METRICS), _read_json(path / CONFIG)
    if not isinstance(summary, dict) or summary.get("complete") is not True:
        return None
    if not isinstance(saved, dict) or "experiment" not in saved:
        return None
    if experiment is not None and (
        summary.get("key") != run_key(experiment) or saved["experiment"] != _plain(experiment)
    ):
        return None
    history = _read_json(path / HISTORY)
    checkpoint = path / CHECKPOINT
    if not isinstance(history, list) or _read_json(path / DETECTIONS) is None:
        return None
    if not checkpoint.is_file() or checkpoint.stat().st_size != summary.get("checkpoint_bytes"):
        return None
    try:
        experiment = experiment or Experiment.from_dict(saved["experiment"])
    except (ValueError, TypeError):
        return None
    return RunResult(experiment, path, summary["metrics"], history, summary, reused=True)


def _lock_holder(lock: Path) -> str | None:
    """Who holds ``lock`` (``"pid on host"``), or ``None`` if it is stale or unreadable."""
    try:
        pid_text, host = lock.read_text().split(maxsplit=1)
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # it exists, under another user
    return f"{pid} on {host}"


@contextlib.contextmanager
def exclusive(path: Path, *, poll: float = 2.0, log: Callable[[str], None] | None = None):
    """Hold ``<path>.lock`` while the block runs, waiting while a live process holds it.

    A lock left by a process that no longer exists (killed, crashed) is taken over. The lock
    file holds the owner's pid and host; on another host the owner cannot be checked and is
    assumed alive.
    """
    log = log or tqdm.write
    lock = path.parent / f"{path.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    waiting = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is None:
                lock.unlink(missing_ok=True)  # stale
                continue
            if not waiting:
                log(f"{path.name} is being trained by process {holder}; waiting for it")
                waiting = True
            time.sleep(poll)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}")
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def run(
    experiment: Experiment,
    *,
    path: str | Path | None = None,
    redo: bool = False,
    on_partial: str = "resume",
    progress: bool = True,
    checkpoint_every: int = 0,
) -> RunResult:
    """Train and evaluate ``experiment``, or load its results if a complete run exists.

    Args:
        path: the run directory (default :func:`run_path`).
        redo: train again even if a complete run exists (its directory is emptied).
        on_partial: what to do with an unfinished run in ``path``: ``"resume"`` it from its
            checkpoint (a checkpoint that cannot be read means starting over), ``"restart"`` it,
            or raise :class:`RunExists` (``"error"``).
        progress: show a progress bar.
        checkpoint_every: see :func:`train`.

    Under ``torchrun`` every process calls this; rank 0 writes and all return the result.
    Otherwise a second process asking for a run that another one is training (two notebooks,
    say) waits for it (:func:`exclusive`) and then loads the result.
    """
    if on_partial not in ("resume", "restart", "error"):
        raise ValueError(f"on_partial={on_partial!r}; choose 'resume', 'restart' or 'error'")
    env = dist.current()
    path = Path(path) if path is not None else run_path(experiment)
    if not redo and (done := load_run(path, experiment)) is not None:
        return done
    # Two notebooks asking for the same run: the second waits for the first, then loads its
    # result. (Under torchrun the processes of one job train together; no lock.)
    lock = contextlib.nullcontext() if env.distributed else exclusive(path)
    with lock:
        if not redo and (done := load_run(path, experiment)) is not None:
            return done  # finished by the process we waited for
        leftovers = path.is_dir() and any(path.iterdir())
        resume = False
        if leftovers and not redo:
            checkpoint = path / CHECKPOINT
            if on_partial == "error":
                state = "with a checkpoint" if checkpoint.exists() else "without a checkpoint"
                raise RunExists(f"{path} holds an unfinished run ({state})")
            resume = on_partial == "resume"
        if leftovers and (redo or not resume):
            if env.is_main:
                shutil.rmtree(path)
            dist.barrier()
        train(experiment, path, resume=resume, progress=progress, checkpoint_every=checkpoint_every)
    result = load_run(path, experiment)
    if result is None:
        raise RuntimeError(f"{path}: the run finished but its files are incomplete")
    result.reused = False
    return result
