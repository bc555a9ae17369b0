"""The PAA detector against torchvision's RetinaNet with the same backbone, FPN, head
depth, image size and batch: a training step, inference, a distillation method's step and
the head's saved activations (``bench train``, ``bench infer``, ``bench head``)."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from ..config import ModelConfig
from .timing import _alternate, _seconds

__all__ = [
    "retinanet_like",
    "bench_train",
    "bench_infer",
    "bench_method",
    "bench_head",
    "saved_bytes",
]


def retinanet_like(config, image_size: tuple[int, int]) -> torch.nn.Module:
    """torchvision's RetinaNet built to match a colad ``ModelConfig`` with a ResNet backbone:
    the same ResNet (random weights, trainable BatchNorm), FPN width and P3-P7 levels, and
    ``head_convs``-deep towers with GroupNorm (torchvision's v2 head). Its input transform is
    set to the image size, so it does not resize. Anchors stay torchvision's (9 per location).
    """
    import torchvision
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if not config.backbone.startswith("resnet") or config.num_levels != 5:
        raise ValueError("retinanet_like needs a ResNet backbone and 5 FPN levels")
    width = config.fpn_channels
    resnet = getattr(torchvision.models, config.backbone)(weights=None)
    c3 = resnet.inplanes // 4  # C3-C5 have inplanes / 4, / 2 and / 1 channels
    backbone = BackboneWithFPN(
        resnet, {"layer2": "0", "layer3": "1", "layer4": "2"}, [c3, 2 * c3, 4 * c3], width,
        extra_blocks=LastLevelP6P7(width, width),
    )  # fmt: skip
    model = RetinaNet(
        backbone, config.num_classes, min_size=min(image_size), max_size=max(image_size)
    )
    num_anchors = model.anchor_generator.num_anchors_per_location()[0]
    norm = partial(torch.nn.GroupNorm, config.norm_groups)
    head = RetinaNetHead(width, num_anchors, config.num_classes, norm_layer=norm)
    for tower in (head.classification_head.conv, head.regression_head.conv):
        del tower[config.head_convs :]  # torchvision builds 4 conv-norm-relu blocks
    model.head = head
    return model


def _random_targets(batch: int, image_size: tuple[int, int], num_classes: int, seed: int):
    """Eight random boxes per image, 16 px to half the image, with random classes."""
    g = torch.Generator().manual_seed(seed)
    height, width = image_size
    targets = []
    for _ in range(batch):
        wh = torch.rand(8, 2, generator=g) * (torch.tensor([width, height]) / 2 - 16) + 16
        xy = torch.rand(8, 2, generator=g) * (torch.tensor([width, height]) - wh)
        labels = torch.randint(num_classes, (8,), generator=g)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": labels})
    return targets


def _random_batch(batch: int, image_size: tuple[int, int], num_classes: int, device, seed: int):
    """``batch`` random images (from the global generator) and :func:`_random_targets`, on
    ``device``: what every timed step here runs on."""
    images = [torch.randn(3, *image_size, device=device) for _ in range(batch)]
    targets = [{k: v.to(device) for k, v in t.items()}
               for t in _random_targets(batch, image_size, num_classes, seed)]  # fmt: skip
    return images, targets


def _paired_models(backbone, fpn_channels, image_size, batch, num_classes, device, seed):
    """PAA and the matching RetinaNet on ``device``, with the same random images and targets."""
    from colad.config import ModelConfig
    from colad.detector import Detector

    torch.manual_seed(seed)
    config = ModelConfig(num_classes=num_classes, backbone=backbone, fpn_channels=fpn_channels)
    models = {"paa": Detector(config), "retinanet": retinanet_like(config, image_size)}
    for model in models.values():
        model.to(device)
    images, targets = _random_batch(batch, image_size, num_classes, device, seed)
    return models, images, targets


def bench_train(
    *,
    backbone: str = "resnet18",
    fpn_channels: int = 256,
    image_size: tuple[int, int] = (512, 768),
    batch: int = 2,
    num_classes: int = 80,
    repeats: int = 10,
    device: str | torch.device = "cpu",
    amp: bool = False,
    seed: int = 0,
) -> dict:
    """Time one SGD step (forward, losses, backward, update) of PAA and of a matching RetinaNet,
    alternating them on the same images and targets.

    Args:
        amp: float16 autocast with a gradient scaler (CUDA only; ignored on the CPU).

    Returns:
        ``paa_ms``, ``retinanet_ms`` (medians), ``ratio`` (PAA / RetinaNet), ``assign_ms`` (the
        median time of PAA's assignment alone), ``paa_images_s``, ``retinanet_images_s`` and the
        settings.
    """
    device = torch.device(device)
    amp = amp and device.type == "cuda"
    models, images, targets = _paired_models(
        backbone, fpn_channels, image_size, batch, num_classes, device, seed
    )
    optimizers, scalers = {}, {}
    for name, model in models.items():
        model.train()
        optimizers[name] = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        scalers[name] = torch.amp.GradScaler("cuda", enabled=amp)

    def step(name: str) -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            losses = models[name](images, targets)
        optimizers[name].zero_grad()
        scalers[name].scale(sum(losses.values())).backward()
        scalers[name].step(optimizers[name])
        scalers[name].update()

    medians = _alternate(device, {name: partial(step, name) for name in models}, repeats)
    paa_model = models["paa"]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        predictions = paa_model.predict(images)
        assign = [_seconds(device, paa_model.assign, predictions, targets) for _ in range(repeats)]
    return _timing_row(medians, batch, device, backbone, fpn_channels, image_size, amp,
                       assign_ms=statistics.median(assign) * 1e3)  # fmt: skip


def _threshold_passing(scores: Tensor, count: int) -> float:
    """The score threshold that about ``count`` entries of ``scores`` exceed."""
    flat = scores.flatten().float()
    return float(flat.topk(min(count, flat.numel())).values[-1]) * (1 - 1e-6)


@torch.inference_mode()
def _calibrate_thresholds(paa, retina, images: list[Tensor], per_image: int) -> None:
    """Set both detectors' score thresholds so that about ``per_image`` (box, class) pairs per
    image pass them, as in a trained detector at its usual threshold."""
    from colad.detector import detection_scores

    count = per_image * len(images)
    paa_scores = detection_scores(paa.predict(images))
    paa.config = dataclasses.replace(paa.config, score_thresh=_threshold_passing(paa_scores, count))
    batch, _ = retina.transform(images)
    features = list(retina.backbone(batch.tensors).values())
    retina_scores = torch.sigmoid(retina.head(features)["cls_logits"])
    retina.score_thresh = _threshold_passing(retina_scores, count)


def bench_infer(
    *,
    backbone: str = "resnet18",
    fpn_channels: int = 256,
    image_size: tuple[int, int] = (512, 768),
    batch: int = 2,
    num_classes: int = 80,
    repeats: int = 10,
    device: str | torch.device = "cpu",
    amp: bool = False,
    candidates: int = 1000,
    seed: int = 0,
) -> dict:
    """Time inference (network, decoding, NMS; PAA also its score voting) of PAA and of a
    matching RetinaNet, alternating them on the same images.

    How much post-processing runs depends on how many (box, class) pairs pass the score
    threshold, and with random weights that would be left to chance (scores sit near the
    classification prior: RetinaNet's below its 0.05 threshold, PAA's geometric-mean scores
    above it). So each model's threshold is set so that about ``candidates`` pairs per image pass
    it; both keep their top 1000 anchors per level, run NMS at IoU 0.6 and keep 100 per image.

    Returns:
        Like :func:`bench_train`, without ``assign_ms``, with each model's ``*_threshold``.
    """
    device = torch.device(device)
    amp = amp and device.type == "cuda"
    models, images, _ = _paired_models(
        backbone, fpn_channels, image_size, batch, num_classes, device, seed
    )
    paa, retina = models["paa"], models["retinanet"]
    for model in models.values():
        model.eval()
    retina.nms_thresh = paa.config.nms_thresh
    retina.detections_per_img = paa.config.detections_per_img
    retina.topk_candidates = paa.config.nms_pre
    _calibrate_thresholds(paa, retina, images, candidates)

    @torch.inference_mode()
    def infer(name: str) -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            models[name](images)

    medians = _alternate(device, {name: partial(infer, name) for name in models}, repeats)
    return _timing_row(medians, batch, device, backbone, fpn_channels, image_size, amp,
                       paa_threshold=paa.config.score_thresh,
                       retinanet_threshold=retina.score_thresh)  # fmt: skip


def _timing_row(medians, batch, device, backbone, fpn_channels, image_size, amp, **extra) -> dict:
    paa_ms, retina_ms = medians["paa"], medians["retinanet"]
    return {
        "device": str(device), "backbone": backbone, "fpn_channels": fpn_channels,
        "image_size": tuple(image_size), "batch": batch, "amp": amp, "paa_ms": paa_ms,
        "retinanet_ms": retina_ms, "ratio": paa_ms / retina_ms,
        "paa_images_s": batch / paa_ms * 1e3, "retinanet_images_s": batch / retina_ms * 1e3,
        **extra,
    }  # fmt: skip


def bench_method(
    method: str,
    student: ModelConfig,
    other: ModelConfig,
    *,
    image_size: tuple[int, int] = (512, 768),
    batch: int = 2,
    repeats: int = 10,
    device: str | torch.device = "cpu",
    amp: bool = False,
    seed: int = 0,
) -> dict:
    """Time a distillation step against the steps it replaces, alternating them on the same
    images and targets.

    * ``"lad"``: the LAD step (student forward and backward, the frozen teacher's forward and
      assignment) against the student's own PAA step and the teacher's forward pass alone; the
      target is ``lad <= (student + teacher forward) x 1.1``.
    * ``"ld"``: the same for LD, with GFL networks (:func:`colad.config.gfl_model` of ``student``
      and ``other``): the LD step against the GFL student's own step and the teacher's forward.
    * ``"colad"``: the CoLAD step (both networks, one switched assignment) against each
      network's own PAA step; the target is ``colad <= (net 1 + net 2) x 1.05``.

    Args:
        student: the student (LAD) or network 1 (CoLAD).
        other: the teacher (LAD) or network 2 (CoLAD).

    Returns:
        The medians in ms (``method_ms`` and the parts), ``reference_ms`` (the sum the target
        multiplies), ``ratio`` (method / reference) and the settings.
    """
    from colad.config import DistillConfig, gfl_model
    from colad.detector import Detector
    from colad.distill import CoLADPair, TeacherStudent, freeze

    if method not in ("lad", "colad", "ld"):
        raise ValueError(f"method {method!r}; choose 'lad', 'colad' or 'ld'")
    if method == "ld":
        student, other = gfl_model(student), gfl_model(other)
    device = torch.device(device)
    amp = amp and device.type == "cuda"
    torch.manual_seed(seed)
    first, second = Detector(student).to(device), Detector(other).to(device)
    images, targets = _random_batch(batch, image_size, student.num_classes, device, seed)
    if method in ("lad", "ld"):
        pair = TeacherStudent(first, freeze(second), method, DistillConfig(teacher="bench"))
        trained = {"student": first, method: pair}
    else:
        trained = {"net1": first, "net2": second, "colad": CoLADPair(first, second)}
    optimizers = {n: torch.optim.SGD(m.parameters(), lr=1e-5, momentum=0.9)
                  for n, m in trained.items()}  # fmt: skip
    scalers = {n: torch.amp.GradScaler("cuda", enabled=amp) for n in trained}

    def step(name: str) -> None:
        trained[name].train()
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            losses = trained[name](images, targets)
        loss = sum(v for k, v in losses.items() if k.startswith("loss_"))
        optimizers[name].zero_grad()
        scalers[name].scale(loss).backward()
        scalers[name].step(optimizers[name])
        scalers[name].update()

    @torch.inference_mode()
    def teacher_forward() -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            second.predict(images)

    steps = {name: partial(step, name) for name in trained}
    if method != "colad":
        steps["teacher_forward"] = teacher_forward
    medians = _alternate(device, steps, repeats)
    if method != "colad":
        reference, target = medians["student"] + medians["teacher_forward"], 1.1
    else:
        reference, target = medians["net1"] + medians["net2"], 1.05
    return {
        "method": method, "device": str(device), "image_size": tuple(image_size), "batch": batch,
        "amp": amp, **{f"{name}_ms": ms for name, ms in medians.items()},
        "method_ms": medians[method], "reference_ms": reference,
        "ratio": medians[method] / reference, "target": target,
        "student_ratio": medians[method] / medians.get("student", medians.get("net1")),
    }  # fmt: skip


def saved_bytes(fn: Callable, *args) -> int:
    """Bytes of the distinct tensors autograd saves for the backward pass while ``fn(*args)``
    runs: the activation memory a training step holds, on any device."""
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*args)
    return sum(storages.values())


def bench_head(
    head: str,
    *,
    training: bool = True,
    iou_branch: str = "infer",
    backbone: str = "resnet18",
    fpn_channels: int = 256,
    image_size: tuple[int, int] = (512, 768),
    batch: int = 2,
    num_classes: int = 80,
    repeats: int = 10,
    device: str | torch.device = "cpu",
    amp: bool = False,
    candidates: int = 1000,
    seed: int = 0,
) -> dict:
    """Time a head variant (IOP, COP: :mod:`colad.heads`; GFL: :mod:`colad.gfl`, with ATSS and its
    own losses and decoding) against the plain PAA head in the same detector (backbone, FPN,
    towers), alternating them on the same images and targets.

    ``training``: one SGD step each; otherwise inference, each detector's score threshold set so
    that about ``candidates`` (box, class) pairs per image pass it (as :func:`bench_infer`).
    Also measures the memory the head holds for the backward pass on P3, the largest level
    (:func:`saved_bytes` of the head on P3 alone; COP's fusion adds its padded probability map
    and its nine weights).

    Returns:
        ``paa_ms``, ``variant_ms`` (medians), ``ratio`` (variant / PAA), ``paa_p3_mb``,
        ``variant_p3_mb``, ``memory_ratio``, ``target`` (DESIGN.md's bound on the ratio for IOP
        and COP; ``None`` for GFL, a different detector) and the settings.
    """
    from colad.config import gfl_model
    from colad.detector import Detector, detection_scores

    device = torch.device(device)
    amp = amp and device.type == "cuda"
    plain = ModelConfig(num_classes=num_classes, backbone=backbone, fpn_channels=fpn_channels)
    if head == "gfl":
        variant = gfl_model(plain)
    else:
        variant = dataclasses.replace(plain, head=head, iou_branch=iou_branch)
    models = {}
    for name, cfg in (("paa", plain), ("variant", variant)):
        torch.manual_seed(seed)  # the same backbone, FPN and towers
        models[name] = Detector(cfg).to(device)
    images, targets = _random_batch(batch, image_size, num_classes, device, seed)
    if training:
        optimizers = {n: torch.optim.SGD(m.parameters(), lr=1e-5, momentum=0.9)
                      for n, m in models.items()}  # fmt: skip
        scalers = {n: torch.amp.GradScaler("cuda", enabled=amp) for n in models}

        def run(name: str) -> None:
            models[name].train()
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                losses = models[name](images, targets)
            optimizers[name].zero_grad()
            scalers[name].scale(sum(losses.values())).backward()
            scalers[name].step(optimizers[name])
            scalers[name].update()

    else:
        with torch.inference_mode():
            for model in models.values():
                model.eval()
                scores = detection_scores(model.predict(images),
                                          use_iou=model.config.iou_branch == "infer")  # fmt: skip
                threshold = _threshold_passing(scores, candidates * batch)
                model.config = dataclasses.replace(model.config, score_thresh=threshold)

        @torch.inference_mode()
        def run(name: str) -> None:
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                models[name](images)

    medians = _alternate(device, {name: partial(run, name) for name in models}, repeats)
    memory = {}
    for name, model in models.items():
        model.train()
        with torch.no_grad():
            p3 = model.features(torch.stack(images))[0]
        memory[name] = saved_bytes(model.head.forward_level, p3, 0) / 2**20
    return {
        "head": head, "iou_branch": iou_branch, "training": training, "device": str(device),
        "backbone": backbone, "fpn_channels": fpn_channels, "image_size": tuple(image_size),
        "batch": batch, "num_classes": num_classes, "amp": amp,
        "paa_ms": medians["paa"], "variant_ms": medians["variant"],
        "ratio": medians["variant"] / medians["paa"],
        "target": None if head == "gfl" else 1.15 if training else 1.10,
        "paa_p3_mb": memory["paa"], "variant_p3_mb": memory["variant"],
        "memory_ratio": memory["variant"] / memory["paa"],
    }  # fmt: skip
