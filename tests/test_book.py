"""The book builds in the smoke profile: every chapter in _toc.yml executes and produces HTML."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import pytest
import yaml

from colad import engine, status, sweep

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


#: The widest listing line the book's column shows without scrolling (STYLE.md §5.15).
LISTING_WIDTH = 88


def _library_object(path: Path, name: str) -> list[str]:
    """The source lines of ``name`` (``Class.method`` allowed) in ``path``, decorators too."""
    import ast

    source = path.read_text()
    nodes = ast.parse(source).body
    for part in name.split("."):
        node = next(n for n in nodes if getattr(n, "name", None) == part)
        nodes = getattr(node, "body", [])
    first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    return source.splitlines()[first - 1 : node.end_lineno]


def test_listings_fit_the_column():
    """Code a reader sees (visible code cells, command blocks and library listings) keeps lines
    to 88 characters, which the book's stylesheet fits in the column of a 1280-pixel window."""
    wide = []
    for chapter in sorted(BOOK.glob("*.md")):
        text = chapter.read_text()
        for cell in re.findall(r"```\{code-cell\}[^\n]*\n(.*?)\n```", text, flags=re.S):
            if ":tags: [remove-cell]" in cell:
                continue
            code = cell.split("\n---\n", 1)[1] if cell.startswith("---") else cell
            wide += [f"{chapter.name}: {line}" for line in code.splitlines()
                     if len(line) > LISTING_WIDTH]  # fmt: skip
        for block in re.findall(r"```(?:bash|text|python)\n(.*?)\n```", text, flags=re.S):
            wide += [f"{chapter.name}: {line}" for line in block.splitlines()
                     if len(line) > LISTING_WIDTH]  # fmt: skip
        for source, name in re.findall(r"```\{literalinclude\} (\S+)\n:pyobject: (\S+)", text):
            lines = _library_object((BOOK / source).resolve(), name)
            wide += [f"{chapter.name} ({name}): {line}" for line in lines
                     if len(line) > LISTING_WIDTH]  # fmt: skip
    assert not wide, "lines wider than the column:\n" + "\n".join(wide)


@pytest.fixture(scope="module")
def smoke_book(tmp_path_factory):
    """The whole book built in the smoke profile (once per module): ``(tmp_path, process)``."""
    tmp_path = tmp_path_factory.mktemp("book")
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
    return tmp_path, proc


@pytest.mark.book
@pytest.mark.slow
def test_book_builds_in_smoke_profile(smoke_book):
    tmp_path, proc = smoke_book
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
    # the status page names the build and the runs each chapter read
    page = (html / "status.html").read_text()
    assert "git commit" in page and "smoke" in page and "paa-tiny-smoke-" in page
    recorded = status.runs_by_chapter(tmp_path / "_build" / "colad-runs.jsonl")
    readers = {"label-assignment", "paa", "training", "lad", "colad", "ld", "cop"}
    assert readers <= set(recorded), sorted(readers - set(recorded))
    assert {r["run"] for runs in recorded.values() for r in runs} == trained
    # the chapters generated their data where COLAD_DATA pointed
    assert any((tmp_path / "data" / "synth").glob("shapes-smoke-*/COMPLETE"))


def test_a_busy_cpu_gives_chapters_only_the_free_cores(monkeypatch):
    monkeypatch.syspath_prepend(str(BOOK / "_ext"))
    import colad_book

    assert colad_book.threads_for(0.2, 2) is None  # idle: PyTorch's default
    assert colad_book.threads_for(2.3, 2) == 1 and colad_book.threads_for(1.6, 8) == 6
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(colad_book._OWN_THREADS, raising=False)
    monkeypatch.delenv("COLAD_CHAPTER", raising=False)  # restored after the test
    monkeypatch.setattr(colad_book, "busy_cores", lambda: 3.0)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    colad_book._enter_chapter(None, "paa", ["```{code-cell} ipython3"])
    assert os.environ["OMP_NUM_THREADS"] == "1"
    monkeypatch.setattr(colad_book, "busy_cores", lambda: 0.1)
    # the sweep ended: every core again
    colad_book._enter_chapter(None, "lad", ["```{code-cell} ipython3"])
    assert "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the reader's own setting is kept
    monkeypatch.setattr(colad_book, "busy_cores", lambda: 3.0)
    colad_book._enter_chapter(None, "ld", ["```{code-cell} ipython3"])
    assert os.environ["OMP_NUM_THREADS"] == "3"


