"""Auxiliary predictions: the COP and IOP fusions, the probability focal loss, every head variant
in training and inference, scaled backbones, and the Table-1 experiments on the smoke benchmark."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from colad import config, distill, engine
from colad.__main__ import main
from colad.backbone import build_backbone
from colad.checkpoint import CheckpointError, load_weights
from colad.config import DistillConfig, ModelConfig, model_preset
from colad.detector import Detector, detection_scores
from colad.heads import COP_OFFSETS, class_probabilities, cop_fuse, iop_fuse
from colad.losses import prob_focal
from colad.paa import anchor_costs, max_iou_assign, pad_targets

VARIANTS = [(head, iou) for head in config.HEADS if head != "gfl" for iou in config.IOU_BRANCHES]


def cop_loop(cls_logits: torch.Tensor, weight_logits: torch.Tensor) -> torch.Tensor:
    """COP by its definition: every location, class and neighbour in turn."""
    batch, classes, height, width = cls_logits.shape
    out = torch.zeros_like(cls_logits)
    for b in range(batch):
        for c in range(classes):
            for y in range(height):
                for x in range(width):
                    total = 0.0
                    for k, (dy, dx) in enumerate(COP_OFFSETS):
                        inside = 0 <= y + dy < height and 0 <= x + dx < width
                        logit = cls_logits[b, c, y + dy, x + dx] if inside else 0.0
                        weight = torch.sigmoid(weight_logits[b, k, y, x])
                        total = total + weight * torch.sigmoid(torch.as_tensor(logit))
                    out[b, c, y, x] = total / 9
    return out


def test_cop_fuse_equals_the_neighbourhood_loop_borders_included():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) * 3
    weights = torch.randn(2, 9, 4, 5, generator=g, dtype=torch.float64) * 3
    expected = cop_loop(logits, weights)
    assert torch.allclose(cop_fuse(logits, weights), expected, atol=1e-12)
    # A 1x1 map: eight of nine neighbours are padding, probability 0.5 each.
    one = cop_fuse(torch.zeros(1, 1, 1, 1), torch.zeros(1, 9, 1, 1))
    assert float(one) == pytest.approx(0.5 * 0.5)  # mean of sigmoid(0) * sigmoid(0)
    half = cop_fuse(logits.half(), weights.half())
    assert half.dtype == torch.float32
    assert torch.allclose(half.double(), cop_fuse(logits.half().double(), weights.half().double()),
                          atol=1e-6)  # fmt: skip


def test_cop_fuse_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 9, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cop_fuse, (logits, weights))
    # and matches autograd through the loop
    upstream = torch.randn(2, 2, 3, 4, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((cop_fuse(logits, weights) * upstream).sum(), (logits, weights))
    loop = torch.autograd.grad((cop_loop(logits, weights) * upstream).sum(), (logits, weights))
    for a, b in zip(ours, loop, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_cop_fuse_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"weight_logits \[B, 9, H, W\]"):
        cop_fuse(torch.zeros(1, 3, 4, 4), torch.zeros(1, 8, 4, 4))
    with pytest.raises(ValueError, match="same B, H, W"):
        cop_fuse(torch.zeros(1, 3, 4, 4), torch.zeros(1, 9, 4, 5))


def test_iop_formula_gate_and_initial_probability():
    g = torch.Generator().manual_seed(2)
    z, o, t = (torch.randn(2, c, 3, 3, generator=g) for c in (4, 1, 1))
    expected = torch.clamp(torch.sigmoid(z) - torch.sigmoid(t), min=0) * torch.sigmoid(o)
    assert torch.allclose(iop_fuse(z, o, t), expected)
    # Below the threshold nothing flows back.
    z = torch.full((1, 1, 1, 1), -5.0, requires_grad=True)
    o = torch.zeros(1, 1, 1, 1, requires_grad=True)
    t = torch.zeros(1, 1, 1, 1, requires_grad=True)
    iop_fuse(z, o, t).sum().backward()
    assert float(z.grad) == float(o.grad) == float(t.grad) == 0.0
    # At initialisation p is about (0.01 - 1e-4) * 0.5 everywhere (the small random weights of
    # the last convolutions move it a little).
    torch.manual_seed(0)
    model = Detector(dataclasses.replace(model_preset("smoke", 3), head="iop"))
    with torch.no_grad():
        probs = model.predict([torch.rand(3, 64, 96)]).head["cls_probs"]
    assert float(probs.mean()) == pytest.approx((0.01 - 1e-4) * 0.5, rel=0.05)
    assert 0.0025 < float(probs.min()) and float(probs.max()) < 0.01


def test_prob_focal_is_the_sigmoid_focal_loss_on_probabilities():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(50, 4, generator=g) * 3
    targets = (torch.rand(50, 4, generator=g) > 0.7).float()
    expected = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    assert torch.allclose(prob_focal(torch.sigmoid(logits), targets), expected, atol=1e-5)
    # Probabilities of exactly 0 and 1 give finite losses and gradients (log clamped at -100).
    p = torch.tensor([0.0, 1.0, 0.0, 1.0], requires_grad=True)
    loss = prob_focal(p, torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert torch.isfinite(loss).all() and float(loss[0].detach()) == pytest.approx(0.25 * 100)
    loss.sum().backward()
    assert torch.isfinite(p.grad).all()
    with pytest.raises(ValueError, match="prob_focal"):
        prob_focal(torch.zeros(2), torch.zeros(3))


def test_anchor_cost_on_probabilities_equals_the_cost_on_their_logits():
    g = torch.Generator().manual_seed(4)
    anchors = torch.tensor([[0.0, 0, 20, 20], [10, 10, 30, 30], [50, 50, 70, 70]])
    logits = torch.randn(1, 3, 3, generator=g)
    deltas = torch.randn(1, 3, 4, generator=g) * 0.1
    gt_boxes, gt_labels, gt_mask = pad_targets(
        [{"boxes": torch.tensor([[5.0, 5, 25, 25]]), "labels": torch.tensor([2])}]
    )
    pre = max_iou_assign(anchors, torch.ones(1, 3, dtype=torch.bool), gt_boxes, gt_mask,
                         pos_iou_thr=0.1, neg_iou_thr=0.1)  # fmt: skip
    on_logits = anchor_costs(logits, deltas, anchors, pre, gt_boxes, gt_labels)
    on_probs = anchor_costs(torch.sigmoid(logits), deltas, anchors, pre, gt_boxes, gt_labels,
                            probabilities=True)  # fmt: skip
    assert torch.isinf(on_logits[0, 2]) and torch.isinf(on_probs[0, 2])
    assert torch.allclose(on_logits[0, :2], on_probs[0, :2], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Detectors


def variant(head: str, iou_branch: str, seed: int = 0) -> Detector:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(model_preset("smoke", 3), head=head, iou_branch=iou_branch,
                              score_thresh=0.0)  # fmt: skip
    return Detector(cfg)


def batch():
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 64, 96, generator=g), torch.rand(3, 48, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 40.0], [50.0, 10.0, 90.0, 60.0]]),
         "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]  # fmt: skip
    return images, targets


@pytest.mark.parametrize("head,iou_branch", VARIANTS)
def test_every_head_variant_trains_and_detects(head, iou_branch):
    model = variant(head, iou_branch)
    images, targets = batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        losses = model.train()(images, targets)
        assert set(losses) == {"loss_cls", "loss_bbox"} | (
            set() if iou_branch == "none" else {"loss_iou"}
        )
        assert all(math.isfinite(float(v.detach())) for v in losses.values()), losses
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    head_outputs = model.predict(images).head
    assert ("cls_logits" in head_outputs) == (head == "paa")
    assert ("iou_logits" in head_outputs) == (iou_branch != "none")
    detections = model.eval()(images)
    assert len(detections) == 2 and all(len(d["boxes"]) for d in detections)
    for d in detections:
        assert torch.all(d["scores"][:-1] >= d["scores"][1:])
        assert float(d["scores"].max()) <= 1.0


@pytest.mark.parametrize("head", [h for h in config.HEADS if h != "gfl"])
def test_a_trained_but_unused_iou_branch_changes_scoring_and_nothing_else(head):
    used, unused = variant(head, "infer"), variant(head, "train")
    assert used.state_dict().keys() == unused.state_dict().keys()
    assert all(torch.equal(v, unused.state_dict()[k]) for k, v in used.state_dict().items())
    images, targets = batch()
    losses_used, losses_unused = used.train()(images, targets), unused.train()(images, targets)
    assert {k: float(v.detach()) for k, v in losses_used.items()} == {
        k: float(v.detach()) for k, v in losses_unused.items()
    }
    with torch.no_grad():
        p_used, p_unused = used.eval().predict(images), unused.eval().predict(images)
    cls_prob = class_probabilities(p_used.head) * p_used.valid[..., None]
    iou_prob = torch.sigmoid(p_used.head["iou_logits"])[..., None]
    assert torch.equal(detection_scores(p_unused, use_iou=False), cls_prob)
    assert torch.allclose(detection_scores(p_used), torch.sqrt(cls_prob * iou_prob))
    assert not torch.equal(used(images)[0]["scores"], unused(images)[0]["scores"])


def test_a_checkpoint_of_one_variant_refuses_to_load_into_another():
    cop = variant("cop", "infer").state_dict()
    with pytest.raises(CheckpointError, match="holds a COP head with the IoU branch; this "
                       "detector has a plain PAA head with the IoU branch"):  # fmt: skip
        load_weights(variant("paa", "infer"), cop, "cop.pt")
    with pytest.raises(CheckpointError, match="without the IoU branch.*head='iop'"):
        load_weights(variant("iop", "infer"), variant("iop", "none").state_dict(), "base.pt")
    load_weights(variant("cop", "train"), cop, "cop.pt")  # the same network, scored otherwise


def test_soft_labels_refuse_fused_heads_and_colad_takes_a_cop_network():
    teacher = distill.freeze(variant("paa", "infer", seed=1))
    kd = DistillConfig(teacher="x")
    experiment = config.experiment("kd", "smoke")
    cop_student = dataclasses.replace(experiment, model=dataclasses.replace(
        experiment.model, head="cop"))  # fmt: skip
    with pytest.raises(ValueError, match="student needs a plain PAA head.*COP head"):
        distill.build_trainee(cop_student, teacher)
    images, targets = batch()
    lad = distill.TeacherStudent(variant("iop", "infer"), variant("cop", "none", 1), "lad", kd)
    assert all(math.isfinite(float(v.detach())) for v in lad.train()(images, targets).values())
    pair = distill.CoLADPair(variant("paa", "infer"), variant("cop", "infer", seed=1))
    out = pair.train()(images, targets)
    assert all(math.isfinite(float(v.detach())) for k, v in out.items() if k.startswith("loss_"))
    colad_cop = config.experiment("colad-cop", "full")
    assert colad_cop.distill.network2.head == "cop"
    assert colad_cop.distill.network2.backbone == "resnet101"


def test_head_settings_are_checked():
    with pytest.raises(ValueError, match="ModelConfig.head='xop'"):
        ModelConfig(head="xop")
    with pytest.raises(ValueError, match="iou_branch='never'"):
        ModelConfig(iou_branch="never")


# ----------------------------------------------------------------------------------------------
# Scaled backbones and experiments


@pytest.mark.parametrize(
    "name,mult,channels",
    [("resnet18", 0.25, [32, 64, 128]), ("resnet50", 0.125, [64, 128, 256]),
     ("efficientnet_b0", 0.25, [16, 32, 80]), ("repvgg_a0", 0.25, [24, 48, 320])],
)  # fmt: skip
def test_scaled_backbones_keep_their_strides_and_narrow_their_channels(name, mult, channels):
    net = build_backbone(name, width_mult=mult)
    assert net.out_channels == channels
    outputs = net(torch.zeros(1, 3, 64, 96))
    assert [o.shape[1] for o in outputs] == channels
    assert [tuple(o.shape[-2:]) for o in outputs] == [(8, 12), (4, 6), (2, 3)]
    with pytest.raises(ValueError, match="pretrained weights exist only at width 1"):
        build_backbone(name, width_mult=mult, weights="imagenet")
    with pytest.raises(ValueError, match=r"width_mult must be in \(0, 1\]"):
        build_backbone(name, width_mult=0)


def test_table1_experiments_share_everything_but_the_head():
    for profile in config.PROFILES:
        rows = {name: config.experiment(name, profile) for name, _, _ in config.TABLE1_ROWS}
        base = rows["paa-small"]
        for name, head, iou in config.TABLE1_ROWS:
            e = rows[name]
            assert (e.model.head, e.model.iou_branch) == (head, iou)
            assert dataclasses.replace(e.model, head="paa", iou_branch="infer") == base.model
            assert (e.data, e.train) == (base.data, base.train)
        for name in ("paa-iop-noiou-infer", "paa-cop-noiou-infer"):
            twin = config.training_twin(rows[name])
            assert twin == rows[name.replace("-noiou-infer", "")]
        assert config.training_twin(rows["paa-iop"]) is None
    quick = config.experiment("paa-cop", "quick", backbone="resnet50")
    assert quick.model.width_mult == config.CPU_WIDTH_MULT["resnet50"]
    assert config.experiment("paa-cop", "full", backbone="resnet50").model.width_mult == 1.0


@pytest.fixture(scope="module")
def unscored_run(data_root):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLAD_DATA", str(data_root))
        return engine.run(config.experiment("paa-iop-noiou-infer", "smoke"), progress=False)


def test_the_unscored_row_evaluates_its_twins_weights(unscored_run, in_data_root):
    twin = engine.run(config.experiment("paa-iop", "smoke"), progress=False)
    assert twin.reused  # trained on the way
    assert unscored_run.summary["trained_by"] == twin.path.name
    assert unscored_run.summary["replica_digests"] == twin.summary["replica_digests"]
    assert unscored_run.history == twin.history
    assert unscored_run.metrics != twin.metrics  # scored differently
    model = unscored_run.load_model()
    assert model.config.iou_branch == "train"
    detections = json.loads(unscored_run.detections_path.read_text())
    assert detections and engine.load_run(unscored_run.path, unscored_run.experiment)


def test_bench_head_prints_the_variant_beside_the_plain_head(capsys):
    argv = ["--size", "64", "96", "--fpn-channels", "32", "--classes", "3", "--repeats", "1",
            "--cpu-only"]  # fmt: skip
    assert main(["bench", "train", "--head", "cop", *argv]) == 0
    assert main(["bench", "infer", "--head", "iop", "--iou-branch", "none", *argv]) == 0
    out = capsys.readouterr().out
    assert "COP head with the IoU branch vs the plain PAA head" in out
    assert "IOP head without the IoU branch" in out
    assert out.count("cpu ") == 2 and "P3 memory" in out


def test_sweep_plans_the_twin_before_its_unscored_row():
    from colad import sweep

    runs = sweep.plan(["paa-cop-noiou-infer"], seeds=[0, 1], profile="smoke")
    assert [(name, seed) for name, seed, _ in runs] == [
        ("paa-cop", 0),
        ("paa-cop", 1),
        ("paa-cop-noiou-infer", 0),
        ("paa-cop-noiou-infer", 1),
    ]


def test_focal_terms_under_autocast_stay_float32():
    probs = torch.rand(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = prob_focal(probs, torch.zeros(4, 3))
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, prob_focal(probs, torch.zeros(4, 3)))


def test_the_chapters_cop_figure_reads_one_object_and_its_weights():
    import matplotlib

    matplotlib.use("Agg")
    from colad import viz

    model = variant("cop", "infer")
    images, targets = batch()
    found = viz.cop_neighbourhood(model, images[0], targets[0])
    assert found["O"].shape == (3, 3) and ((found["O"] > 0) & (found["O"] < 1)).all()
    row, col = found["location"]
    assert found["after"][row, col] == pytest.approx(found["p"])
    level_size = found["before"].shape
    assert found["after"].shape == level_size and found["label"] in (0, 2)
    x1, y1, x2, y2 = found["box"]
    centre = ((col + 0.5) * found["stride"], (row + 0.5) * found["stride"])
    assert x1 < centre[0] < x2 and y1 < centre[1] < y2
    assert len(viz.plot_cop_neighbourhood(found).axes) == 5  # four panels and a colour bar
    with pytest.raises(ValueError, match="needs a COP head"):
        viz.cop_neighbourhood(variant("iop", "infer"), images[0], targets[0])
