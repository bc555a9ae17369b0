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

Chapters that must execute run several at a time, before Sphinx reads them one by one: on a
multi-core CPU most of a chapter's time is single-threaded (starting its kernel, importing
PyTorch, reading runs, tidecv), so two chapters at once on two cores take about half the time.
Each is executed exactly as myst-nb would and stored in its execution cache, where Sphinx's read
then finds it. A chapter that times code says ``colad: {execute: alone}`` in its front matter and
is executed afterwards by itself, so that its timings are not taken beside another chapter.
``$COLAD_BOOK_JOBS`` sets how many at once; by default, the cores the load leaves free (at most
four), and one in the ``full`` profile, where chapters may train on the one GPU.
The workers are forked processes, so this happens on Linux; elsewhere chapters execute one by one.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
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


def busy_cores(window: float = 0.25) -> float | None:
    """How many cores' worth of work the machine is doing now: measured from ``/proc/stat``
    over ``window`` seconds on Linux (the build itself sleeps meanwhile), else the one-minute
    load average (which lags: it still counts the previous minute's chapters); ``None`` when
    neither can be read."""
    try:
        first = _cpu_times()
        time.sleep(window)
        second = _cpu_times()
        total = sum(second) - sum(first)
        idle = (second[3] + second[4]) - (first[3] + first[4])  # idle and iowait
        return (os.cpu_count() or 1) * (1 - idle / total) if total > 0 else 0.0
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (OSError, AttributeError):  # not available on this platform
            return None


def _cpu_times() -> list[int]:
    """The machine's CPU time counters (user, nice, system, idle, iowait, ...) in ticks."""
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:]]


def threads_for(load: float, cores: int) -> int | None:
    """The threads a chapter should use when other work already loads the CPU: the ``cores``
    left free by ``load`` (:func:`busy_cores`, rounded), at least one; ``None`` (PyTorch's
    default, every core) when less than one core's worth is busy."""
    busy = int(load + 0.5)
    if busy < 1:
        return None
    return max(1, cores - busy)


#: Whether this extension set OMP_NUM_THREADS (then it may change it for the next chapter).
_OWN_THREADS = "COLAD_BOOK_SET_THREADS"


def _share_the_cpu(docname: str) -> None:
    if os.environ.get("OMP_NUM_THREADS") and not os.environ.get(_OWN_THREADS):
        return  # the reader's choice
    load = busy_cores()
    if load is None:
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
    if "{code-cell}" in "".join(source) and docname not in _EXECUTED:  # a page that executes
        _share_the_cpu(docname)


#: The page that describes the build: read again by every build, and after every chapter.
STATUS_PAGE = "status"


def _status_is_outdated(app, env, added, changed, removed) -> list[str]:
    return [STATUS_PAGE] if STATUS_PAGE in env.found_docs else []


def _status_last(app, env, docnames: list[str]) -> None:
    if STATUS_PAGE in docnames:  # Sphinx reads in name order; the status page reads the others'
        docnames.remove(STATUS_PAGE)
        docnames.append(STATUS_PAGE)


# ----------------------------------------------------------------------------------------------
# Executing chapters several at a time

#: Environment variable: how many chapters execute at once (an integer, at least 1).
JOBS = "COLAD_BOOK_JOBS"
#: At most this many chapters at once by default (each holds a kernel, its data and its runs).
MAX_JOBS = 4


def jobs_for(profile: str | None, cores: int, load: float, setting: str | None = None) -> int:
    """How many chapters execute at once: ``setting`` (``$COLAD_BOOK_JOBS``) when given; one in
    the ``full`` profile (chapters may train on the GPU); else the cores that ``load``
    (:func:`busy_cores`) leaves free, between 1 and :data:`MAX_JOBS`."""
    if setting is not None and setting.strip():
        try:
            jobs = int(setting)
        except ValueError:
            jobs = 0
        if jobs < 1:
            raise ValueError(f"{JOBS}={setting!r}: give a whole number of chapters, at least 1")
        return jobs
    if (profile or "").strip() == "full":
        return 1
    return max(1, min(cores - int(load + 0.5), MAX_JOBS))


