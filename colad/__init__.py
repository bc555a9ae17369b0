"""colad: label assignment for one-stage detectors (PAA, LAD, CoLAD), as a library and a book."""

from __future__ import annotations

__version__ = "0.1.0"

from .config import experiment, profile_from_env
from .evaluate import coco_evaluate
from .tide import tide_errors

__all__ = ["__version__", "coco_evaluate", "experiment", "profile_from_env", "tide_errors"]