def test_how_many_chapters_execute_at_once(monkeypatch):
    monkeypatch.syspath_prepend(str(BOOK / "_ext"))
    import colad_book

    assert colad_book.jobs_for("quick", 2, 0.1) == 2  # idle: one chapter per core
    assert colad_book.jobs_for(None, 16, 0.0) == colad_book.MAX_JOBS
    assert colad_book.jobs_for("smoke", 2, 1.8) == 1  # a sweep beside the build: one at a time
    assert colad_book.jobs_for("full", 16, 0.0) == 1  # chapters may train on the one GPU
    assert colad_book.jobs_for("full", 16, 0.0, "3") == 3  # the reader's setting wins
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match="COLAD_BOOK_JOBS"):
            colad_book.jobs_for("quick", 2, 0.0, bad)
    assert 0 <= colad_book.busy_cores(0.05) <= os.cpu_count()


def test_the_benchmark_is_written_before_chapters_execute_together(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BOOK / "_ext"))
    import colad_book
    from sphinx.errors import ExtensionError

    monkeypatch.setenv("COLAD_DATA", str(tmp_path))
    colad_book._prepare_data("full")  # COCO or your own files: nothing to write
    assert not (tmp_path / "synth").exists()
    colad_book._prepare_data("smoke")
    assert list(tmp_path.glob("synth/shapes-smoke-*/COMPLETE"))
    with pytest.raises(ExtensionError, match="could not write the fast benchmark"):
        colad_book._prepare_data("fast")


_MINI_CHAPTER = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  name: python3
  display_name: Python 3
---

# {title}

```{{code-cell}} ipython3
import os
print("{title}", os.environ["COLAD_CHAPTER"].split("@")[0], os.environ.get("OMP_NUM_THREADS"))
{extra}
```
"""


@pytest.mark.book
@pytest.mark.slow
def test_chapters_execute_together_and_a_failure_fails_the_build(tmp_path):
    """Chapters executed ahead, two at a time, land in the execution cache where Sphinx's read
    finds them; a chapter that raises fails the build and is named."""
    book = tmp_path / "book"
    shutil.copytree(BOOK / "_ext", book / "_ext")
    (book / "_config.yml").write_text(
        "title: mini\nexecute:\n  execute_notebooks: cache\n"
        "sphinx:\n  local_extensions:\n    colad_book: _ext/\n"
        "  config:\n    nb_execution_raise_on_error: true\n"
    )
    (book / "_toc.yml").write_text(
        "format: jb-book\nroot: intro\nchapters:\n- file: one\n- file: two\n- file: three\n"
        "- file: solo\n"
    )
    (book / "intro.md").write_text("# Intro\n\nNo code here.\n")
    for name in ("one", "two"):
        (book / f"{name}.md").write_text(_MINI_CHAPTER.format(title=name, extra=""))
    (book / "three.md").write_text(
        _MINI_CHAPTER.format(title="three", extra='raise RuntimeError("chapter three broke")')
    )
    alone = _MINI_CHAPTER.format(title="solo", extra="").replace(
        "kernelspec:", "colad:\n  execute: alone\nkernelspec:"
    )
    (book / "solo.md").write_text(alone)  # it times code: by itself, after the others
    env = {**os.environ, "COLAD_PROFILE": "smoke", "COLAD_BOOK_JOBS": "2",
           "COLAD_DATA": str(tmp_path / "data")}  # fmt: skip
    env.pop("OMP_NUM_THREADS", None)
    command = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(book)]

    def build():
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        return proc.returncode, proc.stdout + proc.stderr

    returncode, log = build()
    assert returncode != 0, log
    started = next(line for line in log.splitlines() if "colad: executing" in line)
    assert "executing 3 chapters, 2 at a time" in started and "solo" not in started, log
    assert "three FAILED" in log and "chapter three broke" in log, log
    assert "executing failed: three" in log, log
    assert "one executed" in log and "two executed" in log, log

    # mended, the build reads one and two from the cache and executes only three
    (book / "three.md").write_text(_MINI_CHAPTER.format(title="three", extra=""))
    returncode, log = build()
    assert returncode == 0, log
    assert "one executed" not in log and "two executed" not in log, log
    html = (book / "_build" / "html" / "one.html").read_text()
    assert "one one 1" in html  # its own chapter name, and one thread of two cores' share
    assert "solo solo" in (book / "_build" / "html" / "solo.html").read_text()


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


def _chromium() -> str | None:
    """The system's Chromium (Debian's ``chromium`` package), if any."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="module")
def served_book(smoke_book):
    """The built smoke book over HTTP on a free local port (as a reader's browser gets it)."""
    tmp_path, proc = smoke_book
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    html = tmp_path / "_build" / "html"
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(html))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()


# What a page shows as text, without code, math and scripts: where raw TeX must not remain.
_PROSE = """() => {
  const main = document.querySelector('main').cloneNode(true);
  main.querySelectorAll('pre, code, script, style, mjx-container, .MathJax, .highlight')
      .forEach(e => e.remove());
  return main.innerText;
}"""


