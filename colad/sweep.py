"""The sweep runner: named experiments over seeds, through the run cache, as one tidy table.

:func:`sweep` trains (or finds in the run cache) every ``(experiment, seed)`` pair, one progress
line per run with the total time left, and returns a :class:`Sweep`: one row per run and network
(experiment, seed, network, COCO metrics, wall time). :func:`summarize` gives mean ± std per
experiment and :func:`beside_paper` puts them next to the paper's numbers. Chapters and
``python -m colad sweep NAME... --seeds 0 1 2 [--jobs N]`` use it.

Teachers come first: a distillation experiment's named teacher (its seed-0 run) is trained before
the students that need it, so that parallel jobs never train one teacher twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from colad import config, data, engine, status
from colad.config import Experiment

__all__ = [
    "plan", "Sweep", "sweep", "book_plan", "sweep_book", "summarize", "beside_paper", "mean_std",
    "compare", "cache_path", "cached",
]  # fmt: skip


def plan(
    names: Iterable[str],
    seeds: Sequence[int] = (0, 1, 2),
    *,
    profile: str | None = None,
    teachers: bool = True,
    **options,
) -> list[tuple[str, int, Experiment]]:
    """The runs of a sweep, ``(name, seed, experiment)``, teachers first.

    Args:
        names: named experiments (:data:`colad.config.EXPERIMENTS`).
        seeds: the training seeds (initialisation, data order, augmentation).
        profile: default ``$COLAD_PROFILE``.
        teachers: also plan the named teachers the students need (seed 0, before them).
        options: passed to every :func:`colad.config.experiment` (e.g. ``backbone``).
    """
    profile = profile or config.profile_from_env()
    runs, seen = [], set()

    def add(name: str, seed: int, experiment: Experiment) -> None:
        key = engine.run_path(experiment)
        if key not in seen:
            seen.add(key)
            runs.append((name, seed, experiment))

    students = []
    for name in names:
        base = config.experiment(name, profile, **options)
        for seed in seeds:
            train = dataclasses.replace(base.train, seed=seed)
            students.append((name, seed, dataclasses.replace(base, train=train)))
    if teachers:  # on the students' data (your own dataset included), as engine.run trains them
        for _, _, experiment in students:
            spec = experiment.distill.teacher
            if spec in config.EXPERIMENTS:
                add(spec, 0, engine.teacher_source(experiment))
    for name, seed, experiment in students:  # a "trained but not used" row's training first
        if (twin := config.training_twin(experiment)) is not None:
            add(name.replace("-noiou-infer", ""), seed, twin)
    for run in students:
        add(*run)
    return runs


@dataclasses.dataclass
class Sweep:
    """What :func:`sweep` returns.

    Attributes:
        rows: one dict per requested run and network: ``experiment`` (the name), ``seed``,
            ``network`` (``model``, or CoLAD's ``net1`` / ``net2``), the COCO metrics,
            ``train_seconds``, ``wall_seconds`` (0 for a reused run), ``reused`` and ``run``.
        results: the :class:`colad.engine.RunResult` of each ``(name, seed)``.
    """

    rows: list[dict]
    results: dict[tuple[str, int], engine.RunResult]

    def table(self):
        """The rows as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def summary(self, metrics: Sequence[str] = ("AP", "AP50")):
        """:func:`summarize` of the rows."""
        return summarize(self.rows, metrics)


def _rows(name: str, seed: int, result: engine.RunResult, wall: float) -> list[dict]:
    return [
        {
            "experiment": name,
            "seed": seed,
            "network": network,
            **metrics,
            "train_seconds": result.summary["train_seconds"],
            "wall_seconds": round(wall, 1),
            "reused": result.reused,
            "run": result.path.name,
        }  # fmt: skip
        for network, metrics in result.networks.items()
    ]


def _run_one(experiment: dict, path: str, threads: int) -> tuple[str, float]:
    """A worker process's job: one run into ``path``, with its share of the cores; returns the
    run path and the seconds it took (in the worker, not counting the time queued)."""
    import torch

    torch.set_num_threads(threads)
    tick = time.perf_counter()
    result = engine.run(Experiment.from_dict(experiment), path=path, progress=False)
    return str(result.path), time.perf_counter() - tick


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def sweep(
    names: Iterable[str],
    seeds: Sequence[int] = (0, 1, 2),
    *,
    profile: str | None = None,
    jobs: int = 1,
    log: Callable[[str], None] | None = print,
    **options,
) -> Sweep:
    """Train or load every ``(experiment, seed)`` and gather their metrics.

    Each finished run prints one line: its position, name, seed, whether it was trained or
    reused, its AP and wall time, and the estimated time left (each run still to train at the
    mean time of the runs of its experiment trained so far).

    Args:
        names, seeds, profile, options: as :func:`plan`.
        jobs: runs trained at once, each in its own process with ``cores / jobs`` threads
            (1: in this process, one after another).
        log: where the progress lines go (``None``: nowhere).

    Returns:
        :class:`Sweep`: rows for the requested experiments and seeds; ``results`` also holds
        the teachers trained on the way.
    """
    names = list(names)
    runs = plan(names, seeds, profile=profile, **options)
    rows_of = {(name, seed) for name in names for seed in seeds}
    return _execute(runs, rows_of, jobs, log)


def _execute(runs, rows_of: set[tuple[str, int]], jobs: int, log) -> Sweep:
    """Train or load the planned ``runs``; rows for the ``(name, seed)`` pairs in ``rows_of``."""
    if jobs < 1:
        raise ValueError(f"jobs={jobs}: need at least one")
    log = log or (lambda line: None)
    paths = [engine.run_path(e) for _, _, e in runs]  # each hashes the source: once per run
    cached = [engine.load_run(path, e) for path, (_, _, e) in zip(paths, runs, strict=True)]
    to_train = sum(1 for done in cached if done is None)
    log(f"sweep: {len(runs)} runs, {len(runs) - to_train} in the run cache, {to_train} to train"
        + (f" ({jobs} at a time)" if jobs > 1 and to_train else ""))  # fmt: skip
    waiting = [name for (name, _, _), done in zip(runs, cached, strict=True) if done is None]
    seconds: dict[str, list[float]] = {}  # wall times of the runs trained so far, by name
    state = {"done": 0}
    rows, results = [], {}

    def time_left() -> str:
        """Each run still to train is expected to take the mean time of the runs of the same
        experiment trained so far (of all runs when none of it has run yet)."""
        trained = [t for times in seconds.values() for t in times]
        if not waiting:
            return "done"
        if not trained:
            return "..."
        overall = statistics.fmean(trained)
        expected = sum(statistics.fmean(seconds.get(n, [overall])) for n in waiting)
        return f"{_clock(expected / jobs)} left"

    def finished(name: str, seed: int, result: engine.RunResult, wall: float) -> None:
        state["done"] += 1
        if not result.reused:
            seconds.setdefault(name, []).append(wall)
            waiting.remove(name)
        what = "reused" if result.reused else f"trained in {_clock(wall)}"
        log(f"[{state['done']}/{len(runs)}] {name} seed {seed}: {what}, "
            f"AP {result.metrics['AP']:.3f} ({time_left()})")  # fmt: skip
        results[(name, seed)] = result
        if result.reused:  # read from the cache here; engine.run records the runs it trains
            status.record_run(result)
        if (name, seed) in rows_of:  # a teacher trained on the way is not a row
            rows.extend(_rows(name, seed, result, wall if not result.reused else 0.0))

    started = time.perf_counter()
    if jobs == 1:
        for (name, seed, experiment), path, done in zip(runs, paths, cached, strict=True):
            tick = time.perf_counter()
            result = done or engine.run(experiment, path=path, progress=False)
            finished(name, seed, result, time.perf_counter() - tick)
    else:
        _sweep_parallel(runs, paths, cached, jobs, finished)
    log(f"sweep: done in {_clock(time.perf_counter() - started)}")
    return Sweep(rows, results)


def book_plan(profile: str | None = None) -> list[tuple[str, int, Experiment]]:
    """Every run the book's chapters read in ``profile``, teachers first, each once: what
    ``python -m colad sweep book`` trains beforehand so that a build only reads runs.

    It mirrors the chapters' own sweeps (the book test checks that a smoke build trains exactly
    these runs): the training, label-assignment and PAA chapters read ``paa``; LAD
    and CoLAD their methods over three seeds; COP its Table 1 rows per backbone; LAD-and-LD both
    sides of Table 2; TIDE the small PAA network alone, with CoLAD and with CoLAD-COP.
    """
    profile = profile or config.profile_from_env()
    seeds = (0, 1) if profile == "smoke" else (0, 1, 2)
    groups: list[tuple[list[str], tuple[int, ...], dict]] = [
        (["paa"], (0,), {}),
        (["paa-small", "kd", "lad", "solad", "paa-big", "lad-up"], (0, 1, 2), {}),  # lad.md
        (["colad", "colad-fisher", "paa-small", "paa-big"], (0, 1, 2), {}),  # colad.md
        (["paa", "gfl"], (0,), {}),  # ld.md
        (["paa-small", "lad", "colad", "solad", "gfl-small", "ld"], seeds, {}),
        (["paa-small", "colad", "colad-cop"], seeds, {}),  # tide.md
    ]
    table1 = [name for name, _, _ in config.TABLE1_ROWS]
    for k, backbone in enumerate(COP_BACKBONES.get(profile, COP_BACKBONES["full"])):  # cop.md
        groups.append((table1 if k == 0 else table1[:5], seeds, {"backbone": backbone}))
    runs, seen = [], set()
    for names, group_seeds, options in groups:
        for name, seed, experiment in plan(names, group_seeds, profile=profile, **options):
            path = engine.run_path(experiment)
            if path not in seen:
                seen.add(path)
                runs.append((name, seed, experiment))
    return runs


#: The backbones of the chapter "Conditional objectness" by profile, the first with all seven
#: rows of Table 1 (quick leaves EfficientNet-B0 out, for the chapter's time budget).
COP_BACKBONES = {
    "smoke": ("resnet18", "repvgg_a0"),
    "quick": ("resnet18", "repvgg_a0", "resnet50"),
    "full": ("resnet18", "efficientnet_b0", "repvgg_a0", "resnet50"),
}


def sweep_book(profile: str | None = None, *, jobs: int = 1, log=print) -> Sweep:
    """Train (or find) every run of :func:`book_plan`, with progress and the time left."""
    runs = book_plan(profile)
    return _execute(runs, {(name, seed) for name, seed, _ in runs}, jobs, log)


def _sweep_parallel(runs, paths, cached, jobs, finished) -> None:
    """Reused runs at once; then, ``jobs`` at a time, the runs others depend on (teachers, and
    the training twins of rows that only rescore a twin's weights); then all the others.

    Two waves, so that no worker trains a teacher or twin that another worker is training for
    its own row at the same moment (the run lock would make one of them wait, idle)."""
    teachers = {e.distill.teacher for _, _, e in runs if e.distill.teacher}
    twins = {engine.run_path(t) for _, _, e in runs if (t := config.training_twin(e))}
    first, then = [], []
    for (name, seed, experiment), path, done in zip(runs, paths, cached, strict=True):
        if done is not None:
            finished(name, seed, done, 0.0)
        else:
            needed = name in teachers or path in twins
            (first if needed else then).append((name, seed, experiment, path))
    # the data first, here: workers that each wrote a missing benchmark at once would replace
    # it under each other's feet
    for data_config in {e.data for _, _, e, _ in first + then}:
        for split in ("train", "val"):
            data.dataset_paths(data_config, split)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        for wave in (first, then):
            futures = {}
            for name, seed, experiment, path in wave:
                future = pool.submit(_run_one, experiment.to_dict(), str(path), threads)
                futures[future] = (name, seed, experiment)
            for future in as_completed(futures):
                name, seed, experiment = futures[future]
                path, seconds = future.result()  # re-raises a worker's error
                result = engine.load_run(path, experiment)
                result.reused = False
                finished(name, seed, result, seconds)


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``"mean ± std"`` (sample std; just the value for one run)."""
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarize(rows: Sequence[dict], metrics: Sequence[str] = ("AP", "AP50")):
    """Mean and sample std of ``metrics`` per (experiment, network), with the number of seeds
    and the mean training time, as a pandas DataFrame (one row each, in the rows' order)."""
    import pandas as pd

    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["experiment"], row["network"]), []).append(row)
    out = []
    for (name, network), members in groups.items():
        entry = {"experiment": name, "network": network, "seeds": len(members)}
        for metric in metrics:
            values = [m[metric] for m in members]
            entry[f"{metric} mean"] = statistics.fmean(values)
            entry[f"{metric} std"] = statistics.stdev(values) if len(values) > 1 else math.nan
            entry[metric] = mean_std(values)
        entry["train s"] = round(statistics.fmean(m["train_seconds"] for m in members), 1)
        out.append(entry)
    return pd.DataFrame(out)


