"""The sweep runner (plan, progress, tables, comparisons, parallel jobs, the command line) and the
distillation chapters' figures, on smoke runs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import statistics  # noqa: E402

import pytest  # noqa: E402

from colad import config, engine, sweep, viz  # noqa: E402
from colad.__main__ import main  # noqa: E402

pytestmark = pytest.mark.slow


def test_plan_puts_teachers_first_and_counts_each_run_once():
    runs = sweep.plan(["lad", "lad-up", "paa-small"], (0, 1), profile="smoke")
    names = [(name, seed) for name, seed, _ in runs]
    assert names[:2] == [("paa", 0), ("paa-small", 0)]  # the teachers of lad and lad-up
    assert names.count(("paa-small", 0)) == 1  # a teacher that is also a student: one run
    assert len(runs) == 2 + 3 * 2 - 1
    seeds = {seed for name, seed, e in runs if name == "lad"}
    assert seeds == {0, 1} and all(e.train.seed == s for _, s, e in runs)


@pytest.fixture(scope="module")
def smoke_sweep(data_root) -> sweep.Sweep:
    lines = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLAD_DATA", str(data_root))
        result = sweep.sweep(["paa-small", "lad", "colad"], (0, 1), profile="smoke",
                             log=lines.append)  # fmt: skip
    result.lines = lines
    return result


def test_sweep_reports_each_run_and_returns_tidy_rows(smoke_sweep, in_data_root):
    lines = smoke_sweep.lines
    assert lines[0].startswith("sweep: 7 runs") and lines[-1].startswith("sweep: done")
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 7 and progress[-1].startswith("[7/7]")
    rows = smoke_sweep.rows
    assert {r["experiment"] for r in rows} == {"paa-small", "lad", "colad"}  # not the teacher
    assert len(rows) == 2 + 2 + 2 * 2  # CoLAD: a row per network
    assert {r["network"] for r in rows if r["experiment"] == "colad"} == {"net1", "net2"}
    assert ("paa", 0) in smoke_sweep.results  # the teacher's run is at hand
    again = sweep.sweep(["paa-small", "lad", "colad"], (0, 1), profile="smoke", log=None)
    assert all(r["reused"] and r["wall_seconds"] == 0 for r in again.rows)
    assert [r["AP"] for r in again.rows] == [r["AP"] for r in rows]


def test_summaries_and_comparisons(smoke_sweep):
    summary = smoke_sweep.summary()
    assert list(summary["experiment"]) == ["paa-small", "lad", "colad", "colad"]
    row = summary.iloc[0]
    values = [r["AP"] for r in smoke_sweep.rows if r["experiment"] == "paa-small"]
    assert row["AP mean"] == pytest.approx(sum(values) / 2)
    assert row["AP"] == sweep.mean_std(values) and "±" in row["AP"]
    verdict = sweep.compare(smoke_sweep.rows, "lad", "paa-small")
    assert verdict["seeds"] == (2, 2) and verdict["se"] >= 0
    assert verdict["beyond_noise"] == (abs(verdict["gain"]) > 2 * verdict["se"] > 0)
    with pytest.raises(ValueError, match="no rows for 'colad' \\(model\\)"):
        sweep.compare(smoke_sweep.rows, "colad", "paa-small")
    table = sweep.beside_paper(
        summary, {"paa-small": ("alone", 40.4), "lad": ("LAD", 41.6)}, baseline="paa-small"
    )
    assert list(table["paper (COCO, 0-100)"]) == ["40.4", "41.6"]
    assert list(table["gain (paper)"]) == ["-", "+1.2"]
    assert sweep.mean_std([0.5]) == "0.500" and sweep.mean_std([]) == "-"


def test_paired_comparison_uses_the_per_seed_differences():
    rows = [{"experiment": e, "network": "model", "seed": seed, "AP": ap}
            for e, aps in (("a", [0.10, 0.20, 0.30]), ("b", [0.11, 0.22, 0.30]))
            for seed, ap in enumerate(aps)]  # fmt: skip
    paired = sweep.compare(rows, "b", "a", paired=True)
    diffs = [0.01, 0.02, 0.0]
    assert paired["gain"] == pytest.approx(0.01)
    assert paired["se"] == pytest.approx(statistics.stdev(diffs) / 3**0.5)
    unpaired = sweep.compare(rows, "b", "a")
    assert unpaired["gain"] == pytest.approx(0.01) and unpaired["se"] > 5 * paired["se"]
    assert paired["beyond_noise"] is False  # 0.01 < 2 * 0.0058
    with pytest.raises(ValueError, match="same seeds"):
        sweep.compare(rows[:2] + rows[3:], "b", "a", paired=True)
    for row in rows:
        row["APl"] = float("nan")  # what COCO gives without large objects
    with pytest.raises(ValueError, match="APl of 'b' .* undefined"):
        sweep.compare(rows, "b", "a", metric="APl")


def test_the_chapters_figures(smoke_sweep, in_data_root):
    student = smoke_sweep.results[("paa-small", 0)]
    teacher = smoke_sweep.results[("paa", 0)]
    _, val = student.datasets()
    fig, facts = viz.own_vs_teacher(student.load_model(), teacher.load_model(), val, range(40))
    assert 0 <= facts["index"] < len(val) and facts["shared"] <= min(facts["own"], facts["teacher"])
    assert len(fig.axes) == 2
    fig = viz.plot_switch(smoke_sweep.results[("colad", 0)].history, window=3)
    assert len(fig.axes[0].lines) == 1 + 3 + 1  # all levels, P3-P5, the half line
    with pytest.raises(ValueError, match="not a CoLAD history"):
        viz.plot_switch(student.history)
    fig = viz.plot_comparison(smoke_sweep.summary())
    assert len(fig.axes[0].patches) == 4


def test_parallel_jobs_give_the_same_runs(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("COLAD_DATA", str(tmp_path))  # nothing cached here but the benchmark
    (tmp_path / "synth").symlink_to(data_root / "synth")
    lines = []
    # The unscored row needs its training twin: workers train the twins first, then the rows.
    result = sweep.sweep(["paa-iop-noiou-infer"], (0, 1), profile="smoke", jobs=2,
                         log=lines.append)  # fmt: skip
    assert "4 to train (2 at a time)" in lines[0] and len(result.rows) == 2
    order = [line.split(":")[0].split("] ")[1] for line in lines[1:-1]]
    assert order[:2] == ["paa-iop seed 0", "paa-iop seed 1"] or order[:2] == [
        "paa-iop seed 1", "paa-iop seed 0"]  # fmt: skip
    serial = engine.run(config.experiment("paa-iop-noiou-infer", "smoke"), progress=False)
    assert serial.reused  # a worker process made exactly this run, into the same cache
    seed0 = next(r for r in result.rows if r["seed"] == 0)
    assert seed0["run"] == serial.path.name and not seed0["reused"]
    twin = engine.run(config.experiment("paa-iop", "smoke"), progress=False)
    assert twin.reused and serial.summary["trained_by"] == twin.path.name


def test_sweep_command_prints_mean_and_std(smoke_sweep, in_data_root, capsys):
    assert main(["sweep", "paa-small", "lad", "--profile", "smoke", "--seeds", "0", "1"]) == 0
    out = capsys.readouterr().out
    assert "[5/5]" in out and "reused" in out and "±" in out
    assert main(["sweep", "paa-small", "--teacher", "paa", "--profile", "smoke"]) == 2
    assert "has no teacher" in capsys.readouterr().err


def test_method_benchmark_reports_its_ratio():
    from colad import bench

    small = config.experiment("paa-small", "smoke").model
    big = config.experiment("paa-big", "smoke").model
    for method in ("lad", "colad"):
        r = bench.bench_method(method, small, big, image_size=(64, 64), batch=2, repeats=1)
        assert r["ratio"] == pytest.approx(r["method_ms"] / r["reference_ms"])
        assert r["method_ms"] > 0 and r["target"] in (1.1, 1.05)
    with pytest.raises(ValueError, match="method"):
        bench.bench_method("kd", small, big)


def test_sweep_book_plans_each_chapter_run_once_and_takes_no_other_options(capsys):
    runs = sweep.book_plan("quick")
    paths = [engine.run_path(e) for _, _, e in runs]
    assert len(paths) == len(set(paths))
    names = {name for name, _, _ in runs}
    assert {"paa", "lad", "colad", "ld", "gfl", "paa-cop"} <= names
    assert main(["sweep", "book", "lad"]) == 2
    assert "no other names" in capsys.readouterr().err


def test_cached_computes_once_per_key(tmp_path, monkeypatch):
    monkeypatch.setenv("COLAD_DATA", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    assert sweep.cached("demo", ["a", 1], compute) == {"value": 1}
    assert sweep.cached("demo", ["a", 1], compute) == {"value": 1}  # read back
    assert sweep.cached("demo", ["a", 2], compute) == {"value": 2}  # another key
    assert sweep.cache_path("demo", ["a", 1]).parent == tmp_path / "cache" / "demo"
    # a stored value the caller refuses is computed again and replaced
    refuse_one = lambda v: v["value"] != 1  # noqa: E731
    assert sweep.cached("demo", ["a", 1], compute, valid=refuse_one) == {"value": 3}
    assert sweep.cached("demo", ["a", 1], compute) == {"value": 3}
    assert not list((tmp_path / "cache" / "demo").glob("*.tmp"))


def test_cached_warns_when_the_root_cannot_be_written(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("COLAD_DATA", str(blocker))  # cache/ cannot be made under a file
    with pytest.warns(UserWarning, match="not cached"):
        assert sweep.cached("demo", ["x"], lambda: 7) == 7


def test_a_parallel_sweep_writes_the_benchmark_before_its_workers_start(tmp_path, monkeypatch):
    # workers that each found the benchmark missing would write it at once, one replacing the
    # folder the other reads: the sweep writes it before the pool starts
    monkeypatch.setenv("COLAD_DATA", str(tmp_path))
    written = []

    class Pool:
        def __init__(self, *args, **kwargs):
            written.append(any(tmp_path.glob("synth/*/COMPLETE")))

        def __enter__(self):
            raise RuntimeError("no workers in this test")

        def __exit__(self, *args):
            return False

    monkeypatch.setattr(sweep, "ProcessPoolExecutor", Pool)
    with pytest.raises(RuntimeError, match="no workers"):
        sweep.sweep(["paa"], (0,), profile="smoke", jobs=2, log=None)
    assert written == [True]
