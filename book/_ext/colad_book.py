"""The book's own Sphinx extension: settings that follow ``$COLAD_PROFILE``.

A chapter's execution time limit follows the profile's budget with a wide margin, so that a
build on a machine several times slower than ours does not fail on a limit:

* ``smoke``: every chapter is budgeted at 60 s; the limit is 10 minutes.
* ``quick``: the slowest chapter trains about 45 minutes of runs from a cold run cache; the
  limit is 3 hours per chapter (``python -m colad sweep book`` trains every run beforehand, and
  then a chapter only reads runs).
* ``full``: no limit. Chapters read runs a GPU server prepared (``sweep book``, ``--slurm``);
  a missing run is trained there and then, for as long as it takes.

It also tells each chapter's kernel which chapter it runs and where to record the runs it reads
(``colad.status``), for the status page.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

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


def _start_run_log(app) -> None:
    # beside the build's HTML and execution cache; kept across builds (a cached chapter is not
    # executed again and keeps the runs of its last execution)
    os.environ["COLAD_RUN_LOG"] = str(Path(app.outdir).parent / "colad-runs.jsonl")


def _enter_chapter(app, docname: str, source: list[str]) -> None:
    # read before the chapter is parsed and executed: its kernel inherits the variable
    os.environ["COLAD_CHAPTER"] = f"{docname}@{time.time_ns()}"


#: The page that describes the build: read again by every build, and after every chapter.
STATUS_PAGE = "status"


def _status_is_outdated(app, env, added, changed, removed) -> list[str]:
    return [STATUS_PAGE] if STATUS_PAGE in env.found_docs else []


def _status_last(app, env, docnames: list[str]) -> None:
    if STATUS_PAGE in docnames:  # Sphinx reads in name order; the status page reads the others'
        docnames.remove(STATUS_PAGE)
        docnames.append(STATUS_PAGE)


def setup(app):
    app.connect("config-inited", _set_timeout)
    app.connect("builder-inited", _start_run_log)
    app.connect("source-read", _enter_chapter)
    app.connect("env-get-outdated", _status_is_outdated)
    app.connect("env-before-read-docs", _status_last)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
