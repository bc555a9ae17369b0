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

import ast
import contextlib
import dataclasses
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
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision.models.detection.image_list import ImageList
from tqdm.auto import tqdm

from colad import config, data, dist, evaluate, status
from colad.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from colad.config import Experiment, TrainConfig
from colad.data import collate
from colad.distill import build_trainee, check_teacher, freeze, networks

__all__ = [
    "get_device",
    "seed_everything",
    "lr_factor",
    "build_datasets",
    "network_names",
    "build_model",
    "network_weights",
    "build_trainee",
    "teacher_key",
    "load_teacher",
    "CheckpointError",
    "TrainingDiverged",
    "RunExists",
    "save_checkpoint",
    "load_checkpoint",
    "load_weights",
    "train",
    "detect_dataset",
    "detections_file",
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


def lr_factor(
    step: int,
    train: TrainConfig,
    steps_per_epoch: int,
    total_steps: int,
) -> float:
    """The learning rate at ``step`` as a fraction of ``train.lr``.

    A linear warm-up from ``warmup_ratio`` to 1 over ``warmup_steps``, multiplied by the
    decay: 0.1 for every epoch of ``lr_steps`` already passed (``"step"``), or half a
    cosine from 1 to 0 over ``total_steps`` (``"cosine"``).
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
    paths = {split: data.dataset_paths(cfg, split) for split in ("train", "val")}
    train_set = data.CocoDetection(
        paths["train"].ann_file,
        paths["train"].image_dir,
        data.train_transforms(
            cfg.min_size, cfg.max_size, hflip=cfg.hflip, min_sizes=cfg.train_min_sizes
        ),
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


def network_names(experiment: Experiment) -> list[str]:
    """The networks a run trains and evaluates: ``["net1", "net2"]`` for CoLAD, else
    ``["model"]`` (a student included). The first one's metrics are the run's."""
    return ["net1", "net2"] if experiment.method == "colad" else ["model"]


def build_model(experiment: Experiment, network: str | None = None) -> nn.Module:
    """A new detector of one of the experiment's networks (default: the first of
    :func:`network_names`), to evaluate or to load weights into."""
    from colad.detector import Detector

    names = network_names(experiment)
    network = network or names[0]
    if network not in names:
        raise ValueError(f"{experiment.name} has networks {', '.join(names)}, not {network!r}")
    return Detector(experiment.distill.network2 if network == "net2" else experiment.model)


def network_weights(weights: dict, experiment: Experiment, network: str | None = None) -> dict:
    """The weights of one network from a checkpoint's ``model`` entry (CoLAD's hold both)."""
    network = network or network_names(experiment)[0]
    if network == "model":
        return weights
    prefix = f"{network}."
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------------------------
# Teachers


def teacher_source(experiment: Experiment) -> Experiment | Path:
    """What ``distill.teacher`` names: a named experiment (its run in the same profile) or an
    existing run directory or checkpoint."""
    spec = experiment.distill.teacher
    if spec in config.EXPERIMENTS:  # trained on the student's data, own dataset included
        teacher = config.experiment(spec, experiment.data.profile)
        if experiment.data.custom:
            teacher = config.on_dataset(teacher, **experiment.data.files)
        return teacher
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(
            f"{experiment.name}: teacher {spec!r} is neither a named experiment "
            f"({', '.join(config.EXPERIMENTS)}) nor an existing run directory or checkpoint"
        )
    if path.is_dir() and load_run(path) is None:
        raise ValueError(
            f"{experiment.name}: teacher run {path} is not a complete run (no metrics.json "
            "marking it complete, or its files do not match); finish it with "
            f"`python -m colad train --resume {path}`"
        )
    return path


def teacher_key(experiment: Experiment) -> str | None:
    """What identifies the teacher in the student's run key: the teacher run's own key, or a
    checkpoint file's hash (``None`` without a teacher)."""
    if not experiment.distill.teacher:
        return None
    source = teacher_source(experiment)
    if isinstance(source, Experiment):
        return run_key(source)
    if source.is_dir():
        return load_run(source).summary["key"]
    stat = source.stat()
    return _file_digest(str(source), stat.st_mtime_ns, stat.st_size)[:10]


