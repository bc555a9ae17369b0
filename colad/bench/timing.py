"""Wall-clock timing that waits for the GPU, and alternating several callables."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _timed(device: torch.device, fn: Callable, *args) -> tuple[float, object]:
    """Wall time of ``fn(*args)`` and its result, waiting for the GPU if there is one."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def _seconds(device: torch.device, fn: Callable, *args) -> float:
    """Wall time of ``fn(*args)``, waiting for the GPU if there is one."""
    return _timed(device, fn, *args)[0]


def _alternate(device: torch.device, steps: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Median milliseconds of each callable, run in turn ``repeats`` times after two warm-ups."""
    times = {name: [] for name in steps}
    for k in range(repeats + 2):
        for name, step in steps.items():
            elapsed = _seconds(device, step)
            if k >= 2:
                times[name].append(elapsed)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}