# Display equations that do not fit the text column (cut off or scrolled in the page).
_WIDE_EQUATIONS = """() => [...document.querySelectorAll('mjx-container[display="true"]')]
  .filter(e => e.querySelector('mjx-math').getBoundingClientRect().width
               > e.getBoundingClientRect().width + 1)
  .map(e => e.textContent.slice(0, 40))"""


@pytest.mark.book
@pytest.mark.browser
@pytest.mark.slow
def test_every_page_reads_well_in_a_real_browser(served_book):
    """Headless Chromium, offline: every page loads without broken images or error outputs,
    its math is typeset (no raw TeX left), every image has alt text, no page shows a path of
    the machine that built it, and previous/next lead through the chapters in order."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium package)")
    from playwright.sync_api import sync_playwright

    base, tmp_path = served_book
    pages = toc_files()
    shots = os.environ.get("COLAD_BROWSER_SHOTS")
    problems = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        outside = []
        page.route(  # offline, as the book must work: any request to another host fails
            "**/*",
            lambda route: (route.continue_() if route.request.url.startswith(base)
                           else (outside.append(route.request.url), route.abort())),
        )  # fmt: skip
        for k, name in enumerate(pages):
            page.goto(f"{base}/{name}.html", wait_until="load")
            page.wait_for_function("() => !window.MathJax || !MathJax.startup || "
                                   "MathJax.startup.promise !== undefined")  # fmt: skip
            page.evaluate("() => window.MathJax?.startup?.promise")
            images = page.eval_on_selector_all(
                "main img", "els => els.map(e => [e.getAttribute('src'), e.naturalWidth, "
                "(e.getAttribute('alt') || '').trim()])",
            )  # fmt: skip
            for src, width, alt in images:
                if not width:
                    problems.append(f"{name}: broken image {src}")
                if not alt:
                    problems.append(f"{name}: image without alt text {src}")
                elif alt.endswith((".png", ".svg", ".jpg")) or alt == src:
                    problems.append(f"{name}: image whose alt text is its file name {src}")
            # listings (not outputs) fit the column, folded ones too once the reader opens them
            page.evaluate("() => document.querySelectorAll('details').forEach(d => d.open = true)")
            scrolling = page.eval_on_selector_all(
                "main div.highlight pre",
                "els => els.filter(e => !e.closest('.cell_output') && "
                "e.scrollWidth > e.clientWidth + 1).map(e => e.innerText.slice(0, 60))",
            )  # fmt: skip
            problems += [f"{name}: listing wider than the column: {t!r}" for t in scrolling]
            errors = page.locator("main .output.error, main .output.traceback").count()
            if errors:
                problems.append(f"{name}: {errors} error output(s)")
            text = page.evaluate(_PROSE)
            for raw in ("\\(", "\\[", "$$", "\\begin{", "\\frac"):
                if raw in text:
                    where = text.index(raw)
                    problems.append(f"{name}: raw TeX {text[max(0, where - 40) : where + 40]!r}")
            if page.locator("main .math").count() and not page.locator("mjx-container").count():
                problems.append(f"{name}: math was not typeset")
            wide = page.evaluate(_WIDE_EQUATIONS)
            if wide:
                problems.append(f"{name}: equations wider than the text column: {wide}")
            for machine_path in (str(tmp_path), str(BOOK.parent)):
                if machine_path in page.inner_text("main"):
                    problems.append(f"{name}: shows the build machine's path {machine_path}")
            links = {
                direction: page.eval_on_selector_all(
                    f"a.{direction}", "els => els.map(e => e.getAttribute('href'))"
                )
                for direction in ("left-prev", "right-next")
            }
            if k > 0 and links["left-prev"][:1] != [f"{pages[k - 1]}.html"]:
                problems.append(f"{name}: previous is {links['left-prev']}, not {pages[k - 1]}")
            if k + 1 < len(pages) and links["right-next"][:1] != [f"{pages[k + 1]}.html"]:
                problems.append(f"{name}: next is {links['right-next']}, not {pages[k + 1]}")
            if shots:
                page.screenshot(path=str(Path(shots) / f"{name}.png"), full_page=True)
        # following "next" from the first page visits every chapter in order
        page.goto(f"{base}/{pages[0]}.html")
        visited = [pages[0]]
        while page.locator("a.right-next").count():
            page.locator("a.right-next").first.click()
            page.wait_for_load_state("load")
            visited.append(page.url.rsplit("/", 1)[-1].removesuffix(".html"))
        if visited != pages:
            problems.append(f"next leads through {visited}, not {pages}")
        browser.close()
    assert not outside, f"pages asked other hosts for {outside[:3]}"
    assert not problems, "\n".join(problems)