class _Messages:
    """Collects what myst-nb logs while a chapter executes in a worker, for the main log."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def _keep(self, level: str, msg, *args, **kwargs) -> None:
        self.lines.append((level, str(msg) % args if args else str(msg)))

    def debug(self, msg, *args, **kwargs) -> None:
        pass

    def info(self, msg, *args, **kwargs) -> None:
        self._keep("info", msg, *args)

    def warning(self, msg, *args, **kwargs) -> None:
        self._keep("warning", msg, *args)

    def error(self, msg, *args, **kwargs) -> None:
        self._keep("error", msg, *args)


#: What the forked workers need from the build (set before the pool starts; fork copies it).
_BUILD: dict = {}
#: The chapters executed ahead in this build: Sphinx's read finds them in the cache.
_EXECUTED: set[str] = set()


def _execute_chapter(docname: str) -> tuple[str, bool, float, list[tuple[str, str]]]:
    """Execute one chapter in a worker process and store it in myst-nb's execution cache.

    Returns ``(docname, succeeded, seconds, messages)``."""
    from myst_nb.core.execute.cache import NotebookClientCache
    from myst_nb.core.read import create_nb_reader

    path, text = _BUILD["sources"][docname]
    os.environ["COLAD_CHAPTER"] = f"{docname}@{time.time_ns()}"
    if _BUILD["threads"] is not None:
        os.environ["OMP_NUM_THREADS"] = str(_BUILD["threads"])
        os.environ[_OWN_THREADS] = "1"
    messages = _Messages()
    start = time.perf_counter()
    reader = create_nb_reader(path, _BUILD["md_config"], _BUILD["nb_config"], text)
    client = NotebookClientCache(
        reader.read(text), Path(path), _BUILD["nb_config"], messages, read_fmt=reader.read_fmt
    )
    try:
        client.start_client()
        succeeded = bool(client.exec_metadata and client.exec_metadata["succeeded"])
    except Exception as error:  # noqa: BLE001 -- reported in the main process
        cause = error.__cause__  # myst-nb's ExecutionError names the file; its cause, the cell
        messages.error(f"{type(error).__name__}: {error}" + (f"\n{cause}" if cause else ""))
        succeeded = False
    return docname, succeeded, time.perf_counter() - start, messages.lines


#: A chapter whose front matter says ``colad: {execute: alone}`` (it times code) executes by
#: itself, after the chapters that run together, with every core.
ALONE = "alone"


def _notebooks_to_execute(app, env, docnames: list[str]) -> dict[str, tuple[str, str]]:
    """The chapters among ``docnames`` that the execution cache does not hold, as
    ``docname -> (path, text)``. Chapters with their own myst-nb settings, chapters marked to
    execute :data:`ALONE`, and the status page (it reads what the others recorded) are left to
    Sphinx's read, which executes them one by one afterwards."""
    from jupyter_cache import get_cache
    from myst_nb.core.read import create_nb_reader

    nb_config = env.mystnb_config
    if nb_config.execution_mode != "cache" or nb_config.kernel_rgx_aliases:
        return {}
    cache = get_cache(nb_config.execution_cache_path or ".jupyter_cache")
    found = {}
    for docname in docnames:
        if docname == STATUS_PAGE:
            continue
        path = str(env.doc2path(docname))
        text = Path(path).read_text(encoding="utf8")
        reader = create_nb_reader(path, env.myst_config, nb_config, text)
        if reader is None:  # plain Markdown
            continue
        notebook = reader.read(text)
        if nb_config.metadata_key in notebook.metadata:
            continue
        if notebook.metadata.get("colad", {}).get("execute") == ALONE:
            continue  # it times code: Sphinx's read executes it after the others, on an idle CPU
        if not any(cell.cell_type == "code" for cell in notebook.cells):
            continue
        try:
            cache.match_cache_notebook(notebook)
        except KeyError:
            found[docname] = (path, text)
    return found


