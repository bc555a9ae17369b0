"""Distillation: LAD, soft labels (KD), SoLAD, CoLAD, and LD for GFL detectors.

A *method* is how one training step turns a batch into losses for the networks it trains. Each
is a short step function below; the engine trains a module whose ``forward`` runs one of them:

* :func:`paa_step` -- PAA: a network assigns its own labels (:class:`colad.detector.Detector`).
* :func:`lad_step` -- LAD: a frozen teacher's PAA assignment trains the student. The one line
  where the teacher's assignment replaces the student's own is the whole idea.
* :func:`kd_step` -- soft labels: the student learns the teacher's outputs, with no object labels.
* :func:`solad_step` -- SoLAD: LAD and soft labels together.
* :func:`colad_step` -- CoLAD: two networks train together on one shared assignment whose costs
  :func:`colad_switch` takes, per (object, FPN level), from the network with the more
  discriminative costs.
* :func:`ld_step` -- LD: a GFL student trains on its own (ATSS) assignment and also learns a
  frozen GFL teacher's box distributions at its positives (:func:`colad.gfl.ld_loss`).

:class:`TeacherStudent` (LAD, KD, SoLAD, LD) and :class:`CoLADPair` are what the engine trains:
optimizer, checkpoints and DistributedDataParallel see only the trained weights.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from colad.anchors import level_of_anchor
from colad.config import TEACHER_METHODS, Experiment, ModelConfig
from colad.detector import Detector, Predictions
from colad.gfl import ld_loss
from colad.gmm import fit_two_component_gmm
from colad.heads import class_output, describe_head
from colad.losses import kd_losses
from colad.paa import Assignment, PAATrace, anchor_costs, max_iou_assign, pad_targets, reassign

__all__ = [
    "freeze",
    "check_compatible",
    "check_teacher",
    "paa_step",
    "lad_step",
    "ld_step",
    "kd_step",
    "solad_step",
    "colad_switch",
    "colad_trace",
    "colad_step",
    "TeacherStudent",
    "CoLADPair",
    "build_trainee",
    "networks",
]

# ----------------------------------------------------------------------------------------------
# Teachers


def freeze(teacher: nn.Module) -> nn.Module:
    """Make ``teacher`` a fixed function: no gradients, eval mode (BatchNorm statistics and all)."""
    teacher.requires_grad_(False)
    return teacher.eval()


#: Settings a teacher and its student must share: the assignment's anchor indices are the
#: student's (ALGORITHMS.md §4), and its labels index the student's classes.
_SHARED = ("num_classes", "num_levels", "anchor_scale", "pos_iou_thr", "topk")
#: Settings an LD teacher and its student must share: the distributions are compared anchor by
#: anchor (same levels, hence strides and grid) and bin by bin (same ``reg_max``).
_SHARED_LD = ("num_classes", "num_levels", "reg_max")


def check_compatible(
    teacher: ModelConfig, student: ModelConfig, names: tuple[str, str], fields=_SHARED
) -> None:
    """Raise ValueError unless the two networks share anchors, classes and top-k (``fields``).

    Backbone, widths and head depth may differ: the teacher's assignment only names anchors.

    Args:
        names: how to call the two networks in the message (e.g. their experiment names).
    """
    differ = [
        f"{field} {getattr(teacher, field)} vs {getattr(student, field)}"
        for field in fields
        if getattr(teacher, field) != getattr(student, field)
    ]
    if differ:
        raise ValueError(
            f"teacher {names[0]!r} ({teacher.backbone}, {teacher.num_classes} classes) cannot "
            f"assign labels for student {names[1]!r} ({student.backbone}, "
            f"{student.num_classes} classes): {'; '.join(differ)}"
        )


def _check_heads(method: str, teacher: ModelConfig, student: ModelConfig, name: str) -> None:
    """Raise ValueError unless the teacher's head gives what ``method`` takes from it: box
    distributions (LD: GFL teacher and student) or PAA costs (LAD, soft labels: no GFL)."""
    gfl = {"teacher": teacher.head == "gfl", "student": student.head == "gfl"}
    if method == "ld" and not all(gfl.values()):
        role = "teacher" if not gfl["teacher"] else "student"
        head = (teacher if role == "teacher" else student).head
        raise ValueError(
            f"{name}: LD distils a GFL teacher's box distributions into a GFL student, but the "
            f"{role} has a {describe_head(head, 'infer')} (ModelConfig.head={head!r}); train "
            "the teacher with a GFL experiment (e.g. 'gfl')"
        )
    if method != "ld" and any(gfl.values()):
        role = "teacher" if gfl["teacher"] else "student"
        raise ValueError(
            f"{name}: {method.upper()} takes a PAA assignment from the teacher's predictions, "
            f"but the {role} is a GFL detector (ATSS ignores predictions); distil GFL with LD "
            "(experiment 'ld')"
        )


def check_teacher(teacher: ModelConfig, experiment: Experiment, name: str) -> None:
    """Raise ValueError unless ``teacher`` can teach ``experiment``'s student by its method:
    the right head type (:func:`_check_heads`) and the settings the method compares."""
    _check_heads(experiment.method, teacher, experiment.model, f"teacher {name!r}")
    fields = _SHARED_LD if experiment.method == "ld" else _SHARED
    check_compatible(teacher, experiment.model, (name, experiment.name), fields)


def _teacher_outputs(
    teacher: Detector, images, targets: list[dict[str, Tensor]], *, assign: bool
) -> tuple[dict[str, Tensor], Assignment | None]:
    """The frozen teacher's head outputs and (if ``assign``) its PAA assignment.

    The teacher runs in eval mode under ``torch.inference_mode``; its results are copied out of
    inference mode so that the student's losses may use them as targets.
    """
    with torch.inference_mode():
        teacher.eval()  # every step: the engine's train() may have switched it back
        predictions = teacher.predict(images)
        assignment = teacher.assign(predictions, targets) if assign else None
    head = {k: v.clone() for k, v in predictions.head.items()}
    if assignment is not None:
        assignment = Assignment(*(t.clone() for t in dataclasses.astuple(assignment)))
    return head, assignment


# ----------------------------------------------------------------------------------------------
# Methods: one training step each


def paa_step(net: Detector, images, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """PAA: the network's own predictions assign its labels (ALGORITHMS.md §3)."""
    predictions = net.predict(images)
    return net.loss(predictions, net.assign(predictions, targets))


