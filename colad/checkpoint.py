"""Checkpoints: written atomically, read with checks, loaded strictly.

A checkpoint is one dict saved with ``torch.save``: the model's weights and everything needed to
continue (optimizer, scheduler, AMP scaler, step, history) together with the experiment that
made it. :mod:`colad.engine` writes and reads them; :func:`load_weights` is also what loads a
teacher, so that weights for another architecture are an error rather than a partial load.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "load_weights"]  # fmt: skip

#: Bumped when the checkpoint's layout changes; older files are refused with a clear error.
CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: unreadable, truncated, or for another architecture."""


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write ``state`` with ``torch.save`` atomically: a temporary file in the same folder,
    flushed to disk, then renamed over ``path``. A crash leaves the old checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, or not a colad checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip archives, bad pickles and the like
        raise CheckpointError(
            f"{path}: cannot read the checkpoint, it is truncated or corrupt "
            f"({type(e).__name__}: {e})"
        ) from None
    needed = {"format", "model", "experiment", "step"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise CheckpointError(f"{path}: not a colad checkpoint (needs keys {sorted(needed)})")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {state['format']}, expected {CHECKPOINT_FORMAT}"
        )
    return state


def load_weights(model: nn.Module, weights: dict, source: str) -> None:
    """Load ``weights`` into ``model`` strictly: every parameter and buffer, same shapes.

    Raises:
        CheckpointError: naming the missing, unexpected or mis-shaped tensors; for a detector
            given another head variant's weights, naming both variants.
    """
    check = getattr(model, "check_weights", None)  # a Detector knows its head variant
    if check is not None:
        check(weights, source)
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [
        f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if missing or unexpected or shapes:

        def few(items):
            return ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")

        problems = [
            f"{name}: {few(items)}"
            for name, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
            if items
        ]
        raise CheckpointError(
            f"{source} does not match the model's architecture; " + "; ".join(problems)
        )
    model.load_state_dict(weights)