def beside_paper(
    summary,
    paper: dict[str, tuple[str, float | None]],
    *,
    baseline: str,
    metric: str = "AP",
):
    """Our mean ± std and gain over ``baseline`` next to the paper's number and gain.

    Args:
        summary: from :func:`summarize` (one network per experiment is used: the first).
        paper: ``{experiment: (paper's row label, paper's AP in 0-100 or None)}``, in the order
            to show; the baseline's entry gives the paper's reference.
        baseline: the experiment the gains are measured from.

    Returns:
        A DataFrame with columns method, ours, gain (ours), paper, gain (paper); our numbers on
        0-1 like pycocotools, the paper's on COCO's 0-100, as published.
    """
    import pandas as pd

    first = summary.drop_duplicates("experiment").set_index("experiment")
    ours = first[f"{metric} mean"]
    paper_base = paper[baseline][1]
    rows = []
    for name, (label, value) in paper.items():
        if name not in first.index:
            continue
        gain = ours[name] - ours[baseline]
        rows.append({
            "method": label, "ours": first.loc[name, metric],
            "gain (ours)": "-" if name == baseline else f"{gain:+.3f}",
            "paper (COCO, 0-100)": "-" if value is None else f"{value:.1f}",
            "gain (paper)": "-" if name == baseline or value is None or paper_base is None
            else f"{value - paper_base:+.1f}",
        })  # fmt: skip
    return pd.DataFrame(rows)