def lad_step(
    student: Detector, teacher: Detector, images, targets: list[dict[str, Tensor]]
) -> dict[str, Tensor]:
    """LAD: the student learns from the teacher's assignment (ALGORITHMS.md §4).

    The student's own predictions never enter the assignment; the teacher gives only
    hard labels (which anchors are positive, their object's box and class). The
    student's box loss is the plain GIoU mean over the positives.
    """
    predictions = student.predict(images)
    # the teacher's assignment, not the student's
    _, assignment = _teacher_outputs(teacher, images, targets, assign=True)
    return student.loss(predictions, assignment, box_weighting="mean")


def ld_step(student: Detector, teacher: Detector, images, targets, distill) -> dict[str, Tensor]:
    """LD: GFL's own losses plus the distillation of the teacher's box distributions
    (ALGORITHMS.md §16.8).

    The assignment is the student's ATSS, which reads only anchors and objects, so the teacher
    would assign the same anchors; the teacher gives its bin logits and nothing else.
    """
    predictions = student.predict(images)
    teacher_head, _ = _teacher_outputs(teacher, images, targets, assign=False)
    assignment = student.assign(predictions, targets)
    losses = student.loss(predictions, assignment)
    losses["loss_ld"] = ld_loss(
        predictions.head, teacher_head["box_logits"], assignment,
        temperature=distill.ld_temperature, weight=distill.ld_weight,
        reference_images=distill.ld_reference_images,
    )  # fmt: skip
    return losses


def _soft_labels(
    student: Detector, predictions: Predictions, teacher_head: dict[str, Tensor], targets, kd
) -> dict[str, Tensor]:
    return kd_losses(
        predictions.head, teacher_head, predictions.anchors, predictions.valid, targets,
        predictions.image_sizes, box_coder=student.box_coder, min_iou=kd.kd_min_iou,
        cls_weight=kd.kd_cls_weight, iou_weight=kd.kd_iou_weight, giou_weight=kd.kd_box_weight,
        gamma=kd.kd_gamma,
    )  # fmt: skip


