"""The command line's commands, by topic (:mod:`colad.__main__` runs them): ``data``,
``bench``, ``runs`` (train, eval, sweep, results) and the ``parser`` that names them all."""

from __future__ import annotations

from .parser import build_parser
from .runs import train_experiment

__all__ = ["build_parser", "train_experiment"]
