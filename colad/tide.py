"""TIDE error analysis (Bolya et al., ECCV 2020) through ``tidecv``, fed in memory.

TIDE explains the AP50 a detector loses by the kind of mistake it makes. Every false positive is
put in exactly one bin (foreground IoU threshold 0.5, background threshold 0.1):

* ``Cls`` -- right place (IoU >= 0.5 with an object), wrong class;
* ``Loc`` -- right class, poorly localised (0.1 <= IoU < 0.5);
* ``Both`` -- wrong class and poorly localised;
* ``Dupe`` -- right class and place, but the object was already taken by a better-scored box;
* ``Bkg`` -- fired on background (IoU < 0.1 with every object);

and every object no detection explains is a ``Miss``. The dAP of a bin is how much AP50 rises when
only that kind of error is fixed. ``FalsePos`` and ``FalseNeg`` are the AP gained by perfect
precision and by perfect recall.

tidecv 1.0.1 needs three guards, all kept here: its ``TIDE`` object restyles matplotlib globally
(seaborn), so it is built inside ``matplotlib.rc_context``; its mean over classes divides by zero
when fixing errors empties every class (no detections at all, or nothing but misses), which is
computed here with a safe mean; its COCO loader needs ``segmentation`` fields and reads from disk,
so ground truth and detections are passed in memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pycocotools.coco import COCO

from .evaluate import load_detections, load_ground_truth

__all__ = [
    "MAIN_ERRORS",
    "SPECIAL_ERRORS",
    "VERDICTS",
    "Verdicts",
    "tide_errors",
    "classify_detections",
    "error_examples",
    "summarize_errors",
    "cache_file",
]

#: tidecv counts at most this many detections per image, the highest-scored (as COCO does).
MAX_DETECTIONS = 100

MAIN_ERRORS = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
SPECIAL_ERRORS = ("FalsePos", "FalseNeg")


def _mean_ap(ap_data) -> float:
    """tidecv's mAP over classes, with an empty set of classes counted as perfect (100): once
    every remaining error is fixed away, nothing is left to get wrong."""
    aps = [obj.get_ap() for obj in ap_data.objs.values() if not obj.is_empty()]
    return sum(aps) / len(aps) if aps else 100.0


def _evaluate(gt, detections, pos_threshold: float, background_threshold: float):
    """One tidecv run over ``gt`` and ``detections``, fed in memory.

    Returns ``(run, results, num_objects)``: tidecv's ``TIDERun`` (``None`` when the ground truth
    has no object), the detections as :func:`colad.evaluate.load_detections` checked them, in the
    order tidecv numbers them (a detection's ``_id`` is its index here), and the number of
    non-crowd objects."""
    import matplotlib as mpl
    from tidecv import TIDE, Data

    gt = load_ground_truth(gt)
    results = list(load_detections(detections, gt))

    truth, preds = Data("gt", max_dets=MAX_DETECTIONS), Data("detections", max_dets=MAX_DETECTIONS)
    for cat in gt.dataset["categories"]:
        truth.add_class(cat["id"], str(cat.get("name", cat["id"])))
    for image in gt.dataset["images"]:
        truth.add_image(image["id"], image["file_name"])
    num_objects = 0
    for ann in gt.dataset["annotations"]:
        if ann.get("iscrowd", 0):
            truth.add_ignore_region(ann["image_id"], ann["category_id"], list(ann["bbox"]))
        else:
            truth.add_ground_truth(ann["image_id"], ann["category_id"], list(ann["bbox"]))
            num_objects += 1
    for det in results:
        preds.add_detection(det["image_id"], det["category_id"], det["score"], det["bbox"])
    if num_objects == 0:
        return None, results, 0

    with mpl.rc_context():  # TIDE() restyles matplotlib globally; keep the caller's style
        tide = TIDE(pos_threshold=pos_threshold, background_threshold=background_threshold)
    return tide.evaluate(truth, preds, mode=TIDE.BOX), results, num_objects


def tide_errors(
    gt: str | Path | COCO,
    detections: str | Path | Sequence[dict],
    *,
    pos_threshold: float = 0.5,
    background_threshold: float = 0.1,
    cache: bool = False,
) -> dict:
    """Break the AP a detector loses down by error type, with tidecv.

    Args:
        gt: the ground truth, a COCO json path or a ``pycocotools.coco.COCO``.
        detections: a COCO results json path or a list of result dicts (xywh boxes).
        pos_threshold: IoU at which a detection counts as a true positive.
        background_threshold: IoU below which a false positive counts as background.
        cache: keep the analysis in ``<data root>/cache/tide`` and read it from
            there next time (both inputs must then be files; see
            :func:`cache_file`). One analysis serves this function and
            :func:`classify_detections`.

    Returns:
        ``{"AP50": float, "main": {"Cls", "Loc", "Both", "Dupe", "Bkg", "Miss"},
        "special": {"FalsePos", "FalseNeg"}}``: TIDE's AP at ``pos_threshold`` and the
        dAP of each error type, all on tidecv's 0-100 scale. Crowd annotations are
        ignore regions, as in tidecv's COCO loader. Ground truth with no objects gives
        AP50 0 and no errors.

    Raises:
        DatasetError: malformed ground truth or detections.
        ValueError: ``cache`` with ground truth or detections that are not files.

    Reference:
        Bolya et al., "TIDE: A General Toolbox for Identifying Object Detection Errors",
        ECCV 2020; chapter ``sec-benchmark``.
    """
    thresholds = (pos_threshold, background_threshold)
    if cache:
        return _cached_analysis(gt, detections, thresholds)["errors"]
    run, _, num_objects = _evaluate(gt, detections, *thresholds)
    return _errors(run, num_objects)


def _errors(run, num_objects: int) -> dict:
    """The dAP of every error type in one tidecv run (:func:`tide_errors`' result)."""
    from tidecv import TIDE
    from tidecv.errors.main_errors import FalseNegativeError, FalsePositiveError

    if num_objects == 0:
        return {
            "AP50": 0.0,
            "main": dict.fromkeys(MAIN_ERRORS, 0.0),
            "special": dict.fromkeys(SPECIAL_ERRORS, 0.0),
        }
    ap = _mean_ap(run.ap_data)

    main = {}
    # fix one error type at a time (not progressively)
    for error_type in TIDE._error_types:
        fixed = run.fix_errors(lambda e, t=error_type: isinstance(e, t))
        main[error_type.short_name] = max(_mean_ap(fixed) - ap, 0.0)
    special = {
        FalsePositiveError.short_name: _mean_ap(
            run.fix_errors(transform=FalsePositiveError.fix),
        )
        - ap,
        FalseNegativeError.short_name: _mean_ap(
            run.fix_errors(false_neg_dict=run.false_negatives),
        )
        - ap,
    }
    return {
        "AP50": float(ap),
        "main": {k: float(main[k]) for k in MAIN_ERRORS},
        "special": {k: float(special[k]) for k in SPECIAL_ERRORS},
    }


# ----------------------------------------------------------------------------------------------
# Each detection's verdict, for figures and the detection browser

#: What TIDE made of a detection: a true positive, one of the five false-positive bins, or
#: ``"unscored"`` (beyond the image's 100 best-scored, or on an image the ground truth lacks).
VERDICTS = ("TP", "Cls", "Loc", "Both", "Dupe", "Bkg", "unscored")


@dataclass
class Verdicts:
    """TIDE's verdict on every detection of one run, and the objects nothing found.

    Attributes:
        detections: the COCO results (``xywh`` boxes), in the order of the input.
        kinds: one of :data:`VERDICTS` per detection.
        objects: per detection, the object it concerns, or ``None``: the object it matched
            (``TP``), would match with the right class or a better box (``Cls``, ``Loc``), or the
            object a better-scored detection had already taken (``Dupe``). Objects are dicts with
            ``image_id``, ``category_id``, ``bbox`` (``xywh``).
        missed: the objects no detection explains at all (TIDE's ``Miss``), same dicts.
    """

    detections: list[dict]
    kinds: list[str]
    objects: list[dict | None]
    missed: list[dict]

    def counts(self, min_score: float = 0.0) -> dict[str, int]:
        """How many detections scoring at least ``min_score`` fall in each verdict, and how
        many objects are missed (``Miss``; this does not depend on ``min_score``)."""
        found = dict.fromkeys(VERDICTS, 0)
        for det, kind in zip(self.detections, self.kinds, strict=True):
            if det["score"] >= min_score:
                found[kind] += 1
        return {**found, "Miss": len(self.missed)}

    def on_image(self, image_id: int) -> list[int]:
        """The indices of the detections on one image, best-scored first."""
        found = [i for i, det in enumerate(self.detections) if det["image_id"] == image_id]
        return sorted(found, key=lambda i: -self.detections[i]["score"])


def _object(gt: dict) -> dict:
    return {"image_id": gt["image"], "category_id": gt["class"], "bbox": list(gt["bbox"])}


def classify_detections(
    gt: str | Path | COCO,
    detections: str | Path | Sequence[dict],
    *,
    pos_threshold: float = 0.5,
    background_threshold: float = 0.1,
    cache: bool = False,
) -> Verdicts:
    """Which of TIDE's bins each detection falls in, from the same tidecv run as
    :func:`tide_errors` (so the counts here are the errors whose dAP it reports).

    tidecv tests a detection that is not a true positive in this order, and the first test that
    holds decides: ``Bkg`` when the image has no object; ``Loc`` when its best IoU with an object
    of its class is between the two thresholds; ``Cls`` when it overlaps an object of another
    class by at least ``pos_threshold``; ``Dupe`` when it overlaps, by at least
    ``pos_threshold``, an object of its class that a better-scored detection already matched;
    ``Bkg`` when its best IoU with any object is at most ``background_threshold``; otherwise
    ``Both``. Objects left unmatched that no such error could recover are ``Miss``.

    Args and raises: as :func:`tide_errors`.
    """
    thresholds = (pos_threshold, background_threshold)
    if cache:
        found = _cached_analysis(gt, detections, thresholds)
        results = list(load_detections(detections, load_ground_truth(gt)))
        # the key holds the file's contents, so the verdicts are in the order of ``results``
        return Verdicts(results, found["kinds"], found["objects"], found["missed"])
    return _verdicts(*_evaluate(gt, detections, *thresholds)[:2])


def _verdicts(run, results: list[dict]) -> Verdicts:
    """Each detection's verdict in one tidecv run (:func:`classify_detections`' result)."""
    from tidecv.errors.main_errors import DuplicateError, MissedError

    kinds = ["unscored"] * len(results)
    objects: list[dict | None] = [None] * len(results)
    missed: list[dict] = []
    if run is None:  # no objects at all: tidecv does not run; every detection is background
        return Verdicts(results, ["Bkg"] * len(results), objects, missed)
    truth = run.gt.annotations
    for pred in run.preds.annotations:
        if pred.get("used"):
            kinds[pred["_id"]] = "TP"
            objects[pred["_id"]] = _object(truth[pred["matched_with"]])
    for error in run.errors:
        if isinstance(error, MissedError):
            missed.append(_object(error.gt))
            continue
        i = error.pred["_id"]
        kinds[i] = error.short_name
        if isinstance(error, DuplicateError):
            objects[i] = _object(truth[error.suppressor["matched_with"]])
        elif getattr(error, "gt", None) is not None:
            objects[i] = _object(error.gt)
    return Verdicts(results, kinds, objects, missed)


def error_examples(verdicts: Verdicts, kinds: Sequence[str] = MAIN_ERRORS) -> dict[str, dict]:
    """One example of each error kind: the best-scored detection of that kind (the error that
    costs the most AP), or for ``Miss`` the largest missed object.

    Returns:
        kind -> ``{"image_id", "detection": index or None, "object": dict or None}``; kinds
        with no example are left out.
    """
    found = {}
    for kind in kinds:
        if kind == "Miss":
            if verdicts.missed:
                big = max(verdicts.missed, key=lambda o: o["bbox"][2] * o["bbox"][3])
                found[kind] = {"image_id": big["image_id"], "detection": None, "object": big}
            continue
        mine = [i for i, k in enumerate(verdicts.kinds) if k == kind]
        if mine:
            best = max(mine, key=lambda i: verdicts.detections[i]["score"])
            found[kind] = {
                "image_id": verdicts.detections[best]["image_id"],
                "detection": best,
                "object": verdicts.objects[best],
            }
    return found


# ----------------------------------------------------------------------------------------------
# The analysis cache: tidecv takes seconds per run, and the book reads the same runs every build


def _file_sha1(path: Path) -> str:
    """The SHA-1 of a file's bytes, read once per version of the file (engine's digest)."""
    from .engine import _file_digest

    stat = path.stat()
    return _file_digest(str(path), stat.st_mtime_ns, stat.st_size)


def _cache_parts(gt, detections, thresholds: tuple[float, float]) -> list:
    from importlib.metadata import version

    for what, value in (("ground truth", gt), ("detections", detections)):
        if not isinstance(value, str | Path) or not Path(value).is_file():
            raise ValueError(
                f"cache=True needs the {what} as a file; got {type(value).__name__} "
                f"{str(value)[:80]!r}"
            )
    return [
        _file_sha1(Path(__file__)),
        version("tidecv"),
        [float(t) for t in thresholds],
        _file_sha1(Path(gt)),
        _file_sha1(Path(detections)),
    ]


def cache_file(
    gt: str | Path,
    detections: str | Path,
    thresholds: tuple[float, float] = (0.5, 0.1),
) -> Path:
    """Where ``cache=True`` keeps the analysis of ``detections`` against ``gt``:
    ``<data root>/cache/tide/<key>.json``. The key hashes the contents of both files, the
    ``(pos_threshold, background_threshold)`` pair, this module's source and tidecv's version,
    so an edited file, other thresholds or other analysis code give a new key.

    Raises:
        ValueError: ``gt`` or ``detections`` is not a file.
    """
    from .sweep import cache_path

    return cache_path("tide", _cache_parts(gt, detections, thresholds))


_ANALYSIS = ("errors", "kinds", "objects", "missed")


def _cached_analysis(gt, detections, thresholds: tuple[float, float]) -> dict:
    """``{"errors", "kinds", "objects", "missed"}`` of one tidecv run, read from
    :func:`cache_file` when it holds them, else computed and stored there."""
    from .sweep import cached

    def analyse() -> dict:
        run, results, num_objects = _evaluate(gt, detections, *thresholds)
        verdicts = _verdicts(run, results)
        return {"errors": _errors(run, num_objects), "kinds": verdicts.kinds,
                "objects": verdicts.objects, "missed": verdicts.missed}  # fmt: skip

    return cached(
        "tide",
        _cache_parts(gt, detections, thresholds),
        analyse,
        valid=lambda found: isinstance(found, dict) and set(_ANALYSIS) <= found.keys(),
    )


# ----------------------------------------------------------------------------------------------
# Over seeds


def summarize_errors(runs: Sequence[Mapping]) -> dict:
    """Mean and standard deviation over runs (seeds) of :func:`tide_errors` results.

    Returns:
        ``{"AP50", "main", "special"}`` holding the means (as :func:`tide_errors` does), plus
        ``"std"`` (the same keys, unbiased standard deviations; 0 for a single run) and
        ``"runs"``, their number.

    Raises:
        ValueError: no runs.
    """
    if not runs:
        raise ValueError("summarize_errors needs at least one run")

    def mean_std(values: list[float]) -> tuple[float, float]:
        mean = sum(values) / len(values)
        spread = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
        return mean, math.sqrt(spread)

    summary: dict = {"main": {}, "special": {}, "std": {"main": {}, "special": {}}}
    summary["AP50"], summary["std"]["AP50"] = mean_std([r["AP50"] for r in runs])
    for panel, kinds in (("main", MAIN_ERRORS), ("special", SPECIAL_ERRORS)):
        for kind in kinds:
            mean, std = mean_std([r[panel][kind] for r in runs])
            summary[panel][kind], summary["std"][panel][kind] = mean, std
    summary["runs"] = len(runs)
    return summary
