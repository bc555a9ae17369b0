"""The book's own Sphinx extension: settings that follow ``$COLAD_PROFILE``.

A chapter's execution time limit follows the profile's budget with a wide margin, so that a
build on a machine several times slower than ours does not fail on a limit:

* ``smoke``: every chapter is budgeted at 60 s; the limit is 10 minutes.
* ``quick``: the slowest chapter trains about 45 minutes of runs from a cold run cache; the
  limit is 3 hours per chapter (``python -m colad sweep book`` trains every run beforehand, and
  then a chapter only reads runs).
* ``full``: no limit. Chapters read runs a GPU server prepared (``sweep book``, ``--slurm``);
  a missing run is trained there and then, for as long as it takes.
"""

from __future__ import annotations

import os

#: Seconds a chapter may execute, by profile (-1: no limit).
TIMEOUTS = {"smoke": 600, "quick": 3 * 3600, "full": -1}


def timeout_for(profile: str | None) -> int:
    """The execution time limit of one chapter in ``profile`` (default quick, as colad's)."""
    profile = (profile or "quick").strip() or "quick"
    if profile not in TIMEOUTS:
        raise ValueError(f"COLAD_PROFILE={profile!r}; choose one of {', '.join(TIMEOUTS)}")
    return TIMEOUTS[profile]


def _set_timeout(app, config) -> None:
    config.nb_execution_timeout = timeout_for(os.environ.get("COLAD_PROFILE"))


def setup(app):
    app.connect("config-inited", _set_timeout)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