def load_teacher(experiment: Experiment, *, progress: bool = True) -> nn.Module:
    """The experiment's teacher, loaded strictly, checked against the student and frozen.

    A named teacher is taken from the run cache and trained first if it is not there.

    Raises:
        ValueError: no such teacher, one of the wrong head type for the method (LD needs GFL,
            LAD and soft labels PAA), or one whose anchors, classes or top-k differ from the
            student's.
        CheckpointError: the teacher's checkpoint is unreadable or does not fit its own
            architecture.
    """
    source = teacher_source(experiment)
    if isinstance(source, Experiment):
        model, name = run(source, progress=progress).load_model(), source.name
    elif source.is_dir():
        model, name = load_run(source).load_model(), str(source)
    else:
        state = load_checkpoint(source)
        try:
            saved = Experiment.from_dict(state["experiment"])
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{source}: its experiment cannot be read ({e})") from None
        model, name = build_model(saved), str(source)
        load_weights(model, network_weights(state["model"], saved), str(source))
    check_teacher(model.config, experiment, name)
    return freeze(model)


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


@dataclass
class _Loop:
    """What a run carries from step to step, and what its checkpoint restores."""

    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    per_epoch: list = dataclasses.field(default_factory=list)
    nonfinite: int = 0  # non-finite losses in a row
    seconds: float = 0.0  # training time so far

    def save(self) -> dict:
        return {"step": self.step, "history": self.history, "per_epoch": self.per_epoch,
                "train_seconds": self.seconds, "nonfinite_in_a_row": self.nonfinite}  # fmt: skip

    def restore(self, state: dict) -> None:
        self.step, self.history = state["step"], list(state["history"])
        self.per_epoch, self.seconds = list(state["per_epoch"]), state["train_seconds"]
        self.nonfinite = state["nonfinite_in_a_row"]


def _optimise(net, images, targets, optimizer, scaler, params, cfg: TrainConfig, use_amp: bool):
    """One step: the method's losses (through the possibly DDP-wrapped ``net``), their mean over
    the processes for the record, and the update unless the loss is not finite.

    Returns the step's record (without timing), with ``skipped`` when there was no update.
    Entries of the method's output that are not ``loss_*`` (CoLAD's switch statistics) are
    recorded but never back-propagated.
    """
    with torch.autocast(images.tensors.device.type, dtype=torch.float16, enabled=use_amp):
        outputs = net(images, targets)
    losses = {k: v for k, v in outputs.items() if k.startswith("loss_")}
    loss = sum(losses.values())
    names = ["loss", *losses, *(k for k in outputs if k not in losses)]
    values = [loss, *losses.values(), *(v for k, v in outputs.items() if k not in losses)]
    record = dict(zip(names, dist.mean_across(torch.stack(values).float()).tolist(), strict=True))
    if math.isfinite(record["loss"]):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        record["skipped"] = True
    return record


