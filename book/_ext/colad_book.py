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
(``colad.status``), for the status page; and when other work already loads the CPU (a sweep
beside the build), it gives the chapter's kernel only the cores left free (``OMP_NUM_THREADS``),
because PyTorch's threads competing with busy cores slow a chapter far more than the share of
cores it loses (a 25 s smoke chapter beside a two-job sweep on two cores hit its 600 s limit).
A thread count set by the reader is left alone.
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


def threads_for(load: float, cores: int) -> int | None:
    """The threads a chapter should use when other work already loads the CPU: the ``cores``
    left free by ``load`` (the one-minute load average, rounded), at least one; ``None``
    (PyTorch's default, every core) when less than one core's worth is busy."""
    busy = int(load + 0.5)
    if busy < 1:
        return None
    return max(1, cores - busy)


#: Whether this extension set OMP_NUM_THREADS (then it may change it for the next chapter).
_OWN_THREADS = "COLAD_BOOK_SET_THREADS"


def _share_the_cpu(docname: str) -> None:
    if os.environ.get("OMP_NUM_THREADS") and not os.environ.get(_OWN_THREADS):
        return  # the reader's choice
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return
    threads = threads_for(load, os.cpu_count() or 1)
    if threads is None:
        os.environ.pop("OMP_NUM_THREADS", None)
        os.environ.pop(_OWN_THREADS, None)
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ[_OWN_THREADS] = "1"
    from sphinx.util import logging

    logging.getLogger(__name__).info(
        f"colad: the CPU is busy (load {load:.1f} on {os.cpu_count()} cores); {docname} runs "
        f"with {threads} thread(s)"
    )


def _enter_chapter(app, docname: str, source: list[str]) -> None:
    # read before the chapter is parsed and executed: its kernel inherits the variables
    os.environ["COLAD_CHAPTER"] = f"{docname}@{time.time_ns()}"
    if "{code-cell}" in "".join(source):  # a page that executes
        _share_the_cpu(docname)


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
