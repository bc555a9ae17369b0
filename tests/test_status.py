"""The status page's records: which runs each chapter's latest execution read."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from colad import status


def _result(name: str, reused: bool):
    return SimpleNamespace(path=Path(f"/runs/{name}-0123456789"), reused=reused,
                           experiment=SimpleNamespace(name=name), metrics={"AP": 0.25},
                           summary={"train_seconds": 12.0})  # fmt: skip


def test_runs_by_chapter_keeps_each_chapters_latest_execution(tmp_path, monkeypatch):
    log = tmp_path / "runs.jsonl"
    monkeypatch.setenv(status.RUN_LOG, str(log))
    monkeypatch.setenv(status.CHAPTER, "lad@1")
    status.record_run(_result("paa", reused=True))
    status.record_run(_result("old", reused=False))
    monkeypatch.setenv(status.CHAPTER, "lad@2")  # the chapter executed again
    status.record_run(_result("lad", reused=False))
    status.record_run(_result("lad", reused=True))  # the sweep reads what it just trained
    monkeypatch.setenv(status.CHAPTER, "ld@3")
    status.record_run(_result("paa", reused=True))
    with open(log, "a") as f:
        f.write('{"chapter": "ld", "cut off')  # a line cut by a killed build is skipped
    runs = status.runs_by_chapter(log)
    assert [r["run"] for r in runs["lad"]] == ["lad-0123456789"]
    assert runs["lad"][0]["reused"] is False  # trained by this execution, then read
    assert [(r["run"], r["reused"]) for r in runs["ld"]] == [("paa-0123456789", True)]
    assert json.loads(log.read_text().splitlines()[0])["AP"] == 0.25
    assert status.runs_by_chapter(tmp_path / "absent.jsonl") == {}


def test_nothing_is_recorded_outside_a_book_build(tmp_path, monkeypatch):
    monkeypatch.delenv(status.RUN_LOG, raising=False)
    status.record_run(_result("paa", reused=True))
    assert not list(tmp_path.iterdir())
    facts = status.build_facts()
    assert {"colad", "git commit", "profile", "device", "PyTorch"} <= set(facts)


def test_readme_results_come_from_the_run_directories(data_root, tmp_path, monkeypatch):
    import pytest

    from colad import sweep

    monkeypatch.setenv("COLAD_DATA", str(data_root))
    planned = sweep.plan(["paa-small", "lad"], (0, 1), profile="smoke")
    monkeypatch.setattr(sweep, "book_plan", lambda profile=None: planned)
    done = sweep.sweep(["paa-small", "lad"], (0, 1), profile="smoke", log=None)
    rows, missing = status.book_results("smoke")
    assert missing == []
    lad = {r["seed"]: r["AP"] for r in rows if r["experiment"] == "lad"}
    assert lad == {s: done.results[("lad", s)].metrics["AP"] for s in (0, 1)}
    text = status.results_markdown("smoke")
    expected = sweep.mean_std([lad[0], lad[1]])
    assert f"| `lad` | {planned[-1][2].model.backbone} |  | 2 | {expected} |" in text
    gain = sweep.compare(done.rows, "lad", "paa-small")
    assert f"| LAD | {gain['gain']:+.3f} ± {gain['se']:.3f} |" in text
    assert "+1.2 (R101 -> R50, Table 2)" in text  # the paper's, labelled

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{status.RESULTS_BEGIN}\nold numbers\n{status.RESULTS_END}\nafter\n")
    status.write_results(readme, text)
    written = readme.read_text()
    assert "old numbers" not in written and text in written and written.endswith("after\n")
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        status.write_results(readme, text)

    untrained = sweep.plan(["paa-small"], (97,), profile="smoke")  # a seed no test trains
    monkeypatch.setattr(sweep, "book_plan", lambda profile=None: planned + untrained)
    text = status.results_markdown("smoke")
    assert "Not in the run cache when this was generated: paa-small (" in text
    assert text.rstrip().endswith("seed 97.")
