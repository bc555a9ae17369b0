"""Distillation: focal-KL, the KD losses, LAD's seam, the CoLAD switch, teachers, and the
distillation methods trained by the engine (resume, torchrun) on the smoke benchmark."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture
from torchvision.ops import sigmoid_focal_loss

from colad import config, distill, engine
from colad.__main__ import main
from colad.config import DistillConfig, Experiment, model_preset
from colad.detector import Detector
from colad.losses import focal_kl, kd_losses
from colad.paa import reassign
from conftest import env_with, torchrun_train

# ----------------------------------------------------------------------------------------------
# Losses


def test_focal_kl_is_the_focal_loss_for_one_hot_targets():
    torch.manual_seed(0)
    logits = torch.randn(200, 6) * 3
    targets = torch.nn.functional.one_hot(torch.randint(6, (200,)), 6).float()
    for gamma in (0.5, 2.0):
        focal = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=gamma)  # no alpha balance
        assert torch.allclose(focal_kl(logits, targets, gamma), focal, atol=1e-4, rtol=1e-3)


def test_focal_kl_vanishes_when_the_student_matches_the_teacher():
    hard = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    logits = (hard * 2 - 1) * 40  # sigmoid = 0 or 1 to float precision
    assert float(focal_kl(logits, hard).abs().max()) < 1e-12
    soft_logits = torch.randn(50, 4)
    assert float(focal_kl(soft_logits, torch.sigmoid(soft_logits)).abs().max()) < 1e-6


def test_focal_kl_matches_a_direct_computation_and_its_gradient_flows_through_the_weight():
    torch.manual_seed(1)
    logits = torch.randn(30, requires_grad=True)
    targets = torch.rand(30)
    p = torch.sigmoid(logits.double())
    t = targets.double()
    kl = t * torch.log(t / p) + (1 - t) * torch.log((1 - t) / (1 - p))
    direct = ((t - p) ** 2 + 1e-6) ** 0.25 * kl
    ours = focal_kl(logits, targets, gamma=0.5)
    assert torch.allclose(ours.double(), direct, atol=1e-6)
    (grad,) = torch.autograd.grad(ours.sum(), logits)
    (expected,) = torch.autograd.grad(direct.sum(), logits)
    assert torch.allclose(grad, expected.float(), atol=1e-5)  # the focal weight is not detached


def test_focal_kl_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="logits"):
        focal_kl(torch.zeros(3, 2), torch.zeros(3))


# ----------------------------------------------------------------------------------------------
# Networks and batches for the step tests


def smoke_net(seed: int, half: bool = False) -> Detector:
    torch.manual_seed(seed)
    cfg = model_preset("smoke", num_classes=3)
    if half:
        cfg = dataclasses.replace(cfg, widths=(8, 16, 32, 32), fpn_channels=16, norm_groups=4)
    return Detector(cfg)


def batch(kind: str = "mixed"):
    """Three images; ``mixed``: one image without objects; ``empty``: no object at all."""
    images = [torch.randn(3, 64, 96), torch.randn(3, 64, 80), torch.randn(3, 48, 64)]
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 40.0], [50.0, 10.0, 90.0, 60.0]]),
             torch.zeros(0, 4), torch.tensor([[10.0, 10.0, 40.0, 30.0]])]  # fmt: skip
    labels = [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long), torch.tensor([1])]
    if kind == "empty":
        boxes = [torch.zeros(0, 4)] * 3
        labels = [torch.zeros(0, dtype=torch.long)] * 3
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels, strict=True)]
    return images, targets


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_a_lad_step_changes_only_the_students_weights():
    student, teacher = smoke_net(0, half=True), smoke_net(1)
    trainee = distill.TeacherStudent(student, teacher, "lad", DistillConfig())
    before_s, before_t = _weights(student), _weights(teacher)
    optimizer = torch.optim.SGD([p for p in trainee.parameters() if p.requires_grad], lr=0.1)
    images, targets = batch()
    losses = trainee.train()(images, targets)
    sum(losses.values()).backward()
    optimizer.step()
    assert all(torch.equal(before_t[k], v) for k, v in teacher.state_dict().items())
    changed = [k for k, v in student.state_dict().items() if not torch.equal(before_s[k], v)]
    assert len(changed) > 10
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert set(trainee.state_dict()) == set(student.state_dict())  # the teacher is not saved


def test_the_students_loss_is_its_loss_under_the_teachers_assignment():
    student, teacher = smoke_net(0, half=True), smoke_net(1)
    trainee = distill.TeacherStudent(student, teacher, "lad", DistillConfig()).train()
    images, targets = batch()
    ours = trainee(images, targets)
    assignment = teacher.eval().assign(teacher.predict(images), targets)
    direct = student.loss(student.predict(images), assignment, box_weighting="mean")
    own = student.loss(student.predict(images), student.assign(student.predict(images), targets))
    assert ours.keys() == direct.keys()
    for key in ours:
        assert torch.allclose(ours[key], direct[key]), key
    assert any(not torch.allclose(ours[k], own[k]) for k in ours)  # not the student's own


@pytest.mark.parametrize("method", ["kd", "solad", "colad"])
@pytest.mark.parametrize("kind", ["mixed", "empty"])
def test_distillation_steps_survive_empty_images_and_batches_without_objects(method, kind):
    images, targets = batch(kind)
    if method == "colad":
        trainee = distill.CoLADPair(smoke_net(0, half=True), smoke_net(1))
    else:
        kd = DistillConfig(teacher="x", kd_min_iou=0.5 if method == "solad" else 0.1)
        trainee = distill.TeacherStudent(smoke_net(0, half=True), smoke_net(1), method, kd)
    out = trainee.train()(images, targets)
    losses = {k: v for k, v in out.items() if k.startswith("loss_")}
    assert all(math.isfinite(float(v.detach())) for v in losses.values()), losses
    sum(losses.values()).backward()
    stats = {k: v for k, v in out.items() if not k.startswith("loss_")}
    assert all(not v.requires_grad for v in stats.values())
    if method == "colad":
        assert set(stats) >= {"switch_net2", "switch_net2_P3", "cost_mean_1", "cost_std_2"}
        assert math.isnan(float(stats["switch_net2"])) == (kind == "empty")


def test_kd_selects_by_the_teachers_boxes_and_targets_them():
    student, teacher = smoke_net(0, half=True), smoke_net(1)
    images, targets = batch()
    sp, tp = student.predict(images), teacher.predict(images)
    args = (sp.head, tp.head, sp.anchors, sp.valid, targets, sp.image_sizes)
    strict = kd_losses(*args, min_iou=0.99)  # nothing selected: the guard
    strict = {k: float(v.detach()) for k, v in strict.items()}
    assert strict["loss_kd_bbox"] == 0.0 and strict["loss_kd_iou"] == 0.0
    assert math.isfinite(strict["loss_kd_cls"])
    loose = kd_losses(*args, min_iou=0.1)
    assert float(loose["loss_kd_bbox"].detach()) > 0
    same = kd_losses(tp.head, tp.head, *args[2:], min_iou=0.1)
    assert float(same["loss_kd_bbox"].detach()) < 1e-5  # the teacher's own boxes are its targets


# ----------------------------------------------------------------------------------------------
# The CoLAD switch


def test_colad_switch_on_hand_made_costs():
    groups = [
        ([1.0, 2.0, 3.0], [1.0, 1.1, 1.2]),  # 0: net 1 spreads its costs more -> net 1
        ([2.0, 2.2], [1.0, 3.0]),  # 1: net 2 spreads more -> net 2
        ([1.0], [0.5]),  # 2: one candidate, net 2 cheaper -> net 2
        ([0.5], [1.0]),  # 3: one candidate, net 1 cheaper -> net 1
        ([1.0], [1.0]),  # 4: one candidate, a tie -> net 1 (net 2 must be strictly cheaper)
        ([1.0, 4.0, 2.0], [1.0, 4.0, 2.0]),  # 5: identical costs, a tie -> net 2
    ]  # group 6 has no candidate
    cost_1 = torch.tensor([c for g in groups for c in g[0]])
    cost_2 = torch.tensor([c for g in groups for c in g[1]])
    group = torch.tensor([k for k, g in enumerate(groups) for _ in g[0]])
    order = torch.randperm(len(group))  # order does not matter
    expected = [False, True, True, False, False, True, False]
    for rule in ("std_mean", "fisher"):
        use_2 = distill.colad_switch(cost_1[order], cost_2[order], group[order], 7, rule)
        assert use_2.tolist() == expected, rule


def _per_group_loop(c1, c2, group, num_groups, rule):
    """The switch one group at a time, as the reference writes it (sklearn for Fisher)."""

    def fisher(x):
        x = np.sort(x)[:, None]
        gmm = GaussianMixture(2, covariance_type="diag", weights_init=[0.5, 0.5],
                              means_init=[[x[0, 0]], [x[-1, 0]]],
                              precisions_init=[[1.0], [1.0]]).fit(x)  # fmt: skip
        means, variances = gmm.means_[:, 0], gmm.covariances_[:, 0]
        return (means[0] - means[1]) ** 2 / (variances[0] + variances[1])

    out = []
    for g in range(num_groups):
        a, b = c1[group == g], c2[group == g]
        if len(a) == 0:
            out.append(False)
        elif len(a) == 1:
            out.append(bool(b[0] < a[0]))
        elif rule == "std_mean":
            out.append(bool(b.std(ddof=1) / b.mean() >= a.std(ddof=1) / a.mean()))
        else:
            out.append(bool(fisher(b) >= fisher(a)))
    return out


@pytest.mark.parametrize("rule", ["std_mean", "fisher"])
def test_colad_switch_matches_a_per_group_loop(rule):
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 12, size=150)
    group = np.repeat(np.arange(150), sizes)
    c1 = rng.gamma(2.0, 1.0, size=len(group)) + 0.2
    c2 = rng.gamma(2.0, 1.0, size=len(group)) + 0.2
    expected = _per_group_loop(c1, c2, group, 150, rule)
    ours = distill.colad_switch(torch.tensor(c1), torch.tensor(c2), torch.tensor(group), 150, rule)
    agree = np.mean(np.array(ours.tolist()) == np.array(expected))
    assert agree >= (1.0 if rule == "std_mean" else 0.98), agree
    assert 0.2 < np.mean(expected) < 0.8  # both networks win some groups


def test_colad_switch_rejects_bad_input():
    x = torch.ones(3)
    with pytest.raises(ValueError, match="rule"):
        distill.colad_switch(x, x, torch.zeros(3, dtype=torch.long), 1, "median")
    with pytest.raises(ValueError, match="group ids"):
        distill.colad_switch(x, x, torch.tensor([0, 1, 5]), 2)
    with pytest.raises(ValueError, match="same Tensor"):
        distill.colad_switch(x, torch.ones(2), torch.zeros(3, dtype=torch.long), 1)


def test_colad_assignment_uses_the_switched_costs_per_object_and_level():
    net1, net2 = smoke_net(0, half=True), smoke_net(1)
    images, targets = batch()
    p1, p2 = net1.predict(images), net2.predict(images)
    trace = distill.colad_trace(p1, p2, targets, net1.config)
    image, anchor = torch.nonzero(trace.group >= 0, as_tuple=True)
    picked = trace.use_2[trace.group[image, anchor]]
    expected = torch.where(picked, trace.costs_2[image, anchor], trace.costs_1[image, anchor])
    assert torch.equal(trace.paa.costs[image, anchor], expected)
    assert 0 < int(picked.sum()) < len(picked)  # this batch mixes the two networks
    # The same assigner on network 1's own costs is network 1's own PAA assignment.
    paa = trace.paa
    own = reassign(trace.costs_1, paa.pre_matched_idxs, paa.gt_boxes, paa.gt_labels,
                   paa.gt_mask, p1.num_anchors_per_level, topk=net1.config.topk)  # fmt: skip
    expected = net1.assign(p1, targets)
    assert torch.equal(own.assignment().matched_idxs, expected.matched_idxs)


# ----------------------------------------------------------------------------------------------
# Teachers


def test_teacher_and_student_must_share_anchors_and_classes():
    small = model_preset("smoke", 3)
    distill.check_compatible(dataclasses.replace(small, widths=(4, 8, 8, 8)), small, ("t", "s"))
    with pytest.raises(ValueError, match=r"teacher 't' \(tiny, 80 classes\).*num_classes 80 vs 3"):
        distill.check_compatible(model_preset("smoke", 80), small, ("t", "s"))
    with pytest.raises(ValueError, match="anchor_scale 8.0 vs 4.0; topk 5 vs 9"):
        distill.check_compatible(
            dataclasses.replace(small, anchor_scale=8.0, topk=5), small, ("t", "s")
        )


def lad_smoke(teacher: str = "paa") -> Experiment:
    return config.experiment("lad", "smoke", teacher=teacher)


def test_teachers_must_exist_and_fit(in_data_root, tmp_path):
    with pytest.raises(ValueError, match="neither a named experiment"):
        engine.run_key(lad_smoke(str(tmp_path / "nowhere")))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    with pytest.raises(ValueError, match="is not a complete run"):
        engine.run_key(lad_smoke(str(unfinished)))
    assert main(["train", "lad", "--profile", "smoke", "--teacher", str(unfinished)]) == 2
    assert main(["train", "paa", "--profile", "smoke", "--teacher", "paa-big"]) == 2
    assert main(["train", "lad", "--profile", "smoke", "--teacher", "paa-big"]) == 0


@pytest.fixture(scope="session")
def teacher_run(data_root) -> engine.RunResult:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLAD_DATA", str(data_root))
        return engine.run(config.experiment("paa", "smoke"), progress=False)


def test_a_truncated_or_foreign_teacher_checkpoint_is_refused(teacher_run, in_data_root, tmp_path):
    payload = teacher_run.checkpoint_path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(payload[: len(payload) // 3])
    with pytest.raises(engine.CheckpointError, match="truncated or corrupt"):
        engine.load_teacher(lad_smoke(str(truncated)))
    # A checkpoint whose weights are not those of the architecture it records.
    state = engine.load_checkpoint(teacher_run.checkpoint_path)
    state["experiment"]["model"]["fpn_channels"] = 64
    foreign = tmp_path / "foreign.pt"
    engine.save_checkpoint(foreign, state)
    with pytest.raises(engine.CheckpointError, match="does not match the model's architecture"):
        engine.load_teacher(lad_smoke(str(foreign)))
    # Another number of classes: the teacher cannot label the student's classes.
    state = engine.load_checkpoint(teacher_run.checkpoint_path)
    state["experiment"]["model"]["num_classes"] = 80
    state["model"] = Detector(Experiment.from_dict(state["experiment"]).model).state_dict()
    other = tmp_path / "classes.pt"
    engine.save_checkpoint(other, state)
    with pytest.raises(ValueError, match="80 classes.*num_classes 80 vs 6"):
        engine.load_teacher(lad_smoke(str(other)))


def test_a_teacher_is_loaded_frozen_and_its_key_is_part_of_the_students(teacher_run, in_data_root):
    teacher = engine.load_teacher(lad_smoke())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    by_name, by_dir = lad_smoke(), lad_smoke(str(teacher_run.path))
    assert engine.teacher_key(by_name) == engine.teacher_key(by_dir) == teacher_run.summary["key"]
    by_file = lad_smoke(str(teacher_run.checkpoint_path))
    other = lad_smoke("paa-big")
    keys = {engine.run_key(e) for e in (by_name, by_file, other)}
    assert len(keys) == 3  # another teacher, another student run


# ----------------------------------------------------------------------------------------------
# Methods in the engine


@pytest.fixture(scope="session")
def colad_run(data_root) -> engine.RunResult:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COLAD_DATA", str(data_root))
        return engine.run(config.experiment("colad", "smoke"), progress=False)


def test_colad_run_reports_and_saves_both_networks(colad_run):
    assert set(colad_run.networks) == {"net1", "net2"}
    assert colad_run.metrics == colad_run.networks["net1"]
    assert colad_run.detections_of("net2").name == "detections-net2.json"
    assert json.loads(colad_run.detections_of("net2").read_text())
    net2 = colad_run.load_model(network="net2")
    assert net2.config == colad_run.experiment.distill.network2
    history = colad_run.history
    assert all("switch_net2" in h and "loss_cls_2" in h for h in history)
    total = [h["loss"] for h in history]
    parts = [sum(v for k, v in h.items() if k.startswith("loss_")) for h in history]
    assert total == pytest.approx(parts, rel=1e-5)  # statistics are not in the loss


def test_every_named_experiment_is_valid_in_every_profile():
    for profile in config.PROFILES:
        for name in config.EXPERIMENTS:
            experiment = config.experiment(name, profile)
            assert Experiment.from_dict(experiment.to_dict()) == experiment
    quick = {n: config.experiment(n, "quick") for n in ("paa-small", "paa-big", "lad", "lad-up")}
    assert quick["lad"].model == quick["paa-small"].model
    assert quick["lad-up"].model == quick["paa-big"].model
    assert quick["lad"].train == quick["paa-small"].train  # like for like
    full = config.experiment("lad", "full")
    assert full.model.backbone == "resnet50" and full.distill.teacher == "paa-big"
    assert config.experiment("paa-big", "full").model.backbone == "resnet101"


def test_method_settings_are_checked():
    with pytest.raises(ValueError, match="needs a teacher"):
        Experiment(method="lad")
    with pytest.raises(ValueError, match="needs distill.network2"):
        Experiment(method="colad")
    with pytest.raises(ValueError, match="method='fancy'"):
        Experiment(method="fancy")
    with pytest.raises(ValueError, match="switch_rule"):
        DistillConfig(switch_rule="coin")


SMOKE_COLAD = "-m colad train colad --profile smoke --no-progress".split()


@pytest.mark.slow
def test_a_killed_colad_run_resumes_to_the_uninterrupted_weights(colad_run, data_root, tmp_path):
    out, env = tmp_path / "colad", env_with(data_root)
    command = [sys.executable, *SMOKE_COLAD, "--checkpoint-every", "2", "--out", str(out)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if engine.load_checkpoint(out / engine.CHECKPOINT)["step"] >= 6:
                break
        except (engine.CheckpointError, KeyError):
            pass
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert not (out / engine.METRICS).exists(), "the run ended before it could be killed"
    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / engine.METRICS).read_text())
    assert summary["replica_digests"] == colad_run.summary["replica_digests"]  # bit for bit
    for name, metrics in colad_run.networks.items():
        assert summary["networks"][name] == pytest.approx(metrics, nan_ok=True)


@pytest.mark.slow
def test_colad_under_torchrun_keeps_identical_replicas(data_root, tmp_path):
    summary = torchrun_train(data_root, tmp_path / "ddp", *SMOKE_COLAD[3:], "--epochs", "1")
    first, second = summary["replica_digests"]
    assert summary["world_size"] == 2 and first == second
    assert set(summary["networks"]) == {"net1", "net2"}


@pytest.mark.slow
def test_every_distillation_method_trains_from_the_command_line(in_data_root, capsys):
    for name in ("lad", "kd", "solad"):
        assert main(["train", name, "--profile", "smoke", "--no-progress"]) == 0
        assert f"{name}-tiny-smoke" in capsys.readouterr().out
    assert main(["train", "colad-cop", "--profile", "smoke", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "net1 (tiny" in out and "net2 (tiny" in out and "COP head):" in out  # both networks
    assert main(["eval", str(engine.run_path(config.experiment("lad", "smoke"))),
                 "--no-progress"]) == 0  # fmt: skip
