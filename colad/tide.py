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

from collections.abc import Sequence
from pathlib import Path

from pycocotools.coco import COCO

from .evaluate import load_detections, load_ground_truth

__all__ = ["MAIN_ERRORS", "SPECIAL_ERRORS", "tide_errors"]

MAIN_ERRORS = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
SPECIAL_ERRORS = ("FalsePos", "FalseNeg")


def _mean_ap(ap_data) -> float:
    """tidecv's mAP over classes, with an empty set of classes counted as perfect (100): once
    every remaining error is fixed away, nothing is left to get wrong."""
    aps = [obj.get_ap() for obj in ap_data.objs.values() if not obj.is_empty()]
    return sum(aps) / len(aps) if aps else 100.0


def tide_errors(
    gt: str | Path | COCO,
    detections: str | Path | Sequence[dict],
    *,
    pos_threshold: float = 0.5,
    background_threshold: float = 0.1,
) -> dict:
    """Break the AP a detector loses down by error type, with tidecv.

    Args:
        gt: the ground truth, a COCO json path or a ``pycocotools.coco.COCO``.
        detections: a COCO results json path or a list of result dicts (xywh boxes).
        pos_threshold: IoU at which a detection counts as a true positive.
        background_threshold: IoU below which a false positive counts as background.

    Returns:
        ``{"AP50": float, "main": {"Cls", "Loc", "Both", "Dupe", "Bkg", "Miss"},
        "special": {"FalsePos", "FalseNeg"}}``: TIDE's AP at ``pos_threshold`` and the dAP of
        each error type, all on tidecv's 0-100 scale. Crowd annotations are ignore regions, as in
        tidecv's COCO loader. Ground truth with no objects gives AP50 0 and no errors.

    Raises:
        DatasetError: malformed ground truth or detections.

    Reference:
        Bolya et al., "TIDE: A General Toolbox for Identifying Object Detection Errors", ECCV 2020;
        chapter ``sec-benchmark``.
    """
    import matplotlib as mpl
    from tidecv import TIDE, Data
    from tidecv.errors.main_errors import FalseNegativeError, FalsePositiveError

    gt = load_ground_truth(gt)
    results = load_detections(detections, gt)

    truth, preds = Data("gt", max_dets=100), Data("detections", max_dets=100)
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

    zeros = {
        "AP50": 0.0,
        "main": dict.fromkeys(MAIN_ERRORS, 0.0),
        "special": dict.fromkeys(SPECIAL_ERRORS, 0.0),
    }
    if num_objects == 0:
        return zeros

    with mpl.rc_context():  # TIDE() restyles matplotlib globally; keep the caller's style
        tide = TIDE(pos_threshold=pos_threshold, background_threshold=background_threshold)
    run = tide.evaluate(truth, preds, mode=TIDE.BOX)
    ap = _mean_ap(run.ap_data)

    main = {}
    for error_type in TIDE._error_types:  # fix one error type at a time (not progressively)
        fixed = run.fix_errors(lambda e, t=error_type: isinstance(e, t))
        main[error_type.short_name] = max(_mean_ap(fixed) - ap, 0.0)
    special = {
        FalsePositiveError.short_name: _mean_ap(run.fix_errors(transform=FalsePositiveError.fix))
        - ap,
        FalseNegativeError.short_name: _mean_ap(run.fix_errors(false_neg_dict=run.false_negatives))
        - ap,
    }
    return {
        "AP50": float(ap),
        "main": {k: float(main[k]) for k in MAIN_ERRORS},
        "special": {k: float(special[k]) for k in SPECIAL_ERRORS},
    }