def kd_step(student: Detector, teacher: Detector, images, targets, kd) -> dict[str, Tensor]:
    """Soft labels alone: the student matches the teacher's class, IoU and box outputs
    (:func:`colad.losses.kd_losses`); objects only choose which boxes are distilled
    (ALGORITHMS.md §6.3)."""
    predictions = student.predict(images)
    teacher_head, _ = _teacher_outputs(teacher, images, targets, assign=False)
    return _soft_labels(student, predictions, teacher_head, targets, kd)


def solad_step(student: Detector, teacher: Detector, images, targets, kd) -> dict[str, Tensor]:
    """SoLAD: LAD's losses plus the soft-label losses, from one teacher pass (§6.4)."""
    predictions = student.predict(images)
    teacher_head, assignment = _teacher_outputs(teacher, images, targets, assign=True)
    losses = student.loss(predictions, assignment, box_weighting="mean")
    return {**losses, **_soft_labels(student, predictions, teacher_head, targets, kd)}


# ----------------------------------------------------------------------------------------------
# CoLAD


def _group_moments(values: Tensor, group: Tensor, num_groups: int) -> tuple[Tensor, ...]:
    """Count, mean and unbiased standard deviation of ``values`` within each group."""
    count = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    count.index_add_(0, group, torch.ones_like(values))
    total = torch.zeros_like(count).index_add_(0, group, values)
    mean = total / count.clamp(min=1)
    square = torch.zeros_like(count).index_add_(0, group, (values - mean[group]) ** 2)
    std = torch.sqrt(square / (count - 1).clamp(min=1))
    return count, mean, std