def _evaluate_networks(trainee, val_set, env, *, batch_size: int, progress: bool = False):
    """Detections and COCO metrics (rank 0 only) of every network the run trains."""
    results = {}
    for name, network in networks(trainee).items():
        detections = detect_dataset(
            network, val_set, env=env, progress=progress, batch_size=batch_size
        )
        metrics = evaluate.coco_evaluate(val_set.ann_file, detections) if env.is_main else None
        results[name] = (detections, metrics)
    return results


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

    The experiment's method decides what one step trains (:mod:`colad.distill`): one network,
    a student beside its frozen teacher (loaded, or trained through the run cache, first), or
    CoLAD's two networks; all of them are checkpointed, resumed and evaluated.

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
    twin = config.training_twin(experiment)
    if twin is not None:  # trained but not used: the twin's weights, scored without IoU
        _score_twin(experiment, twin, path, env=env, progress=progress, say=say)
        return
    # The teacher first: training it (run cache) must not disturb the student's seeding.
    teacher = load_teacher(experiment, progress=progress) if experiment.distill.teacher else None
    seed_everything(cfg.seed)
    train_set, val_set, source = build_datasets(experiment)
    model = build_trainee(experiment, teacher).to(env.device)
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
    loop = _Loop()
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}

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
            for name in ("optimizer", "scheduler", "scaler"):
                parts[name].load_state_dict(state[name])
            loop.restore(state)
            say(f"resuming {path.name} at step {loop.step}/{total_steps}")
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
    eval_batch = max(1, cfg.batch_size // env.world_size)

    def save() -> None:
        if env.is_main:
            state = {name: part.state_dict() for name, part in parts.items()}
            state.update(format=CHECKPOINT_FORMAT, experiment=_plain(experiment),
                         epoch=loop.step // steps_per_epoch, total_steps=total_steps,
                         **loop.save())  # fmt: skip
            save_checkpoint(checkpoint_file, state)
            _write_json(path / HISTORY, loop.history)

    bar = tqdm(total=total_steps, initial=loop.step, desc=experiment.name, dynamic_ncols=True,
               disable=not (progress and env.is_main))  # fmt: skip
    shown = _Progress(bar)
    last_save = time.monotonic()
    model.train()
    while loop.step < total_steps:
        epoch = loop.step // steps_per_epoch
        sampler.set_epoch(epoch, skip=loop.step % steps_per_epoch)
        tick = time.perf_counter()  # a step's time includes waiting for its batch
        for images, targets in loader:
            images, targets = _to_device(env.device, images, targets)
            lr = scheduler.get_last_lr()[0]
            outcome = _optimise(net, images, targets, optimizer, scaler, params, cfg, use_amp)
            record = {"step": loop.step, "epoch": epoch, "lr": lr, **outcome}
            loop.nonfinite = loop.nonfinite + 1 if record.get("skipped") else 0
            if record.get("skipped"):
                terms = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k.startswith("loss"))
                say(f"step {loop.step}: non-finite loss ({terms}); step skipped ({loop.nonfinite} "
                    f"in a row, the run stops at {cfg.max_nonfinite})")  # fmt: skip
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
            loop.seconds += record["seconds"]
            loop.history.append(record)
            loop.step += 1
            if env.is_main:
                shown.update(record, cfg.batch_size)
            if loop.nonfinite >= cfg.max_nonfinite:
                save()
                raise TrainingDiverged(
                    f"{experiment.name}: {loop.nonfinite} non-finite losses in a row (last at "
                    f"step {loop.step - 1}); the run stopped. Lower the learning rate ({cfg.lr}) "
                    f"or set grad_clip; the checkpoint before the failure is in {path}"
                )
            epoch_done = loop.step % steps_per_epoch == 0 or loop.step == total_steps
            if epoch_done and cfg.eval_every_epoch and loop.step < total_steps:
                evaluated = _evaluate_networks(model, val_set, env, batch_size=eval_batch)
                if env.is_main:
                    metrics = {n: m for n, (_, m) in evaluated.items()}
                    first = next(iter(metrics.values()))
                    loop.per_epoch.append({"epoch": epoch + 1, "step": loop.step, **first,
                                           "networks": metrics})  # fmt: skip
                    say(f"epoch {epoch + 1}: AP {first['AP']:.3f}, AP50 {first['AP50']:.3f}")
            due = checkpoint_every and loop.step % checkpoint_every == 0
            late = time.monotonic() - last_save > 60 * checkpoint_minutes
            if epoch_done or due or late:
                save()
                last_save = time.monotonic()
            if loop.step >= total_steps:
                break
            tick = time.perf_counter()
    bar.close()

    started = time.perf_counter()
    evaluated = _evaluate_networks(model, val_set, env, batch_size=eval_batch, progress=progress)
    digests = dist.gather_lists([_weights_digest(model)])
    if env.is_main:
        _write_results(path, experiment, loop, evaluated, digests, env, source, say,
                       eval_seconds=time.perf_counter() - started)  # fmt: skip
    dist.barrier()


