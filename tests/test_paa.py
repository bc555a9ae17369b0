"""PAA assignment: pre-assignment, candidate selection, the batched mixture split against
scikit-learn, and the whole pipeline on hand-built images (ALGORITHMS.md §3.1-3.6)."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from colad import paa
from colad.anchors import anchors_per_level
from colad.bench import bench_assign, split_candidates_sklearn, synthetic_costs
from colad.gmm import fit_two_component_gmm


def rows_to_tensors(rows, width=None):
    width = width or max(len(r) for r in rows)
    costs = torch.full((len(rows), width), 7.0, dtype=torch.float64)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for g, row in enumerate(rows):
        costs[g, : len(row)] = torch.tensor(row, dtype=torch.float64)
        valid[g, : len(row)] = True
    return costs, valid


def assert_same_as_sklearn(costs, valid):
    ours = paa.split_candidates(costs, valid)
    reference = split_candidates_sklearn(costs, valid)
    bad = (ours != reference).any(dim=1).nonzero()[:, 0].tolist()
    assert not bad, f"rows {bad[:5]} differ, e.g. {costs[bad[0]][valid[bad[0]]].tolist()}"
    return ours


def test_split_matches_sklearn_on_detector_like_costs():
    # An object whose foreground is two samples has a fitted foreground mode halfway between
    # them, so which of the two is "most likely" is decided by rounding: a true tie that either
    # implementation may break either way. Allow the 0.5 % for such rows.
    costs, valid = synthetic_costs(400, seed=3)
    ours = paa.split_candidates(costs, valid)
    same = (ours == split_candidates_sklearn(costs, valid)).all(dim=1)
    assert same.double().mean() >= 0.995
    assert ours.any(dim=1).double().mean() > 0.9  # most objects get positives
    assert not (ours & ~valid).any()


ADVERSARIAL = {
    "two candidates": [[0.5, 2.0], [1.0, 1.0], [3.0, 0.2]],
    "identical costs": [[1.3] * 9, [0.0] * 45],
    "ties": [[1, 1, 1, 5, 5, 5], [0.2, 0.2, 3, 3, 3, 3, 3], [2, 2, 0.5, 0.5, 9]],
    "45 candidates": np.random.default_rng(0).gamma(2.0, 1.0, (6, 45)).tolist(),
    "huge costs": (1e4 + np.random.default_rng(1).normal(0, 50, (5, 30))).tolist(),
    "tiny costs": (1e-4 * np.random.default_rng(2).random((5, 30))).tolist(),
    "well separated": [[0.1, 0.2, 0.3, 2.9, 3.2, 3.3], [0.01, 0.02, 10, 11, 12, 13, 14]],
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_split_matches_sklearn_on_adversarial_rows(case):
    assert_same_as_sklearn(*rows_to_tensors(ADVERSARIAL[case]))


def test_rows_with_fewer_than_two_candidates_get_nothing_and_garbage_is_ignored():
    costs, valid = rows_to_tensors([[0.3], [], [0.1, 0.2, 0.3, 3.0]], width=5)
    costs[:, 4] = float("nan")  # padding slots may hold anything
    out = paa.split_candidates(costs, valid)
    assert out[:2].sum() == 0 and out[2].tolist() == [True, True, False, False, False]


def test_split_does_not_depend_on_the_order_of_candidates():
    costs, valid = synthetic_costs(50, seed=4)
    perm = torch.randperm(costs.shape[1], generator=torch.Generator().manual_seed(0))
    out = paa.split_candidates(costs, valid)
    assert torch.equal(paa.split_candidates(costs[:, perm], valid[:, perm]), out[:, perm])


def test_cut_keeps_foreground_up_to_its_most_likely_sample():
    # Well separated: the foreground is {0.1, 0.2, 0.3}; its most likely sample is 0.2.
    costs, valid = rows_to_tensors([[3.3, 0.3, 2.9, 0.1, 3.2, 0.2]])
    assert paa.split_candidates(costs, valid)[0].tolist() == [0, 0, 0, 1, 0, 1]


def test_fit_matches_sklearn_parameters_and_iterations():
    costs, valid = synthetic_costs(20, seed=5)
    x, order = torch.where(valid, costs.double(), torch.inf).sort(dim=1)
    fit = fit_two_component_gmm(x, valid.gather(1, order))
    for g in range(20):
        row = x[g][torch.isfinite(x[g])].numpy()[:, None]
        gmm = GaussianMixture(2, weights_init=[0.5, 0.5], means_init=[row[0], row[-1]],
                              precisions_init=[[1.0], [1.0]], covariance_type="diag")  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gmm.fit(row)
        np.testing.assert_allclose(fit.means[g].numpy(), gmm.means_[:, 0], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(fit.variances[g].numpy(), gmm.covariances_[:, 0], rtol=1e-7)
        np.testing.assert_allclose(fit.weights[g].numpy(), gmm.weights_, rtol=1e-9)
        assert fit.n_iter[g] == gmm.n_iter_


def test_split_rejects_bad_shapes():
    with pytest.raises(ValueError, match="need"):
        paa.split_candidates(torch.zeros(3), torch.ones(3, dtype=torch.bool))


def test_bench_assign_reports_agreement_and_speed():
    (row,) = bench_assign([30], repeats=1)
    assert row["agreement"] == 1.0 and row["colad_ms"] > 0 and row["speedup"] > 0


# --- the IoU pre-assignment ------------------------------------------------------------------

ANCHORS = torch.tensor(
    [[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 30, 30], [100, 100, 110, 110], [0, 0, 12, 12.0]]
)


def test_max_iou_assign_thresholds_low_quality_and_invalid():
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [21.0, 21.0, 23.0, 23.0], [200, 200, 210, 210]]])
    valid = torch.tensor([[True, True, True, True, False]])
    matched = paa.max_iou_assign(ANCHORS, valid, gt, torch.ones(1, 3, dtype=torch.bool))
    # anchor 0: IoU 1 with object 0; anchor 1: IoU 25/175 >= 0.1; anchor 2: the best (4%) anchor
    # of object 1, kept by low-quality matching; anchor 3: background; anchor 4: invalid.
    # Object 2 overlaps nothing and takes nothing.
    assert matched.tolist() == [[0, 0, 1, -1, -2]]


def test_low_quality_ties_go_to_the_later_object_and_thresholds_leave_ignored():
    gt = torch.tensor([[[6.0, 6.0, 8.0, 8.0], [6.0, 6.0, 8.0, 8.0]]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    matched = paa.max_iou_assign(ANCHORS, valid, gt, torch.ones(1, 2, dtype=torch.bool))
    assert matched[0, 1] == 1
    rule = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, match_low_quality=False)
    gt2 = torch.tensor([[[0.0, 0.0, 10.0, 9.0]]])  # IoU 0.9 and 0.625 with anchors 0 and 4
    matched = paa.max_iou_assign(ANCHORS, valid, gt2, torch.ones(1, 1, dtype=torch.bool), **rule)
    assert matched[0].tolist() == [0, -1, -1, -1, 0]
    gt3 = torch.tensor([[[0.0, 0.0, 10.0, 4.5]]])  # IoU 0.45 with anchor 0: between thresholds
    matched = paa.max_iou_assign(ANCHORS, valid, gt3, torch.ones(1, 1, dtype=torch.bool), **rule)
    assert matched[0, 0] == -2


def test_select_candidates_takes_topk_per_level():
    costs = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.2, 0.7, torch.inf]])
    matched = torch.tensor([[0, 0, 0, 1, 0, 0, -1]])
    idx, values, ok = paa.select_candidates(costs, matched, 2, [4, 3], topk=2)
    assert idx[0, 0][ok[0, 0]].tolist() == [1, 0, 4, 5]
    assert idx[0, 1][ok[0, 1]].tolist() == [3]
    assert values[0, 0, 0] == pytest.approx(0.1)


# --- the whole pipeline ----------------------------------------------------------------------


def hand_built_batch(num_classes=3):
    """A 1-level 8x8 grid (stride 8, anchors 16 px) and two images: one with two objects, one
    empty. Deltas are zero, so predicted boxes are the anchors."""
    (anchors,) = anchors_per_level([(8, 8)], [8], scale=2)
    num = len(anchors)
    cls_logits = torch.full((2, num, num_classes), -8.0)
    targets = [
        {"boxes": torch.tensor([[8.0, 8.0, 24.0, 24.0], [40.0, 32.0, 56.0, 56.0]]),
         "labels": torch.tensor([1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]  # fmt: skip
    return anchors, cls_logits, torch.zeros(2, num, 4), targets


def test_paa_assign_on_a_hand_built_batch():
    anchors, cls_logits, deltas, targets = hand_built_batch()
    # Object 0 is exactly the anchor at cell (2, 2); make it and its right neighbour confident.
    cls_logits[0, [2 * 8 + 2, 2 * 8 + 3], 1] = 8.0
    valid = torch.ones(2, len(anchors), dtype=torch.bool)
    valid[1, -8:] = False  # the second image is shorter: its last row is padding
    trace = paa.paa_trace(cls_logits, deltas, anchors, valid, targets, [len(anchors)])
    assignment = trace.assignment()
    matched = assignment.matched_idxs
    # The exact anchor is the cheapest candidate and is kept; positives are pre-assigned anchors.
    assert matched[0, 2 * 8 + 2] == 0
    pre = trace.pre_matched_idxs[0]
    assert (pre[matched[0] >= 0] == matched[0][matched[0] >= 0]).all()
    assert (matched[0][pre >= 0] >= -1).all() and (matched[0][pre == -1] == -1).all()
    # Both objects get positives; the empty image has none, and its padding is ignored.
    assert set(matched[0][matched[0] >= 0].tolist()) == {0, 1}
    assert (matched[1, :-8] == -1).all() and (matched[1, -8:] == -2).all()
    # Against a per-object scikit-learn split of the same candidates.
    reference = split_candidates_sklearn(
        trace.candidate_costs.flatten(0, 1), trace.candidate_valid.flatten(0, 1)
    )
    assert torch.equal(trace.positive.flatten(0, 1), reference)
    labels = assignment.labels(3)
    assert set(labels[0][matched[0] == 1].tolist()) == {2} and (labels[1] == 3).all()


def test_paa_assign_with_no_objects_anywhere():
    anchors, cls_logits, deltas, targets = hand_built_batch()
    empty = [targets[1], targets[1]]
    valid = torch.ones(2, len(anchors), dtype=torch.bool)
    assignment = paa.paa_assign(cls_logits, deltas, anchors, valid, empty, [len(anchors)])
    assert assignment.num_pos == 0 and (assignment.matched_idxs == -1).all()


def test_bench_assign_command(capsys):
    from colad.__main__ import main

    assert main(["bench", "assign", "--gts", "5", "12", "--repeats", "1", "--cpu-only"]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and len(out.strip().splitlines()) == 4  # header line, table of 2
    assert main(["bench", "assign", "--gts", "0"]) == 2
    assert "--gts" in capsys.readouterr().err


def test_bench_train_matches_retinanet_settings_and_times_both():
    from colad.bench import bench_train, retinanet_like
    from colad.config import ModelConfig
    from colad.detector import Detector

    cfg = ModelConfig(num_classes=3, backbone="resnet18", fpn_channels=64, head_convs=2)
    ours, theirs = Detector(cfg), retinanet_like(cfg, (64, 96))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(ours.features.backbone) == count(theirs.backbone.body)  # the same ResNet
    assert len(theirs.head.classification_head.conv) == 2
    result = bench_train(fpn_channels=64, image_size=(64, 96), batch=1, num_classes=3, repeats=1)
    assert result["paa_ms"] > 0 and result["retinanet_ms"] > 0 and result["assign_ms"] > 0
    with pytest.raises(ValueError, match="ResNet"):
        retinanet_like(ModelConfig(backbone="tiny"), (64, 96))


def test_bench_infer_times_both_detectors_from_the_command_line(capsys):
    from colad.__main__ import main
    from colad.bench import bench_infer

    result = bench_infer(fpn_channels=64, image_size=(64, 96), batch=1, num_classes=3, repeats=1,
                         candidates=50)  # fmt: skip
    assert result["paa_ms"] > 0 and result["retinanet_ms"] > 0
    assert 0 < result["retinanet_threshold"] < result["paa_threshold"] < 1
    assert result["ratio"] == pytest.approx(result["paa_ms"] / result["retinanet_ms"])
    assert result["paa_images_s"] == pytest.approx(1e3 / result["paa_ms"])
    argv = ["bench", "infer", "--fpn-channels", "64", "--size", "64", "96", "--batch", "1",
            "--classes", "3", "--repeats", "1", "--cpu-only", "--candidates", "50"]  # fmt: skip
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "inference passes" in lines[1] and "ratio" in lines[2] and lines[3].split()[0] == "cpu"
