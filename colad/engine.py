"""Training: devices, seeding and a short training loop.

:func:`train_steps` is the small loop that chapters use to get a briefly trained detector (for
example, to look at realistic anchor costs). The full engine (schedules, checkpoints, the run
cache, DDP) builds on it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from colad.data import collate

__all__ = ["get_device", "seed_everything", "batches", "train_steps"]


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
