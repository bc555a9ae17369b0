"""The PAA detector: torchvision's train/eval contract, losses, inference, a few training steps."""

import math

import pytest
import torch

from colad import data
from colad.config import ModelConfig, model_preset
from colad.detector import Detector, score_voting
from colad.paa import Assignment


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return Detector(model_preset("smoke", num_classes=3))


def images_and_targets():
    images = [torch.randn(3, 64, 96), torch.randn(3, 50, 70), torch.randn(3, 64, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [50.0, 10.0, 90.0, 60.0]]),
         "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
        {"boxes": torch.tensor([[10.0, 10.0, 17.0, 15.0]]), "labels": torch.tensor([1])},
    ]  # fmt: skip
    return images, targets


def test_training_returns_finite_losses_with_empty_images(model):
    images, targets = images_and_targets()
    losses = model.train()(images, targets)
    assert sorted(losses) == ["loss_bbox", "loss_cls", "loss_iou"]
    values = [float(v.detach()) for v in losses.values()]
    assert all(math.isfinite(v) and v > 0 for v in values)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.head.parameters())


def test_no_objects_at_all_keeps_the_graph(model):
    images, targets = images_and_targets()
    empty = [targets[1]] * 3
    losses = model.train()(images, empty)
    values = {k: float(v.detach()) for k, v in losses.items()}
    assert values["loss_bbox"] == 0.0 and values["loss_iou"] == 0.0
    assert math.isfinite(values["loss_cls"])
    sum(losses.values()).backward()
    grad = model.head.bbox_regression.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0


def test_eval_returns_well_formed_detections(model):
    images, _ = images_and_targets()
    out = model.eval()(images)
    assert len(out) == 3
    for det, image in zip(out, images, strict=True):
        h, w = image.shape[-2:]
        n = len(det["boxes"])
        assert 0 < n <= 100 and det["scores"].shape == (n,) and det["labels"].shape == (n,)
        assert det["labels"].dtype == torch.long and det["labels"].max() < 3
        assert (det["scores"] > 0.05).all() and (det["scores"].diff() <= 0).all()
        assert (det["boxes"] >= 0).all() and (det["boxes"][:, 2] <= w).all()
        assert (det["boxes"][:, 3] <= h).all()


def test_eval_with_nothing_above_threshold_is_empty_not_a_crash():
    torch.manual_seed(0)
    cfg = ModelConfig(**{**model_preset("smoke", 3).to_dict(), "score_thresh": 0.99})
    out = Detector(cfg).eval()([torch.randn(3, 64, 64)])
    assert out[0]["boxes"].shape == (0, 4) and out[0]["scores"].shape == (0,)


def test_bad_targets_raise_clear_errors(model):
    images, targets = images_and_targets()
    model.train()
    with pytest.raises(ValueError, match="needs targets"):
        model(images)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        model(images, [targets[0], targets[1], {**targets[2], "labels": torch.tensor([3])}])
    with pytest.raises(ValueError, match="no area"):
        bad = {"boxes": torch.tensor([[5.0, 5.0, 5.0, 9.0]]), "labels": torch.tensor([0])}
        model(images, [targets[0], targets[1], bad])
    with pytest.raises(ValueError, match="2 targets for 3 images"):
        model(images, targets[:2])


def test_a_teacher_assignment_feeds_a_student_loss(model):
    images, targets = images_and_targets()
    torch.manual_seed(1)
    teacher = Detector(model_preset("smoke", num_classes=3)).eval()
    predictions = model.train().predict(images)
    with torch.no_grad():
        assignment = teacher.assign(teacher.predict(images), targets)
    assert isinstance(assignment, Assignment) and assignment.num_pos > 0
    losses = model.loss(predictions, assignment)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_score_voting_moves_boxes_toward_their_neighbours():
    kept = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    candidates = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [0, 0, 10, 10.0]])
    scores, labels = torch.tensor([0.9, 0.9, 0.9]), torch.tensor([0, 0, 1])
    voted = score_voting(kept, torch.tensor([0]), candidates[:1], scores[:1], labels[:1])
    torch.testing.assert_close(voted, kept)  # alone: unchanged
    voted = score_voting(kept, torch.tensor([0]), candidates, scores, labels)
    assert 0 < voted[0, 0] < 0.5 and voted[0, 2] > 10  # pulled right; class 1 does not vote


@pytest.mark.slow
def test_a_few_steps_on_generated_images_reduce_the_loss(smoke_bench):
    dataset = data.CocoDetection(
        smoke_bench.ann_file("train"), smoke_bench.image_dir("train"),
        data.eval_transforms(96, 128), drop_empty=True,
    )  # fmt: skip
    images, targets = data.collate([dataset[i] for i in range(4)])
    torch.manual_seed(0)
    model = Detector(model_preset("smoke", num_classes=dataset.num_classes)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(40):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, (first, last)