def _group_rows(values: Tensor, group: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Lay each group's values out as one row, ascending, padded: ``(Tensor[G, K], valid)``."""
    order = values.argsort(stable=True)
    order = order[group[order].argsort(stable=True)]
    count = torch.bincount(group, minlength=num_groups)
    first = count.cumsum(0) - count
    position = torch.arange(len(values), device=values.device) - first[group[order]]
    width = int(count.max()) if len(values) else 0
    rows = values.new_zeros(num_groups, width)
    rows[group[order], position] = values[order]
    valid = torch.arange(width, device=values.device)[None, :] < count[:, None]
    return rows, valid


def _fisher(values: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """Fisher's criterion ``(mu_fg - mu_bg)^2 / (v_fg + v_bg)`` of a two-component mixture fitted
    to each group's values (``nan`` for groups with fewer than two)."""
    rows, valid = _group_rows(values.double(), group, num_groups)
    mixture = fit_two_component_gmm(rows, valid)
    means, variances = mixture.means, mixture.variances
    rho = (means[:, 0] - means[:, 1]) ** 2 / (variances[:, 0] + variances[:, 1])
    return torch.where(mixture.n_iter > 0, rho, math.nan).to(values.dtype)


@torch.no_grad()
def colad_switch(
    cost_1: Tensor,
    cost_2: Tensor,
    group: Tensor,
    num_groups: int,
    rule: str = "std_mean",
) -> Tensor:
    """Which network's costs assign each group of candidates (CoLAD's dynamic switch).

    A group is one object's pre-assigned candidates on one FPN level. Per group:

    * more than one candidate, ``"std_mean"``: network 2 if
      ``sigma_2 / mu_2 >= sigma_1 / mu_1`` (unbiased std over all the group's
      candidates; ties go to network 2);
    * more than one candidate, ``"fisher"``: network 2 if its Fisher criterion
      ``(mu_fg - mu_bg)^2 / (sigma_fg^2 + sigma_bg^2)`` of a two-component mixture
      fitted to its costs is at least network 1's;
    * one candidate (both rules): network 2 if ``mu_2 < mu_1`` (its cost is lower);
    * no candidate: ``False`` (nothing to assign).

    Both criteria measure how well a network's costs separate good anchors from bad
    ones: the network with the more spread-out, more bimodal costs teaches.

    Args:
        cost_1, cost_2 (Tensor[N]): the two networks' costs of the same N candidates.
        group (Tensor[N] long): each candidate's group in ``[0, num_groups)``.
        num_groups: ``G``.
        rule: ``"std_mean"`` (the released code's) or ``"fisher"`` (described in the
            paper only).

    Returns:
        Tensor[G] bool: True where network 2's costs are used.

    Reference:
        Nguyen et al., WACV 2022, §4 (CoLAD); ALGORITHMS.md §5.2-5.3; chapter
        {ref}`sec-colad`.
    """
    if rule not in ("std_mean", "fisher"):
        raise ValueError(f"rule={rule!r}; choose 'std_mean' or 'fisher'")
    if not (cost_1.shape == cost_2.shape == group.shape) or cost_1.dim() != 1:
        raise ValueError(
            f"cost_1 {tuple(cost_1.shape)}, cost_2 {tuple(cost_2.shape)} and group "
            f"{tuple(group.shape)} must be the same Tensor[N]"
        )
    if len(group) and not 0 <= int(group.min()) <= int(group.max()) < num_groups:
        raise ValueError(f"group ids must lie in [0, {num_groups})")
    cost_1, cost_2 = cost_1.double(), cost_2.double()
    count, mean_1, std_1 = _group_moments(cost_1, group, num_groups)
    _, mean_2, std_2 = _group_moments(cost_2, group, num_groups)
    if rule == "std_mean":
        tiny = torch.finfo(torch.float64).tiny
        score_1, score_2 = (
            std_1 / mean_1.clamp(min=tiny),
            std_2 / mean_2.clamp(min=tiny),
        )
    else:
        score_1, score_2 = (
            _fisher(cost_1, group, num_groups),
            _fisher(cost_2, group, num_groups),
        )
    several = torch.where(count > 1, score_2 >= score_1, False)
    single = (count == 1) & (mean_2 < mean_1)
    return several | single


@dataclasses.dataclass(frozen=True)
class CoLADTrace:
    """One CoLAD assignment with what the switch saw.

    Attributes:
        paa: the shared assignment's :class:`colad.paa.PAATrace` (built on the switched costs).
        costs_1, costs_2 (Tensor[B, A]): each network's anchor costs (``inf`` off candidates).
        group (Tensor[B, A] long): the (object, level) group of each candidate, ``-1`` elsewhere.
        use_2 (Tensor[G] bool): the switch, ``G = B * M * L`` groups.
        group_size (Tensor[G] long): candidates per group.
    """

    paa: PAATrace
    costs_1: Tensor
    costs_2: Tensor
    group: Tensor
    use_2: Tensor
    group_size: Tensor

    def statistics(self, num_levels: int) -> dict[str, Tensor]:
        """The switch in numbers, over the groups that have candidates: the fraction that took
        network 2's costs (``switch_net2``, and per level ``switch_net2_P3`` ...) and each
        network's mean cost and cost std (the std over groups with more than one candidate)."""
        image, anchor = torch.nonzero(self.group >= 0, as_tuple=True)
        group = self.group[image, anchor]
        num_groups = len(self.use_2)
        stats = {}
        present = self.group_size > 0
        level = torch.arange(num_groups, device=group.device) % num_levels
        stats["switch_net2"] = _fraction(self.use_2, present)
        for lvl in range(num_levels):
            stats[f"switch_net2_P{3 + lvl}"] = _fraction(self.use_2, present & (level == lvl))
        several = self.group_size > 1
        for k, costs in (("1", self.costs_1), ("2", self.costs_2)):
            _, mean, std = _group_moments(costs[image, anchor].double(), group, num_groups)
            stats[f"cost_mean_{k}"] = _masked_mean(mean, present)
            stats[f"cost_std_{k}"] = _masked_mean(std, several)
        return {k: v.float() for k, v in stats.items()}


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return values[mask].mean() if bool(mask.any()) else values.new_tensor(math.nan)


def _fraction(flags: Tensor, mask: Tensor) -> Tensor:
    return _masked_mean(flags.double(), mask)


@torch.no_grad()
def colad_trace(
    first: Predictions,
    second: Predictions,
    targets: list[dict[str, Tensor]],
    config: ModelConfig,
    *,
    rule: str = "std_mean",
    box_coder=None,
) -> CoLADTrace:
    """CoLAD's shared assignment (ALGORITHMS.md §5.2 steps 2-5).

    1. IoU pre-assignment, once: it depends only on anchors and objects, so both networks agree.
    2. Each network's PAA cost of every candidate.
    3. The switch picks, per (object, level), whose costs that group keeps (:func:`colad_switch`).
    4. PAA's top-k, mixture split and cut on the switched costs (:func:`colad.paa.reassign`);
       one object's mixture may mix the two networks' costs across levels.

    Args:
        first, second: the two networks' predictions on the same images (same anchors).
        config: the shared assignment settings (anchors, IoU threshold, top-k, cost weights).
    """
    classes = [class_output(p.head) for p in (first, second)]
    if classes[0][0].shape != classes[1][0].shape:
        raise ValueError("CoLAD: the two networks' outputs differ in shape (anchors or classes)")
    anchors, valid, num_per_level = first.anchors, first.valid, first.num_anchors_per_level
    gt_boxes, gt_labels, gt_mask = pad_targets(targets, device=anchors.device)
    threshold = config.pos_iou_thr
    pre = max_iou_assign(anchors, valid, gt_boxes, gt_mask, pos_iou_thr=threshold,
                         neg_iou_thr=threshold)  # fmt: skip
    weights = dict(box_coder=box_coder, giou_weight=config.giou_weight,
                   alpha=config.focal_alpha, gamma=config.focal_gamma)  # fmt: skip
    costs = [
        anchor_costs(
            scores,
            p.head["bbox_regression"],
            anchors,
            pre,
            gt_boxes,
            gt_labels,
            probabilities=probabilities,
            **weights,
        )  # fmt: skip
        for p, (scores, probabilities) in zip((first, second), classes, strict=True)
    ]
    batch, num_gts = gt_mask.shape
    num_levels = len(num_per_level)
    image, anchor = torch.nonzero(pre >= 0, as_tuple=True)
    level = level_of_anchor(num_per_level, device=anchors.device)[anchor]
    group = (image * num_gts + pre[image, anchor]) * num_levels + level
    num_groups = batch * num_gts * num_levels
    use_2 = colad_switch(costs[0][image, anchor], costs[1][image, anchor], group, num_groups, rule)
    switched = costs[0].clone()
    switched[image, anchor] = torch.where(
        use_2[group], costs[1][image, anchor], costs[0][image, anchor]
    )
    trace = reassign(switched, pre, gt_boxes, gt_labels, gt_mask, num_per_level, topk=config.topk)
    group_map = torch.full_like(pre, -1)
    group_map[image, anchor] = group
    size = torch.bincount(group, minlength=num_groups)
    return CoLADTrace(trace, costs[0], costs[1], group_map, use_2, size)


def colad_step(
    pair: CoLADPair,
    images,
    targets: list[dict[str, Tensor]],
) -> dict[str, Tensor]:
    """CoLAD: both networks learn from one switched assignment (ALGORITHMS.md §5.2).

    Each network gets LAD's losses (plain GIoU mean) on the shared assignment and
    gradients only from its own losses; the switch's statistics come back beside the
    losses (no ``loss_`` prefix, so the engine logs them and never back-propagates
    them).
    """
    first, second = pair.net1.predict(images), pair.net2.predict(images)
    trace = colad_trace(first, second, targets, pair.net1.config, rule=pair.rule,
                        box_coder=pair.net1.box_coder)  # fmt: skip
    assignment = trace.paa.assignment()
    out = {}
    for k, (net, predictions) in enumerate(
        ((pair.net1, first), (pair.net2, second)),
        start=1,
    ):
        losses = net.loss(predictions, assignment, box_weighting="mean")
        out.update({f"{name}_{k}": value for name, value in losses.items()})
    return {**out, **trace.statistics(len(first.num_anchors_per_level))}


# ----------------------------------------------------------------------------------------------
# What the engine trains


class TeacherStudent(nn.Module):
    """A student and its frozen teacher, trained by LAD, KD, SoLAD or LD.

    Only the student is a submodule: the optimizer, DistributedDataParallel and the checkpoint
    see the student's weights alone (the checkpoint loads into a plain
    :class:`~colad.detector.Detector`), while ``.to(device)`` moves the teacher too.

    Args:
        student: the network that learns.
        teacher: a trained detector (frozen here).
        method: ``"lad"``, ``"kd"``, ``"solad"`` or ``"ld"``.
        kd: the soft-label and LD settings (:class:`colad.config.DistillConfig`).
    """

    def __init__(self, student: Detector, teacher: Detector, method: str, kd) -> None:
        super().__init__()
        if method not in TEACHER_METHODS:
            raise ValueError(f"TeacherStudent: method {method!r}; choose one of "
                             f"{', '.join(TEACHER_METHODS)}")  # fmt: skip
        _check_heads(method, teacher.config, student.config, "TeacherStudent")
        self.student = student
        object.__setattr__(self, "teacher", freeze(teacher))  # not a submodule: never trained
        self.method, self.kd = method, kd

    def forward(self, images, targets=None):
        if not self.training:
            return self.student(images)
        if self.method == "lad":
            return lad_step(self.student, self.teacher, images, targets)
        step = {"kd": kd_step, "solad": solad_step, "ld": ld_step}[self.method]
        return step(self.student, self.teacher, images, targets, self.kd)

    def _apply(self, fn, recurse=True):
        self.teacher._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def state_dict(self, *args, **kwargs):
        return self.student.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.student.load_state_dict(state_dict, strict=strict, assign=assign)


class CoLADPair(nn.Module):
    """CoLAD's two networks, both trained (checkpoint keys ``net1.*`` and ``net2.*``).

    Args:
        net1, net2: the two detectors; they must share anchors, classes and top-k.
        rule: the switch rule (:func:`colad_switch`).
    """

    def __init__(self, net1: Detector, net2: Detector, rule: str = "std_mean") -> None:
        super().__init__()
        check_compatible(net2.config, net1.config, ("network 2", "network 1"))
        self.net1, self.net2, self.rule = net1, net2, rule

    def forward(self, images, targets=None):
        if not self.training:
            return self.net1(images)
        return colad_step(self, images, targets)


def networks(trainee: nn.Module) -> dict[str, Detector]:
    """The detectors a trained module holds, by the names the run's files use: ``model`` for a
    single network (a student included), ``net1`` and ``net2`` for CoLAD."""
    if isinstance(trainee, CoLADPair):
        return {"net1": trainee.net1, "net2": trainee.net2}
    if isinstance(trainee, TeacherStudent):
        return {"model": trainee.student}
    return {"model": trainee}


def build_trainee(experiment: Experiment, teacher: Detector | None = None) -> nn.Module:
    """The module the engine trains for ``experiment``: a :class:`~colad.detector.Detector`
    (``baseline``), a :class:`TeacherStudent` around a new student and ``teacher`` (``lad``,
    ``kd``, ``solad``, ``ld``) or a :class:`CoLADPair` of two new networks (``colad``)."""
    method, distill = experiment.method, experiment.distill
    if method == "baseline":
        return Detector(experiment.model)
    if method == "colad":
        net1 = Detector(experiment.model)
        return CoLADPair(net1, Detector(distill.network2), distill.switch_rule)
    if teacher is None:
        raise ValueError(f"{experiment.name}: method {method!r} needs a trained teacher")
    if method in ("kd", "solad"):
        for role, cfg in (("student", experiment.model), ("teacher", teacher.config)):
            if cfg.head != "paa" or cfg.iou_branch == "none":
                raise ValueError(
                    f"{experiment.name}: soft labels ({method!r}) distil class logits and the IoU "
                    f"branch, so the {role} needs a plain PAA head with the IoU branch; it has a "
                    f"{describe_head(cfg.head, cfg.iou_branch)}"
                )
    return TeacherStudent(Detector(experiment.model), teacher, method, distill)