def _previous_seconds(nb_config) -> dict[str, float]:
    """How long each notebook's last cached execution took, by path (for scheduling)."""
    from jupyter_cache import get_cache

    cache = get_cache(nb_config.execution_cache_path or ".jupyter_cache")
    return {str(r.uri): float(r.data.get("execution_seconds") or 0.0)
            for r in cache.list_cache_records()}  # fmt: skip


def _prepare_data(profile: str | None) -> None:
    """Write the profile's generated benchmark (if missing) before chapters execute together:
    two chapters that each found it missing would write it at once, and one replaces the
    folder the other is reading. Nothing to write in ``full`` (COCO, or your own files)."""
    from sphinx.errors import ExtensionError

    profile = (profile or "quick").strip() or "quick"
    if profile == "full":
        return
    command = [sys.executable, "-m", "colad", "data", "synth", "--profile", profile]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ExtensionError(
            f"colad: could not write the {profile} benchmark ({' '.join(command[1:])}):\n"
            + (proc.stderr or proc.stdout)[-3000:]
        )


def _execute_ahead(app, env, docnames: list[str]) -> None:
    from sphinx.errors import ExtensionError
    from sphinx.util import logging

    log = logging.getLogger(__name__)
    if not sys.platform.startswith("linux"):
        return  # workers are forked, which only Linux does safely; one by one as Sphinx reads
    load = busy_cores() or 0.0
    cores = os.cpu_count() or 1
    jobs = jobs_for(os.environ.get("COLAD_PROFILE"), cores, load, os.environ.get(JOBS))
    if jobs < 2:
        return
    sources = _notebooks_to_execute(app, env, docnames)
    if len(sources) < 2:
        return
    jobs = min(jobs, len(sources))
    _prepare_data(os.environ.get("COLAD_PROFILE"))
    reader_threads = os.environ.get("OMP_NUM_THREADS") and not os.environ.get(_OWN_THREADS)
    threads = None if reader_threads else max(1, (cores - int(load + 0.5)) // jobs)
    before = _previous_seconds(env.mystnb_config)
    # the longest first, so that the workers finish together: by the last execution, and a
    # chapter never executed before counts as long, the longer its source the longer
    order = sorted(sources, key=lambda d: (-before.get(sources[d][0], math.inf),
                                           -len(sources[d][1])))  # fmt: skip
    _BUILD.update(sources=sources, md_config=env.myst_config, nb_config=env.mystnb_config,
                  threads=threads)  # fmt: skip
    log.info(f"colad: executing {len(order)} chapters, {jobs} at a time "
             f"({threads or 'default'} thread(s) each): {', '.join(order)}")  # fmt: skip
    failed = []
    start = time.perf_counter()
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = [pool.submit(_execute_chapter, docname) for docname in order]
        for future in as_completed(futures):
            docname, succeeded, seconds, lines = future.result()
            for level, line in lines:
                if level != "info" or not succeeded:
                    getattr(log, "warning" if level != "info" else "info")(
                        f"colad: {docname}: {line}"
                    )
            log.info(f"colad: {docname} {'executed' if succeeded else 'FAILED'} in {seconds:.1f} s")
            if succeeded:
                _EXECUTED.add(docname)
            else:
                failed.append(docname)
    _BUILD.clear()
    log.info(f"colad: {len(order)} chapters executed in {time.perf_counter() - start:.1f} s")
    if failed and env.mystnb_config.execution_raise_on_error:
        raise ExtensionError(f"executing failed: {', '.join(sorted(failed))} (see above)")


def setup(app):
    app.connect("config-inited", _set_timeout)
    app.connect("builder-inited", _start_run_log)
    app.connect("source-read", _enter_chapter)
    app.connect("env-get-outdated", _status_is_outdated)
    app.connect("env-before-read-docs", _status_last)
    app.connect("env-before-read-docs", _execute_ahead)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
