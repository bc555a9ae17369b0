"""GFL and LD: ATSS against a per-object loop, the quality and distribution focal losses, the
integral decoding, the LD loss, GFL and LD steps on awkward batches, teacher checks, and the named
experiments on the smoke benchmark."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, sigmoid_focal_loss

from colad import config, distill, engine
from colad.__main__ import main
from colad.anchors import anchors_per_level
from colad.atss import atss_assign, atss_trace
from colad.checkpoint import CheckpointError, load_weights
from colad.config import DistillConfig, Experiment, gfl_model, model_preset
from colad.detector import Detector
from colad.gfl import (
    boxes_to_distances,
    decode_boxes,
    distances_to_boxes,
    expected_distances,
    gfl_losses,
    ld_loss,
)
from colad.losses import distribution_focal_loss, distribution_kl, quality_focal_loss
from colad.paa import BACKGROUND, IGNORE

# ----------------------------------------------------------------------------------------------
# ATSS


def atss_loop(anchors, valid, boxes, num_per_level, topk):
    """ATSS for one image by its definition, one object at a time (ALGORITHMS.md §16.4)."""
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    num = len(anchors)
    positive_iou = torch.full((len(boxes), num), -1.0)
    for g, box in enumerate(boxes):
        iou = box_iou(box[None], anchors)[0]
        distance = (centres - (box[:2] + box[2:]) / 2).square().sum(-1).sqrt()
        candidates, start = [], 0
        for count in num_per_level:
            level = [a for a in range(start, start + count) if valid[a]]
            level.sort(key=lambda a: (float(distance[a]), a))  # ties: the lower index
            candidates += level[:topk]
            start += count
        if not candidates:
            continue
        values = iou[candidates].double()
        std = values.std() if len(candidates) > 1 else 0.0
        threshold = values.mean() + std
        for a in candidates:
            cx, cy = centres[a]
            inside = min(cx - box[0], cy - box[1], box[2] - cx, box[3] - cy) > 0.01
            if iou[a].double() >= threshold and inside:
                positive_iou[g, a] = iou[a]
    matched = torch.full((num,), BACKGROUND)
    for a in range(num):
        if not valid[a]:
            matched[a] = IGNORE
        elif (positive_iou[:, a] >= 0).any():
            matched[a] = int(positive_iou[:, a].argmax())  # first object on a tie
    return matched


def grid(sizes=((8, 10), (4, 5), (2, 3)), strides=(8, 16, 32), scale=4.0):
    anchors = anchors_per_level(list(sizes), list(strides), scale)
    return torch.cat(anchors), [len(a) for a in anchors]


@pytest.mark.parametrize("seed", range(6))
def test_atss_equals_the_per_object_loop_on_random_batches(seed):
    g = torch.Generator().manual_seed(seed)
    anchors, num_per_level = grid()
    valid = torch.rand(3, len(anchors), generator=g) > 0.15
    targets = []
    for k in range(3):
        n = int(torch.randint(0, 6, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 60
        wh = torch.rand(n, 2, generator=g) * 50 + 2
        boxes = torch.cat([xy, xy + wh], 1)
        if n > 1 and k == 0:
            boxes[1] = boxes[0]  # two identical objects: every conflict is a tie
        if n and k == 1:  # centred on a cell midpoint: equal distances to 4, then 8 anchors
            boxes[0] = torch.tensor([12.0, 12.0, 28.0, 28.0])
        targets.append({"boxes": boxes, "labels": torch.randint(0, 3, (n,), generator=g)})
    for topk in (1, 3, 9):
        ours = atss_assign(anchors, valid, targets, num_per_level, topk=topk).matched_idxs
        for k, target in enumerate(targets):
            expected = atss_loop(anchors, valid[k], target["boxes"], num_per_level, topk)
            assert torch.equal(ours[k], expected), (seed, topk, k)


def test_atss_single_candidates_no_objects_and_tiny_levels():
    anchors, num_per_level = grid(sizes=((1, 1), (1, 1)), strides=(8, 16))
    valid = torch.ones(1, 2, dtype=torch.bool)
    box = {"boxes": torch.tensor([[-20.0, -20.0, 20.0, 20.0]]), "labels": torch.tensor([1])}
    # One level, topk 1: a single candidate, whose std is undefined: it passes (std = 0).
    one = atss_trace(anchors[:1], valid[:, :1], [box], [1], topk=1)
    assert one.candidate.sum() == 1 and float(one.threshold[0, 0]) == float(one.iou[0, 0, 0])
    assert one.matched_idxs.tolist() == [[0]]
    # Levels with fewer anchors than topk use all of them.
    both = atss_trace(anchors, valid, [box], num_per_level, topk=9)
    assert both.candidate.sum() == 2 and math.isfinite(float(both.threshold[0, 0]))
    # No objects: every valid anchor is background, invalid ones ignored.
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    mask = torch.tensor([[True, False]])
    assert atss_assign(anchors, mask, [empty], num_per_level).matched_idxs.tolist() == [[-1, -2]]
    # A centre outside the object never makes a positive, however high the IoU threshold.
    off = {"boxes": torch.tensor([[1.0, 1.0, 30.0, 30.0]]), "labels": torch.tensor([0])}
    assert atss_assign(anchors, valid, [off], num_per_level).num_pos == 0
    with pytest.raises(ValueError, match="sums to"):
        atss_assign(anchors, valid, [box], [1, 2])


# ----------------------------------------------------------------------------------------------
# Losses and box distributions


def test_quality_focal_loss_is_the_focal_loss_without_alpha_for_binary_targets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 4, generator=g) * 3
    targets = (torch.rand(50, 4, generator=g) > 0.7).float()
    for gamma in (1.0, 2.0):
        focal = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=gamma, reduction="none")
        assert torch.allclose(quality_focal_loss(logits, targets, beta=gamma), focal, atol=1e-6)
    # A soft target: |y - sigma|^beta * BCE, with the gradient through the factor.
    z = torch.tensor([0.3], requires_grad=True)
    y = torch.tensor([0.6])
    loss = quality_focal_loss(z, y)
    sigma = torch.sigmoid(z)
    direct = (y - sigma).abs() ** 2 * -(y * sigma.log() + (1 - y) * (1 - sigma).log())
    assert torch.allclose(loss, direct)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    (direct_grad,) = torch.autograd.grad(direct.sum(), z)
    assert torch.allclose(grad, direct_grad)


def test_distribution_focal_loss_on_hand_computed_bins():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3, 0.0001], [0.25, 0.25, 0.25, 0.25]]))
    targets = torch.tensor([1.25, 2.9])
    ours = distribution_focal_loss(logits, targets)
    probs = F.softmax(logits, 1)
    first = -(0.75 * probs[0, 1].log() + 0.25 * probs[0, 2].log())
    second = -(0.1 * probs[1, 2].log() + 0.9 * probs[1, 3].log())
    assert torch.allclose(ours, torch.stack([first, second]), atol=1e-6)
    # Its minimum is the split of mass between the two bins, whose mean is the target.
    best = torch.log(torch.tensor([[1e-9, 0.75, 0.25, 1e-9]]))
    assert float(expected_distances(best.repeat(1, 4))[0, 0]) == pytest.approx(1.25, abs=1e-6)
    assert float(distribution_focal_loss(best, torch.tensor([1.25]))) == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), abs=1e-6
    )
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        distribution_focal_loss(logits, torch.tensor([1.0, 3.0]))  # no bin right of 3


def test_dfl_targets_are_clamped_below_reg_max_and_only_they():
    points = torch.tensor([[5.0, 5.0]])
    far = torch.tensor([[-30.0, 4.0, 6.0, 40.0]])  # left side 35 strides away
    distances = boxes_to_distances(points, far, reg_max=16)
    assert distances[0].tolist() == pytest.approx([15.9, 1.0, 1.0, 15.9])  # 16 - 0.1, not 0.01
    inside_out = torch.tensor([[6.0, 6.0, 9.0, 9.0]])  # the point lies outside: sides < 0
    assert boxes_to_distances(points, inside_out, 16)[0, :2].tolist() == [0.0, 0.0]
    assert float(distribution_focal_loss(torch.zeros(2, 17), distances[0, :2])[0]) > 0


def test_integral_decoding_round_trips_a_box():
    points = torch.tensor([[10.0, 20.0], [3.0, 4.0]])
    target = torch.tensor([[1.0, 2.5, 7.25, 0.5], [15.5, 0.0, 3.0, 12.0]])
    # Logits that put the DFL optimum on each side: mass on the two bins around the distance.
    logits = torch.full((2, 4, 17), -30.0)
    for n in range(2):
        for side in range(4):
            y = float(target[n, side])
            i = int(y)
            logits[n, side, i] = math.log(i + 1 - y) if i + 1 - y > 0 else -30.0
            if i + 1 <= 16:
                logits[n, side, i + 1] = math.log(y - i) if y - i > 0 else -30.0
    distances = expected_distances(logits.flatten(1))
    assert torch.allclose(distances, target, atol=1e-5)
    boxes = distances_to_boxes(points, distances)
    assert torch.allclose(boxes_to_distances(points, boxes, 16), target, atol=1e-5)
    anchors = torch.cat([points, points], 1) * 8 + torch.tensor([-16.0, -16.0, 16.0, 16.0])
    pixels = decode_boxes(logits.flatten(1), anchors, torch.tensor([8.0, 8.0]))
    assert torch.allclose(pixels, boxes * 8, atol=1e-4)
    clamped = decode_boxes(logits.flatten(1), anchors, torch.tensor([8.0, 8.0]), (100, 90))
    assert float(clamped[:, [0, 2]].max()) <= 90 and float(clamped.min()) >= 0


def test_distribution_kl_is_zero_for_equal_rows_and_matches_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(6, 17, generator=g) * 4
    teacher = torch.randn(6, 17, generator=g) * 4
    assert torch.allclose(distribution_kl(teacher, teacher, 10.0), torch.zeros(6), atol=1e-7)
    for temperature in (1.0, 10.0):
        p_t = F.softmax(teacher / temperature, 1)
        p_s = F.softmax(student / temperature, 1)
        direct = temperature**2 * (p_t * (p_t.log() - p_s.log())).sum(1) / 17
        assert torch.allclose(distribution_kl(student, teacher, temperature), direct, atol=1e-6)
    # The gradient is (T / K) (p_s - p_t) and does not reach the teacher.
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_()
    distribution_kl(s, t, 10.0).sum().backward()
    expected = 10.0 / 17 * (F.softmax(student / 10, 1) - F.softmax(teacher / 10, 1))
    assert torch.allclose(s.grad, expected, atol=1e-6) and t.grad is None
    with pytest.raises(ValueError, match="at least 1"):
        distribution_kl(student, teacher, 0.5)
    with pytest.raises(ValueError, match="must be the same"):
        distribution_kl(student, teacher[:, :5], 10.0)


# ----------------------------------------------------------------------------------------------
# Steps


def gfl_net(seed: int, half: bool = False) -> Detector:
    torch.manual_seed(seed)
    cfg = gfl_model(model_preset("smoke", num_classes=3))
    if half:
        cfg = dataclasses.replace(cfg, widths=(8, 16, 32, 32), fpn_channels=16, norm_groups=4)
    return Detector(cfg)


def batch(kind: str = "mixed"):
    """Two images; ``mixed``: the second without objects; ``empty``: no object at all."""
    images = [torch.randn(3, 64, 96), torch.randn(3, 48, 64)]
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 40.0], [50.0, 10.0, 90.0, 60.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long)]
    if kind == "empty":
        boxes, labels = [torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2
    return images, [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels, strict=True)]


@pytest.mark.parametrize("method", ["gfl", "ld"])
@pytest.mark.parametrize("kind", ["mixed", "empty"])
def test_gfl_and_ld_steps_survive_empty_images_and_batches_without_positives(method, kind):
    images, targets = batch(kind)
    student = gfl_net(0, half=True)
    trainee = student
    if method == "ld":
        trainee = distill.TeacherStudent(student, gfl_net(1), "ld", DistillConfig(teacher="x"))
    losses = trainee.train()(images, targets)
    expected = {"loss_cls", "loss_bbox", "loss_dfl"} | ({"loss_ld"} if method == "ld" else set())
    assert set(losses) == expected
    assert all(math.isfinite(float(v.detach())) for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)  # every parameter used
    if kind == "empty":
        assert float(losses["loss_bbox"].detach()) == float(losses["loss_dfl"].detach()) == 0.0
        assert float(losses["loss_cls"].detach()) > 0  # negatives still learn background


def test_gfl_losses_follow_the_definitions_on_one_positive():
    net = gfl_net(0)
    images, targets = batch()
    predictions = net.predict(images)
    assignment = net.assign(predictions, targets)
    losses = gfl_losses(predictions.head, predictions.anchors, predictions.anchor_strides(),
                        assignment)  # fmt: skip
    # compared, not trained: no gradients in the reference computation
    losses = {name: value.detach() for name, value in losses.items()}
    head = {name: value.detach() for name, value in predictions.head.items()}
    image, anchor = torch.nonzero(assignment.positive, as_tuple=True)
    stride = predictions.anchor_strides()[anchor][:, None]
    logits = head["box_logits"][image, anchor]
    centres = (predictions.anchors[anchor, :2] + predictions.anchors[anchor, 2:]) / 2
    boxes = decode_boxes(logits, predictions.anchors[anchor], stride[:, 0]) / stride
    objects = assignment.target_boxes(image, anchor) / stride
    from colad.boxes import aligned_giou, aligned_iou

    weight = torch.sigmoid(head["cls_logits"][image, anchor]).amax(-1)
    total = max(float(weight.sum()), 1.0)
    giou = 2.0 * (weight * (1 - aligned_giou(boxes, objects))).sum() / total
    assert float(losses["loss_bbox"]) == pytest.approx(float(giou), rel=1e-5)
    dist = boxes_to_distances(centres / stride, objects, 16)
    dfl = distribution_focal_loss(logits.reshape(-1, 17), dist.reshape(-1)).view(-1, 4).mean(1)
    assert float(losses["loss_dfl"]) == pytest.approx(float(0.25 * (weight * dfl).sum() / total),
                                                      rel=1e-5)  # fmt: skip
    # The class target: the IoU of the current box at the object's class, 0 elsewhere.
    quality = torch.zeros_like(head["cls_logits"])
    labels = assignment.labels(3)[image, anchor]
    quality[image, anchor, labels] = aligned_iou(boxes, objects)
    counted = (assignment.matched_idxs != IGNORE).float()[..., None]
    qfl = (quality_focal_loss(head["cls_logits"], quality) * counted).sum()
    normaliser = assignment.positive.sum(1).clamp(min=1).sum()  # the empty image counts 1
    assert float(losses["loss_cls"]) == pytest.approx(float(qfl / normaliser), rel=1e-5)


def test_ld_loss_weighs_positives_by_the_students_scores_and_rescales_the_batch():
    student, teacher = gfl_net(0, half=True), gfl_net(1)
    images, targets = batch()
    sp = student.predict(images)
    with torch.no_grad():
        tp = teacher.predict(images)
    assignment = student.assign(sp, targets)
    assert torch.equal(assignment.matched_idxs, teacher.assign(tp, targets).matched_idxs)
    ours = ld_loss(sp.head, tp.head["box_logits"], assignment, temperature=10, weight=0.25,
                   reference_images=2)  # fmt: skip
    image, anchor = torch.nonzero(assignment.positive, as_tuple=True)
    kl = distribution_kl(sp.head["box_logits"][image, anchor].reshape(-1, 17),
                         tp.head["box_logits"][image, anchor].reshape(-1, 17), 10.0)  # fmt: skip
    weight = torch.sigmoid(sp.head["cls_logits"][image, anchor]).amax(-1)
    direct = 0.25 * (2 / 2) * (weight * kl.view(-1, 4).mean(1)).sum()  # B = 2 images
    assert float(ours.detach()) == pytest.approx(float(direct.detach()), rel=1e-5)
    double = ld_loss(sp.head, tp.head["box_logits"], assignment, reference_images=4)
    assert float(double.detach()) == pytest.approx(2 * float(ours.detach()), rel=1e-6)
    same = ld_loss(sp.head, sp.head["box_logits"].detach(), assignment)
    assert abs(float(same.detach())) < 1e-6


def test_teachers_of_the_wrong_head_type_are_refused():
    paa_teacher = Detector(model_preset("smoke", 3))
    with pytest.raises(ValueError, match="LD distils a GFL teacher.*teacher has a plain PAA"):
        distill.TeacherStudent(gfl_net(0), paa_teacher, "ld", DistillConfig())
    with pytest.raises(ValueError, match="LAD takes a PAA assignment.*teacher is a GFL"):
        distill.TeacherStudent(Detector(model_preset("smoke", 3)), gfl_net(0), "lad", None)
    student = config.experiment("ld", "smoke")
    with pytest.raises(ValueError, match="reg_max 8 vs 16"):
        distill.check_teacher(dataclasses.replace(student.model, reg_max=8), student, "t")
    with pytest.raises(ValueError, match="teacher 't'.*LD distils"):
        distill.check_teacher(config.experiment("paa", "smoke").model, student, "t")
    with pytest.raises(ValueError, match="head='gfl'.*iou_branch='none'"):
        dataclasses.replace(student.model, iou_branch="infer")
    with pytest.raises(ValueError, match="LD distils GFL's box distributions"):
        dataclasses.replace(student, model=config.experiment("paa", "smoke").model)


def test_gfl_experiments_mirror_the_paa_side():
    for profile in ("smoke", "quick"):
        pairs = {"gfl": "paa", "gfl-small": "paa-small", "gfl-big": "paa-big", "ld": "lad",
                 "ld-up": "lad-up"}  # fmt: skip
        for gfl_name, paa_name in pairs.items():
            ours, theirs = (config.experiment(n, profile) for n in (gfl_name, paa_name))
            assert ours.model == gfl_model(theirs.model), gfl_name
            assert (ours.data, ours.train) == (theirs.data, theirs.train), gfl_name
            assert Experiment.from_dict(ours.to_dict()) == ours
        assert config.experiment("ld", profile).distill.teacher == "gfl"
        assert config.experiment("ld-up", profile).distill.teacher == "gfl-small"
    full = {n: config.experiment(n, "full") for n in ("gfl", "gfl-big", "ld")}
    assert full["gfl-big"].model.backbone == "resnet101" and full["gfl-big"].train.epochs == 24
    assert full["gfl-big"].data.train_min_sizes == (480, 800)
    assert full["ld"].distill.teacher == "gfl-big" and full["ld"].model.backbone == "resnet50"
    assert config.experiment("ld", "full", backbone="resnet18").model.backbone == "resnet18"
    assert full["gfl"].model.giou_weight == 2.0 and not full["gfl"].model.score_voting


# ----------------------------------------------------------------------------------------------
# Runs


@pytest.fixture(scope="session")
def ld_run(data_root) -> engine.RunResult:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLAD_DATA", str(data_root))
        return engine.run(config.experiment("ld", "smoke"), progress=False)


def test_ld_trains_with_a_gfl_teacher_from_the_run_cache(ld_run, in_data_root):
    teacher = engine.run(config.experiment("gfl", "smoke"), progress=False)
    assert math.isfinite(ld_run.metrics["AP"]) and math.isfinite(teacher.metrics["AP"])
    history = [r for r in ld_run.history if "loss_ld" in r]
    assert history and all(math.isfinite(r["loss_ld"]) for r in history)
    model = ld_run.load_model()
    assert model.config.head == "gfl" and model.head_variant == "GFL head"
    # A GFL checkpoint does not load into a PAA detector, and says why.
    paa = Detector(config.experiment("paa-small", "smoke").model)
    state = engine.load_checkpoint(ld_run.checkpoint_path)
    with pytest.raises(CheckpointError, match="holds a GFL head"):
        paa.check_weights(state["model"], "ld run")
    with pytest.raises(CheckpointError):
        load_weights(paa, state["model"], "ld run")
    # LAD refuses the GFL run as its teacher; LD refuses the PAA one.
    lad = config.experiment("lad", "smoke", teacher=str(teacher.path))
    with pytest.raises(ValueError, match="LAD takes a PAA assignment"):
        engine.load_teacher(lad)
    assert main(["train", "ld", "--profile", "smoke", "--teacher", "paa", "--no-progress"]) == 2


def test_bench_gfl_head_and_ld_step_print_their_ratios(capsys):
    argv = ["--size", "64", "96", "--fpn-channels", "32", "--classes", "3", "--repeats", "1",
            "--cpu-only"]  # fmt: skip
    assert main(["bench", "train", "--head", "gfl", *argv]) == 0
    assert main(["bench", "infer", "--head", "gfl", *argv]) == 0
    assert main(["bench", "train", "--method", "ld", "--profile", "smoke", "--repeats", "1",
                 "--cpu-only"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("GFL head vs the plain PAA head") == 2 and "P3 memory" in out
    assert "ld: student (GFL)" in out and "ld / student alone = " in out
    assert "ld / reference = " in out