def _score_twin(experiment: Experiment, twin: Experiment, path: Path, *, env, progress, say):
    """Make ``experiment``'s run from its training twin's (:func:`colad.config.training_twin`):
    the twin's weights and history (trained first through the run cache), evaluated with this
    experiment's scoring. ``metrics.json`` names the twin's run in ``trained_by``."""
    trained = run(twin, progress=progress)
    say(f"{experiment.name}: the weights of {trained.path.name}, scored without the IoU branch")
    _, val_set, source = build_datasets(experiment)
    model = build_model(experiment).to(env.device)
    state = load_checkpoint(trained.checkpoint_path)
    load_weights(model, state["model"], str(trained.checkpoint_path))
    loop = _Loop()
    loop.restore(state)
    loop.per_epoch = []  # the twin's per-epoch metrics were scored with the IoU branch
    if env.is_main:
        path.mkdir(parents=True, exist_ok=True)
        payload = {"experiment": experiment.to_dict(), "key": run_key(experiment), "data": source}
        _write_json(path / CONFIG, payload)
        save_checkpoint(path / CHECKPOINT, {**state, "experiment": _plain(experiment)})
        _write_json(path / HISTORY, loop.history)
    started = time.perf_counter()
    batch_size = max(1, experiment.train.batch_size // env.world_size)
    evaluated = _evaluate_networks(model, val_set, env, batch_size=batch_size, progress=progress)
    digests = dist.gather_lists([_weights_digest(model)])
    if env.is_main:
        _write_results(path, experiment, loop, evaluated, digests, env, source, say,
                       eval_seconds=time.perf_counter() - started,
                       extra={"trained_by": trained.path.name})  # fmt: skip
    dist.barrier()


def _write_results(
    path, experiment, loop, evaluated, digests, env, source, say, *, eval_seconds, extra=None
):  # fmt: skip
    """Rank 0's last files: detections of every network, then ``metrics.json`` (which marks the
    run complete) with the first network's metrics as the run's and every network's beside."""
    names = list(evaluated)
    for name, (detections, _) in evaluated.items():
        evaluate.write_detections(detections, path / detections_file(name, names))
    metrics = evaluated[names[0]][1]
    summary = {
        "complete": True,
        "key": run_key(experiment),
        "name": experiment.name,
        "metrics": metrics,
        "networks": {name: m for name, (_, m) in evaluated.items()},
        "per_epoch": loop.per_epoch,
        "steps": loop.step,
        "skipped_steps": sum(1 for h in loop.history if h.get("skipped")),
        "train_seconds": round(loop.seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "images_per_second": round(
            experiment.train.batch_size * len(loop.history) / max(loop.seconds, 1e-9), 2
        ),
        "device": _describe_device(env),
        "world_size": env.world_size,
        "replica_digests": digests,
        "data": source,
        "checkpoint_bytes": (path / CHECKPOINT).stat().st_size,
        **(extra or {}),
    }
    _write_json(path / METRICS, summary)
    say(
        f"{experiment.name}: AP {metrics['AP']:.3f}, AP50 {metrics['AP50']:.3f} "
        f"({loop.step} steps, {loop.seconds:.0f} s) -> {shown_path(path)}"
    )


def shown_path(path: Path) -> str:
    """``path`` as log lines show it: under the data root as ``data/...`` (or ``$COLAD_DATA/...``),
    so that a chapter's output names no directory of the machine that built it."""
    root = config.data_root()
    try:
        inside = Path(path).resolve().relative_to(root)
    except ValueError:
        return str(path)
    prefix = "$COLAD_DATA" if os.environ.get("COLAD_DATA", "").strip() else "data"
    return f"{prefix}/{inside.as_posix()}"


def detections_file(network: str, names: list[str]) -> str:
    """The detections file of ``network``: ``detections.json`` for the run's first network,
    ``detections-<network>.json`` for the others."""
    return DETECTIONS if network == names[0] else f"detections-{network}.json"


def _describe_device(env: dist.DistEnv) -> str:
    if env.device.type == "cuda":
        name = torch.cuda.get_device_name(env.device)
    else:
        name = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return f"{env.world_size} x {name}" if env.distributed else name


# ----------------------------------------------------------------------------------------------
# The run cache


#: Modules that cannot change what a run computes (figures, explorers, benchmarks, the sweep
#: runner and its cluster submission, the command line, TIDE analysis of finished detections,
#: the book's status page): editing them keeps the run cache.
NOT_IN_KEY = (
    "viz.py", "explore.py", "bench.py", "sweep.py", "cluster.py", "__main__.py", "tide.py",
    "status.py",
)  # fmt: skip


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """Remove the docstring of the module and of every class and function in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):  # fmt: skip
                node.body = body[1:] or [ast.Pass()]
    return tree


@lru_cache(maxsize=256)
def _code_digest(path: str, mtime_ns: int, size: int) -> str:
    """What a module computes, as a hash: its syntax tree without docstrings, so comments,
    docstrings and formatting can be edited without invalidating the run cache."""
    tree = _strip_docstrings(ast.parse(Path(path).read_bytes(), filename=path))
    return hashlib.sha1(ast.dump(tree, include_attributes=False).encode()).hexdigest()


def source_key(*parts) -> str:
    """A short hash of ``parts`` (json-serialisable) and of every library module that takes part
    in training and evaluation (all but :data:`NOT_IN_KEY`), so that a cached result is redone
    whenever the code that made it changes. Modules count by their code, not their text:
    comments, docstrings and formatting are not part of the key."""
    digest = hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode())
    for module in sorted(Path(__file__).parent.glob("*.py")):
        if module.name not in NOT_IN_KEY:
            stat = module.stat()
            digest.update(module.name.encode())
            digest.update(_code_digest(str(module), stat.st_mtime_ns, stat.st_size).encode())
    return digest.hexdigest()[:10]


def _plain(experiment: Experiment) -> dict:
    """The experiment as json reads it back (lists, not tuples), for comparisons."""
    return json.loads(json.dumps(experiment.to_dict()))


@lru_cache(maxsize=64)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    """The SHA-1 of a file's bytes (a teacher checkpoint, an annotation file), read once per
    version of the file."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_key(experiment: Experiment) -> str:
    """The cache key of a run: the experiment's settings, its teacher's key (a changed teacher
    trains a new student), the library's source and, for your own dataset, the contents of its
    annotation files (an edited file trains a new run; the images are not hashed)."""
    parts = [experiment.to_dict()]
    teacher = teacher_key(experiment)
    if teacher is not None:
        parts.append(teacher)
    if experiment.data.custom:
        for split in ("train", "val"):
            path = Path(getattr(experiment.data, f"{split}_ann"))
            stat = path.stat()
            parts.append(_file_digest(str(path), stat.st_mtime_ns, stat.st_size))
    return source_key(*parts)


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

    @property
    def networks(self) -> dict[str, dict[str, float]]:
        """The metrics of every network the run trained (one, or CoLAD's ``net1``, ``net2``)."""
        return self.summary.get("networks") or {network_names(self.experiment)[0]: self.metrics}

    def detections_of(self, network: str) -> Path:
        """The detections file of one network."""
        return self.path / detections_file(network, network_names(self.experiment))

    def load_model(self, device: str | torch.device = "cpu", network: str | None = None):
        """A trained network (default: the run's first), in eval mode."""
        model = build_model(self.experiment, network)
        weights = load_checkpoint(self.checkpoint_path)["model"]
        load_weights(
            model, network_weights(weights, self.experiment, network), str(self.checkpoint_path)
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
        return _read(done)
    # Two notebooks asking for the same run: the second waits for the first, then loads its
    # result. (Under torchrun the processes of one job train together; no lock.)
    lock = contextlib.nullcontext() if env.distributed else exclusive(path)
    with lock:
        if not redo and (done := load_run(path, experiment)) is not None:
            return _read(done)  # finished by the process we waited for
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
    return _read(result)


def _read(result: RunResult) -> RunResult:
    """``result``, recorded for the book's status page (:mod:`colad.status`) when a build asks
    for it (on the first process only)."""
    if dist.current().is_main:
        status.record_run(result)
    return result