def compare(rows: Sequence[dict], method: str, baseline: str, *, metric: str = "AP",
            networks: tuple[str, str] = ("model", "model"),
            paired: bool = False) -> dict:  # fmt: skip
    """How ``method`` differs from ``baseline`` over seeds, and whether the seeds' spread can
    explain it.

    The difference of the means is compared with its standard error,
    ``se = sqrt(s_m^2 / n_m + s_b^2 / n_b)`` (sample stds over seeds): ``beyond_noise`` when
    ``|gain| > 2 se``. With a handful of seeds this is a rough guide, not a significance test.
    ``paired``: the two share each seed's network (e.g. one set of weights scored two ways), so
    the per-seed differences are compared instead: ``se = s_d / sqrt(n)``.

    Args:
        rows: :attr:`Sweep.rows`.
        networks: which network of each experiment (CoLAD's ``net1`` / ``net2``).
        paired: compare seed by seed (both must have the same seeds).

    Returns:
        ``{"gain", "se", "beyond_noise", "method", "baseline", "seeds"}``.
    """

    def values(name: str, network: str) -> list[float]:
        found = [r[metric] for r in rows if r["experiment"] == name and r["network"] == network]
        if not found:
            raise ValueError(f"no rows for {name!r} ({network})")
        if any(math.isnan(v) for v in found):
            raise ValueError(f"{metric} of {name!r} ({network}) is undefined (NaN) for some seeds: "
                             f"COCO leaves it undefined when no object of the validation set "
                             f"counts for it (e.g. APl without large objects)")  # fmt: skip
        return found

    a, b = values(method, networks[0]), values(baseline, networks[1])
    if paired:
        seeds = [[r["seed"] for r in rows if r["experiment"] == n and r["network"] == net]
                 for n, net in ((method, networks[0]), (baseline, networks[1]))]  # fmt: skip
        if seeds[0] != seeds[1]:
            raise ValueError(f"paired comparison needs the same seeds: {seeds[0]} vs {seeds[1]}")
        diffs = [x - y for x, y in zip(a, b, strict=True)]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
        return {"method": method, "baseline": baseline, "gain": statistics.fmean(diffs),
                "se": se, "beyond_noise": abs(statistics.fmean(diffs)) > 2 * se and se > 0,
                "seeds": (len(a), len(b))}  # fmt: skip
    var = sum(statistics.variance(v) / len(v) for v in (a, b) if len(v) > 1)
    gain, se = statistics.fmean(a) - statistics.fmean(b), math.sqrt(var)
    return {"method": method, "baseline": baseline, "gain": gain, "se": se,
            "beyond_noise": abs(gain) > 2 * se and se > 0, "seeds": (len(a), len(b))}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Results derived from runs (TIDE analyses, FLOP counts): computed once, kept beside the runs


def cache_path(kind: str, parts) -> Path:
    """``<data root>/cache/<kind>/<key>.json``, the key a hash of ``parts`` (json-serialisable:
    everything the cached value depends on, code and input contents included)."""
    key = hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return config.data_root() / "cache" / kind / f"{key}.json"


def cached(kind: str, parts, compute: Callable[[], object], *, valid=None):
    """``compute()``, kept in :func:`cache_path` and read from there by later calls with the
    same ``parts``. A file that is unreadable, not json, or refused by ``valid`` is computed
    again; the file is replaced atomically, so concurrent callers never read half of one. A
    data root that cannot be written gets a warning, and the value is still returned."""
    file = cache_path(kind, parts)
    try:
        value = json.loads(file.read_text())
        if valid is None or valid(value):
            return value
    except (OSError, ValueError):
        pass
    value = compute()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=file.parent, suffix=".tmp", delete=False) as f:
            json.dump(value, f)
        os.replace(f.name, file)
    except OSError as error:
        warnings.warn(f"{kind} not cached in {file.parent}: {error}", stacklevel=2)
    return value
