"""Training: devices, seeding and a short training loop.

:func:`train_steps` is the small loop that chapters use to get a briefly trained detector (for
example, to look at realistic anchor costs). The full engine (schedules, checkpoints, the run
cache, DDP) builds on it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from colad import config, data
from colad.data import collate

__all__ = ["get_device", "seed_everything", "batches", "train_steps", "source_key",
           "BriefRun", "briefly_trained"]  # fmt: skip


def get_device() -> torch.device:
    """CUDA if present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 -- seeds code that uses the global generator
    torch.manual_seed(seed)


def batches(
    dataset: Dataset, batch_size: int, *, seed: int = 0, num_workers: int = 0
) -> Iterator[tuple]:
    """Endless shuffled batches ``(ImageList, targets)``, reshuffled every pass."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, collate_fn=collate, drop_last=True,
        num_workers=num_workers, generator=generator,
    )  # fmt: skip
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} images cannot fill one batch of {batch_size}")
    while True:
        yield from loader


def _to(device: torch.device, images, targets: list[dict[str, Tensor]]):
    images = images.to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    return images, targets


def train_steps(
    model: nn.Module,
    dataset: Dataset,
    *,
    steps: int,
    batch_size: int = 8,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    warmup_steps: int = 0,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``model`` for ``steps`` SGD steps with a linear warm-up and cosine decay.

    A step whose loss is not finite is skipped (no update) and recorded with ``skipped: True``.

    Returns:
        The history: one dict per step with ``step``, ``lr``, ``loss`` and each ``loss_*``.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be positive")
    device = torch.device(device) if device is not None else get_device()
    seed_everything(seed)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    history = []
    data = batches(dataset, batch_size, seed=seed)
    bar = tqdm(range(steps), desc="training", disable=not progress, leave=False)
    for step in bar:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        rate = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = rate
        images, targets = _to(device, *next(data))
        losses = model(images, targets)
        loss = sum(v for k, v in losses.items() if k.startswith("loss_"))
        record = {"step": step, "lr": rate, "loss": float(loss.detach())}
        record.update({k: float(v.detach()) for k, v in losses.items()})
        if not math.isfinite(record["loss"]):
            history.append({**record, "skipped": True})
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
    model.eval()
    return history


def source_key(*parts) -> str:
    """A short hash of ``parts`` (json-serialisable) and of every module of the library, so that a
    cached result is redone whenever the code that made it changes."""
    digest = hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode())
    for module in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(module.read_bytes())
    return digest.hexdigest()[:10]


@dataclass
class BriefRun:
    """A detector trained for a few minutes, with its data: ``model`` (in eval mode), ``train``
    and ``val`` datasets, ``history`` (per step), ``source`` (which data) and ``path`` (its
    cache folder)."""

    model: nn.Module
    train: Dataset
    val: Dataset
    history: list[dict[str, float]]
    source: str
    path: Path


# Short schedules per profile: (image min side, max side, steps, batch, learning rate).
_BRIEF = {"smoke": (96, 128, 40, 8, 0.02), "quick": (128, 192, 300, 16, 0.02),
          "full": (800, 1333, 500, 8, 0.01)}  # fmt: skip


def briefly_trained(profile: str, *, seed: int = 0, progress: bool = True) -> BriefRun:
    """A PAA detector trained briefly on the profile's data, cached under
    ``<data root>/runs/brief-<profile>-<key>`` (the key covers the settings and the library).

    It is for looking at realistic costs and assignments, not for its accuracy.
    """
    from colad.detector import Detector

    paths = {split: data.split_paths(profile, split) for split in ("train", "val")}
    on_coco = paths["train"].source.startswith("COCO")
    preset = profile if profile != "full" or on_coco else "quick"
    min_size, max_size, steps, batch_size, lr = _BRIEF[preset]
    transforms = data.eval_transforms(min_size, max_size)
    train = data.CocoDetection(
        paths["train"].ann_file, paths["train"].image_dir, transforms, drop_empty=True
    )
    val = data.CocoDetection(paths["val"].ann_file, paths["val"].image_dir, transforms)
    model_config = config.model_preset(preset, train.num_classes)
    settings = [preset, paths["train"].source, model_config.to_dict(), _BRIEF[preset], seed]
    path = config.data_root() / "runs" / f"brief-{preset}-{source_key(*settings)}"
    seed_everything(seed)
    model = Detector(model_config)
    weights, history_file = path / "model.pt", path / "history.json"
    if weights.is_file() and history_file.is_file():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        history = json.loads(history_file.read_text())
    else:
        history = train_steps(model, train, steps=steps, batch_size=batch_size, lr=lr,
                              warmup_steps=steps // 10, seed=seed, progress=progress)  # fmt: skip
        path.mkdir(parents=True, exist_ok=True)
        _atomic_write(history_file, json.dumps(history).encode())
        tmp = weights.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, weights)
    return BriefRun(model.cpu().eval(), train, val, history, paths["train"].source, path)


def _atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
