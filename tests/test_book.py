"""The book builds in the smoke profile: every chapter in _toc.yml executes and produces HTML."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from colad import engine, sweep

BOOK = Path(__file__).resolve().parent.parent / "book"
# A script, stylesheet or image fetched from another host when a page loads.
EXTERNAL_LOAD = re.compile(
    r"<(?:script|img)\b[^>]*\bsrc=[\"']((?:https?:)?//[^\"']+)|"
    r"<link\b[^>]*\bhref=[\"']((?:https?:)?//[^\"']+)"
)


def toc_files(toc: dict | list | None = None) -> list[str]:
    """Every file named in ``_toc.yml`` (root, parts, chapters, sections), in order."""
    if toc is None:
        toc = yaml.safe_load((BOOK / "_toc.yml").read_text())
    files = []
    if isinstance(toc, dict):
        if "root" in toc:
            files.append(toc["root"])
        if "file" in toc:
            files.append(toc["file"])
        for key in ("parts", "chapters", "sections"):
            files += toc_files(toc.get(key, []))
    elif isinstance(toc, list):
        for entry in toc:
            files += toc_files(entry)
    return files


def test_toc_names_every_chapter_and_nothing_else():
    chapters = {p.stem for p in BOOK.glob("*.md")}
    assert set(toc_files()) == chapters


@pytest.mark.book
@pytest.mark.slow
def test_book_builds_in_smoke_profile(tmp_path):
    env = {
        **os.environ,
        "COLAD_PROFILE": "smoke",
        "COLAD_DATA": str(tmp_path / "data"),
    }
    env.pop("MPLBACKEND", None)  # the kernel's inline backend, as for a reader
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    command = [
        str(jupyter_book),
        "build",
        str(BOOK),
        "-W",
        "-n",
        "--keep-going",
        "--path-output",
        str(tmp_path),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, log
    assert "build succeeded" in proc.stdout, log

    html = tmp_path / "_build" / "html"
    for name in toc_files():
        page = html / f"{name}.html"
        assert page.is_file(), f"no HTML for chapter {name}"
        text = page.read_text()
        assert "Traceback (most recent call last)" not in text, f"a cell raised in {name}"
        if "viz." in (BOOK / f"{name}.md").read_text():
            assert "<img" in text, f"{name} draws figures but its page shows none"
    # offline: MathJax is served with the book, and no page loads anything from another host
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()
    for page in html.glob("*.html"):
        external = EXTERNAL_LOAD.findall(page.read_text())
        assert not external, f"{page.name} loads from other hosts: {external[:3]}"
    reports = html / "reports"
    assert not reports.exists() or not any(reports.iterdir()), "execution reports were written"
    # `sweep book` plans exactly the runs the chapters trained
    trained = {p.name for p in (tmp_path / "data" / "runs").iterdir() if p.is_dir()}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLAD_DATA", str(tmp_path / "data"))
        planned = {engine.run_path(e).name for _, _, e in sweep.book_plan("smoke")}
    assert planned == trained, (sorted(planned - trained), sorted(trained - planned))
    # the chapters generated their data where COLAD_DATA pointed
    assert any((tmp_path / "data" / "synth").glob("shapes-smoke-*/COMPLETE"))


def test_the_chapters_time_limit_follows_the_profile(monkeypatch):
    monkeypatch.syspath_prepend(str(BOOK / "_ext"))
    import colad_book

    assert colad_book.timeout_for("smoke") == 600 and colad_book.timeout_for(None) == 3 * 3600
    assert colad_book.timeout_for("full") == -1  # chapters read runs a GPU server prepared
    with pytest.raises(ValueError, match="COLAD_PROFILE='fast'"):
        colad_book.timeout_for("fast")
    config = type("Config", (), {})()
    monkeypatch.setenv("COLAD_PROFILE", "smoke")
    colad_book._set_timeout(None, config)
    assert config.nb_execution_timeout == 600
    for chapter in BOOK.glob("*.md"):  # no chapter overrides it
        assert "execution_timeout" not in chapter.read_text(), chapter.name
