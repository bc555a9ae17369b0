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
