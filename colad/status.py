"""What the book's status page shows: how it was built, on what, and the runs each chapter read.

While the book builds, its Sphinx extension (``book/_ext/colad_book.py``) sets two variables
that every chapter's kernel (and the sweep workers it starts) inherits: :data:`RUN_LOG`, a
JSON-lines file beside the build, and :data:`CHAPTER`, the chapter being executed with a fresh
id per execution. :func:`record_run` appends one line per run a chapter trains or reads; the
status page reads the latest execution of each chapter with :func:`runs_by_chapter` (a chapter
that the build took from its execution cache keeps the runs of its last execution).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path

__all__ = ["RUN_LOG", "CHAPTER", "record_run", "runs_by_chapter", "build_facts"]

#: Environment variable: the JSON-lines file that runs are recorded in (unset: nothing is).
RUN_LOG = "COLAD_RUN_LOG"
#: Environment variable: ``<chapter>@<execution id>`` of the chapter being executed.
CHAPTER = "COLAD_CHAPTER"


def record_run(result) -> None:
    """Append ``result`` (a :class:`colad.engine.RunResult`) to the run log, if one is set."""
    log = os.environ.get(RUN_LOG, "").strip()
    if not log:
        return
    chapter, _, execution = os.environ.get(CHAPTER, "").partition("@")
    entry = {
        "chapter": chapter,
        "execution": execution,
        "run": result.path.name,
        "experiment": result.experiment.name,
        "reused": bool(result.reused),
        "AP": result.metrics.get("AP"),
        "train_seconds": result.summary.get("train_seconds"),
        "time": time.time(),
    }
    with open(log, "a", encoding="utf-8") as f:  # one short line: appends do not interleave
        f.write(json.dumps(entry) + "\n")


def runs_by_chapter(log: str | Path) -> dict[str, list[dict]]:
    """The runs of each chapter's latest execution in ``log``, each run once, in the order they
    were first read (trained runs marked ``reused: False``)."""
    path = Path(log)
    if not path.is_file():
        return {}
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a killed build
            continue
    latest: dict[str, tuple[float, str]] = {}
    for e in entries:
        if e.get("chapter"):
            seen = latest.get(e["chapter"])
            if seen is None or e["time"] > seen[0] and e["execution"] != seen[1]:
                latest[e["chapter"]] = (e["time"], e["execution"])
    chapters: dict[str, dict[str, dict]] = {}
    for e in entries:
        if e.get("chapter") and e["execution"] == latest[e["chapter"]][1]:
            runs = chapters.setdefault(e["chapter"], {})
            if e["run"] in runs:
                runs[e["run"]]["reused"] &= e["reused"]  # trained once, then read: trained
            else:
                runs[e["run"]] = dict(e)
    return {chapter: list(runs.values()) for chapter, runs in chapters.items()}


def _git(*args: str) -> str:
    checkout = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True,
                              text=True, timeout=10, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def build_facts() -> dict[str, str]:
    """The library version, git commit (with ``+ changes`` for a modified checkout), profile,
    device, PyTorch and Python versions, and the time: what the status page lists."""
    import torch

    import colad
    from colad import config

    commit = _git("rev-parse", "--short=10", "HEAD") or "not a git checkout"
    if commit != "not a git checkout" and _git("status", "--porcelain", "--untracked-files=no"):
        commit += " + uncommitted changes"
    if torch.cuda.is_available():
        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    else:
        device = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {
        "colad": colad.__version__,
        "git commit": commit,
        "profile": config.profile_from_env(),
        "device": device,
        "PyTorch": torch.__version__,
        "Python": platform.python_version(),
        "built": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
