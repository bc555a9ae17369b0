"""Backbones (C3-C5) and the FPN (P3-P7) shared by every detector of the book.

A backbone maps ``float[B, 3, H, W]`` to ``[C3, C4, C5]`` of size ``ceil(H / s) x ceil(W / s)``
at strides ``s`` = 8, 16, 32. ImageNet-initialised ones are fine-tuned as in mmdet (frozen stem
and first stages, BatchNorm in eval mode): see :meth:`Backbone.freeze`.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.resnet import BasicBlock, conv1x1, conv3x3
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

__all__ = [
    "BACKBONES",
    "Backbone",
    "build_backbone",
    "FPN",
    "BackboneWithFPN",
    "build_feature_extractor",
]

#: Names accepted by :func:`build_backbone`.
BACKBONES = ("resnet18", "resnet50", "resnet101", "efficientnet_b0", "repvgg_a0", "tiny")
#: ``weights`` besides a file path: random initialisation, or ImageNet's (downloaded once).
WEIGHT_SOURCES = ("none", "imagenet")
# torchvision's ImageNet weights of each classifier (the ones the paper's backbones start from).
_IMAGENET = {
    "resnet18": ("ResNet18_Weights", "IMAGENET1K_V1"),
    "resnet50": ("ResNet50_Weights", "IMAGENET1K_V1"),
    "resnet101": ("ResNet101_Weights", "IMAGENET1K_V1"),
    "efficientnet_b0": ("EfficientNet_B0_Weights", "IMAGENET1K_V1"),
}


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be downloaded or read; the message says where they are
    looked for and how to provide them offline."""


def check_weights(weights: str) -> str:
    """``weights`` if it is ``"none"``, ``"imagenet"`` or a plausible file path, else ValueError.
    (Whether the file exists is checked when the backbone is built: it may live only on the
    machine that trains.)"""
    if not isinstance(weights, str) or not weights.strip():
        raise ValueError(f"backbone weights must be 'none', 'imagenet' or a file path; got "
                         f"{weights!r}")  # fmt: skip
    return weights


def _read_state_dict(path: Path, name: str) -> dict:
    """A classifier's state dict from a file: a plain state dict, or one under a ``state_dict``
    or ``model`` key (how training scripts often save them); safetensors files too."""
    if not path.is_file():
        raise WeightsUnavailable(
            f"backbone weights {str(path)!r} for {name}: no such file (--weights takes 'imagenet', "
            "'none' or the path of a state-dict file)"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises several types for a file it cannot read
        raise WeightsUnavailable(f"backbone weights {str(path)!r}: cannot be read ({e})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailable(f"backbone weights {str(path)!r}: not a state dict of tensors")
    return state


def _load_file(model: nn.Module, path: Path, name: str) -> None:
    """Load a classifier's weights from ``path`` into ``model``, strictly: every tensor of the
    network must be in the file with its shape."""
    state = _read_state_dict(path, name)
    own = model.state_dict()
    # The classifier's last layer is dropped by the backbone: it may be absent or of any size.
    needed = [k for k in own if not k.startswith(("fc.", "classifier.", "head."))]
    missing = [k for k in needed if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} (needs {tuple(own[k].shape)})"
             for k in needed if k in state and state[k].shape != own[k].shape]  # fmt: skip
    if missing or wrong:
        problems = []
        if missing:
            more = " ..." if len(missing) > 5 else ""
            problems.append(f"{len(missing)} missing ({', '.join(missing[:5])}{more})")
        if wrong:
            problems.append("wrong shape: " + ", ".join(wrong[:3]))
        raise WeightsUnavailable(
            f"backbone weights {str(path)!r} do not fit {name}: " + "; ".join(problems)
        )
    model.load_state_dict({k: state[k] for k in needed}, strict=False)


def _unavailable(name: str, url: str, cache: Path, error: Exception, library: str) -> str:
    home = os.environ.get("TORCH_HOME")
    where = f"TORCH_HOME={home}" if home else "TORCH_HOME is not set: the default ~/.cache/torch"
    return (
        f"could not get the ImageNet weights of {name} ({type(error).__name__}: {error}). "
        f"{library} downloads them once from {url} and keeps them as {cache} ({where}; the "
        "folder is $TORCH_HOME/hub/checkpoints). On a machine without internet, download that "
        "file elsewhere and copy it to that path (or set TORCH_HOME to a folder whose "
        f"hub/checkpoints holds it), or pass --weights PATH to the file, or --weights none to "
        "start from random weights."
    )


def _torchvision_imagenet(name: str) -> nn.Module:
    enum_name, member = _IMAGENET[name]
    weights = getattr(getattr(torchvision.models, enum_name), member)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return getattr(torchvision.models, name)(weights=weights)
    except (OSError, RuntimeError) as e:  # no network (URLError), a truncated or corrupt file
        raise WeightsUnavailable(_unavailable(name, weights.url, cache, e, "torchvision")) from e


def _timm_repvgg(weights: str, **kwargs) -> nn.Module:
    import timm  # slow to import, and only this backbone needs it

    if weights == "none":
        return timm.create_model("repvgg_a0", pretrained=False, **kwargs)
    if weights != "imagenet":
        path = Path(weights).expanduser()
        _read_state_dict(path, "repvgg_a0")  # a clear error for a missing or unreadable file
        return timm.create_model("repvgg_a0", pretrained=True,
                                 pretrained_cfg_overlay={"file": str(path)}, **kwargs)  # fmt: skip
    try:
        return timm.create_model("repvgg_a0", pretrained=True, **kwargs)
    except Exception as e:  # huggingface_hub's and urllib's errors have no common base
        from huggingface_hub import constants

        raise WeightsUnavailable(
            f"could not get the ImageNet weights of repvgg_a0 ({type(e).__name__}: {e}). timm "
            "downloads them once from the Hugging Face Hub (timm/repvgg_a0.rvgg_in1k) into "
            f"{constants.HF_HUB_CACHE} (set by HF_HOME or HF_HUB_CACHE). On a machine without "
            "internet, copy that cache folder from a machine that has the model and set "
            "HF_HUB_OFFLINE=1, or download model.safetensors from "
            "https://huggingface.co/timm/repvgg_a0.rvgg_in1k and pass --weights PATH, or "
            "--weights none to start from random weights."
        ) from e


# The largest ``frozen_stages`` of each backbone (its stages after the stem).
_NUM_STAGES = dict(resnet18=4, resnet50=4, resnet101=4, efficientnet_b0=7, repvgg_a0=4, tiny=4)


class Backbone(nn.Module):
    """Base class: ``forward(x: float[B, 3, H, W]) -> [C3, C4, C5]`` plus freezing.

    Subclasses set ``out_channels`` (3 ints) and implement :meth:`stages` (stem first).

    Attributes:
        out_channels: channels of C3, C4, C5.
        strides: ``(8, 16, 32)``.
        frozen_stages: stages frozen by :meth:`freeze` (0 = none).
        norm_eval: whether every BatchNorm is kept in eval mode.
    """

    strides = (8, 16, 32)
    out_channels: list[int]
    frozen_stages = 0
    norm_eval = False

    def stages(self) -> list[list[nn.Module]]:
        """The modules of the stem (index 0) and of each stage 1..n, in forward order."""
        raise NotImplementedError

    @property
    def num_stages(self) -> int:
        """The largest valid ``frozen_stages`` (stages after the stem)."""
        return len(self.stages()) - 1

    def freeze(self, frozen_stages: int, norm_eval: bool = True) -> None:
        """Freeze the stem and stages ``1..frozen_stages``; optionally keep all BN in eval mode.

        Frozen parameters get ``requires_grad=False`` (all others ``True``: a second call replaces
        the first) and frozen modules stay in eval mode; ``frozen_stages=0`` freezes nothing.
        Both settings are re-applied by :meth:`train`.

        Raises:
            ValueError: ``frozen_stages`` is not an int in ``0..num_stages``.
        """
        if type(frozen_stages) is not int or not 0 <= frozen_stages <= self.num_stages:
            raise ValueError(
                f"frozen_stages must be in 0..{self.num_stages}, got {frozen_stages!r}"
            )
        self.frozen_stages, self.norm_eval = frozen_stages, bool(norm_eval)
        self.requires_grad_(True)
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.train(self.training)

    def _frozen_modules(self) -> list[nn.Module]:
        groups = self.stages()[: self.frozen_stages + 1] if self.frozen_stages > 0 else []
        return [module for group in groups for module in group]

    def train(self, mode: bool = True) -> Backbone:
        """Set train/eval mode, keeping frozen stages (and, with ``norm_eval``, BN) in eval."""
        super().train(mode)
        if mode:
            bns = [m for m in self.modules() if isinstance(m, _BatchNorm)] if self.norm_eval else []
            for module in self._frozen_modules() + bns:
                module.eval()
        return self


def _out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def _scaled_resnet(name: str, width_mult: float) -> torchvision.models.ResNet:
    """torchvision's ResNet ``name`` (random weights) with every stage's width times
    ``width_mult``: the same blocks and depths, ``round(64 * width_mult)`` stem channels."""
    net = getattr(torchvision.models, name)(weights=None)
    if width_mult == 1:
        return net
    block = type(net.layer1[0])
    depths = [len(getattr(net, f"layer{k}")) for k in (1, 2, 3, 4)]
    base = max(8, round(64 * width_mult))
    net.inplanes = base
    net.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(base)
    for k, depth in enumerate(depths):
        layer = net._make_layer(block, base * 2**k, depth, stride=1 if k == 0 else 2)
        setattr(net, f"layer{k + 1}", layer)
    for module in net.modules():  # torchvision's initialisation
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return net


def _scaled_efficientnet(width_mult: float) -> torchvision.models.EfficientNet:
    """torchvision's EfficientNet-B0 (random weights) with its widths times ``width_mult``
    (rounded to multiples of 8, as EfficientNet's own width scaling does)."""
    from torchvision.models.efficientnet import _efficientnet_conf

    setting, last_channel = _efficientnet_conf("efficientnet_b0", width_mult=width_mult,
                                               depth_mult=1.0)  # fmt: skip
    return torchvision.models.EfficientNet(setting, dropout=0.2, last_channel=last_channel)


def _scaled_repvgg(width_mult: float, **kwargs) -> nn.Module:
    """timm's RepVGG-A0 (random weights) with its stem and stage widths times ``width_mult``."""
    import dataclasses

    from timm.models import build_model_with_cfg
    from timm.models.byobnet import ByobNet, model_cfgs

    cfg = model_cfgs["repvgg_a0"]
    cfg = dataclasses.replace(cfg, width_factor=cfg.width_factor * width_mult,
                              stem_chs=max(8, round(cfg.stem_chs * width_mult)))  # fmt: skip
    return build_model_with_cfg(ByobNet, "repvgg_a0", False, model_cfg=cfg,
                                feature_cfg=dict(flatten_sequential=True), **kwargs)  # fmt: skip


class _ResNet(Backbone):
    """A torchvision ResNet without avgpool/fc; module names (and state-dict keys) kept."""

    def __init__(self, net: torchvision.models.ResNet) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))
        self.out_channels = [_out_channels(getattr(net, f"layer{k}")) for k in (2, 3, 4)]

    def stages(self) -> list[list[nn.Module]]:
        return [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]

    def forward(self, x: Tensor) -> list[Tensor]:
        c3 = self.layer2(self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x))))))
        c4 = self.layer3(c3)
        return [c3, c4, self.layer4(c4)]


class _EfficientNet(Backbone):
    """torchvision EfficientNet-B0 ``features[0..7]``: C3 = [3], C4 = [5], C5 = [7]."""

    def __init__(self, net: torchvision.models.EfficientNet) -> None:
        super().__init__()
        self.features = nn.Sequential(*list(net.features)[:8])  # features[8]: 1x1 conv to 1280
        self.out_channels = [_last_channels(self.features[k]) for k in (3, 5, 7)]

    def stages(self) -> list[list[nn.Module]]:
        return [[block] for block in self.features]

    def forward(self, x: Tensor) -> list[Tensor]:
        c3 = self.features[:4](x)
        c4 = self.features[4:6](c3)
        return [c3, c4, self.features[6:](c4)]


class _RepVGG(Backbone):
    """timm ``repvgg_a0`` with ``features_only=True, out_indices=(2, 3, 4)`` (strides 8-32)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.body = net
        self.out_channels = list(net.feature_info.channels())

    def stages(self) -> list[list[nn.Module]]:
        names = ("stem", "stages_0", "stages_1", "stages_2", "stages_3")
        return [[getattr(self.body, name)] for name in names]

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.body(x))


def _last_channels(stage: nn.Module) -> int:
    return [m for m in stage.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with ``gcd(8, channels)`` groups (8 for the usual widths)."""
    return nn.GroupNorm(math.gcd(8, channels), channels)


class _Tiny(Backbone):
    """GroupNorm ResNet-style net for small CPU images, with no pretrained weights.

    Stem conv3x3/2 -> GN -> ReLU (``widths[0]`` channels, stride 2), then four stages of one
    BasicBlock each, every one downsampling (stride 2, 1x1 conv + GN shortcut) to strides 4, 8,
    16, 32; C3-C5 are the last three stages. Convs Kaiming-normal, GN weight 1 and bias 0.
    """

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv3x3(3, widths[0], 2), _group_norm(widths[0]), nn.ReLU(True))
        layers, inplanes = [], widths[0]
        for width in widths:
            shortcut = nn.Sequential(conv1x1(inplanes, width, 2), _group_norm(width))
            layers.append(BasicBlock(inplanes, width, 2, shortcut, norm_layer=_group_norm))
            inplanes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_channels = list(widths[1:])
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def stages(self) -> list[list[nn.Module]]:
        return [[self.stem], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]

    def forward(self, x: Tensor) -> list[Tensor]:
        c3 = self.layer2(self.layer1(self.stem(x)))
        c4 = self.layer3(c3)
        return [c3, c4, self.layer4(c4)]


def build_backbone(
    name: str,
    *,
    weights: str = "none",
    frozen_stages: int = 1,
    norm_eval: bool = True,
    widths: tuple[int, ...] = (32, 64, 128, 256),
    width_mult: float = 1.0,
) -> Backbone:
    """Build a backbone returning ``[C3, C4, C5]`` at strides 8, 16, 32.

    Freezing applies only to pretrained weights: ``frozen_stages=k`` freezes the stem and
    stages ``1..k`` (ResNet: conv1+bn1 and layer1..layerk, k <= 4; EfficientNet-B0: ``features[0]``
    and ``features[1..k]``, k <= 7; RepVGG-A0: stem and ``stages_0..stages_{k-1}``, k <= 4) and
    ``norm_eval`` keeps every BatchNorm in eval mode. With random initialisation nothing is frozen
    and BN statistics are trained (freezing random weights is never wanted), but ``frozen_stages``
    is still range-checked. "tiny" has GroupNorm (nothing for ``norm_eval`` to do) and no weights.

    Args:
        name: one of :data:`BACKBONES`.
        weights: ``"none"`` (random initialisation), ``"imagenet"`` (torchvision's
            ``IMAGENET1K_V1``, timm's default for repvgg_a0; downloaded on first use into
            ``$TORCH_HOME`` or the Hugging Face cache) or the path of a classifier's state-dict
            file (a ``.pth``/``.pt``, or ``.safetensors``; the classifier layer may be missing).
        frozen_stages: stages frozen after the stem (0 = none); see above.
        norm_eval: keep BatchNorm in eval mode (with pretrained weights).
        widths: channels of tiny's four stages (strides 4, 8, 16, 32); checked for every name.
        width_mult: scales the channels of every other backbone (same blocks and depths; 1 is
            the published network). Scaled networks have no pretrained weights: they are the
            CPU-sized stand-ins of the book's quick profile.

    Returns:
        A :class:`Backbone`, ``forward(float[B, 3, H, W]) -> [C3, C4, C5]`` with channels
        resnet18 128/256/512, resnet50/101 512/1024/2048, efficientnet_b0 40/112/320, repvgg_a0
        96/192/1280, tiny ``widths[1:]``.

    Raises:
        ValueError: unknown name, bad ``widths``, ``frozen_stages`` or ``weights``, or "tiny"
            pretrained.
        WeightsUnavailable: the weights cannot be downloaded (offline: the message says where
            to place the file) or the file is missing, unreadable or does not fit.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    if not (isinstance(widths, Sequence) and len(widths) == 4) or not all(
        type(w) is int and w > 0 for w in widths
    ):
        raise ValueError(f"widths must be 4 positive ints, got {widths!r}")
    num = _NUM_STAGES[name]
    if type(frozen_stages) is not int or not 0 <= frozen_stages <= num:
        raise ValueError(f"frozen_stages must be in 0..{num} for {name}, got {frozen_stages!r}")
    pretrained = check_weights(weights) != "none"
    if pretrained and name == "tiny":
        raise ValueError('backbone "tiny" has no pretrained weights; use weights="none"')
    if not (isinstance(width_mult, int | float) and 0 < width_mult <= 1):
        raise ValueError(f"width_mult must be in (0, 1], got {width_mult!r}")
    if width_mult != 1 and (pretrained or name == "tiny"):
        raise ValueError(
            f"width_mult={width_mult} needs a randomly initialised backbone other "
            'than "tiny" (pretrained weights exist only at width 1; tiny has widths)'
        )
    models = torchvision.models
    classifier = None
    if name in _IMAGENET and weights == "imagenet":
        classifier = _torchvision_imagenet(name)
    elif name in _IMAGENET and pretrained:
        classifier = getattr(models, name)(weights=None)
        _load_file(classifier, Path(weights).expanduser(), name)
    if name.startswith("resnet"):
        model: Backbone = _ResNet(classifier or _scaled_resnet(name, width_mult))
    elif name == "efficientnet_b0":
        model = _EfficientNet(classifier or _scaled_efficientnet(width_mult))
    elif name == "repvgg_a0":
        kwargs = dict(features_only=True, out_indices=(2, 3, 4))
        if pretrained or width_mult == 1:
            model = _RepVGG(_timm_repvgg(weights, **kwargs))
        else:
            model = _RepVGG(_scaled_repvgg(width_mult, **kwargs))
    else:
        model = _Tiny(widths)
    if pretrained:
        model.freeze(frozen_stages, norm_eval)
    return model


class _LastLevelP6P7(ExtraFPNBlock):
    """P6 = conv3x3/2(P5 output), P7 = conv3x3/2(P6) with no ReLU in between."""

    def __init__(self, channels: int, num_extra: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(num_extra)
        )

    def forward(
        self, results: list[Tensor], x: list[Tensor], names: list[str]
    ) -> tuple[list[Tensor], list[str]]:
        last = results[-1]
        for i, conv in enumerate(self.convs):
            last = conv(last)
            results.append(last)
            names.append(f"p{6 + i}")
        return results, names


class FPN(nn.Module):
    """Feature pyramid: ``[C3, C4, C5] -> [P3, ..., P(2 + num_levels)]``.

    1x1 laterals, nearest upsampling of the coarser level to the finer lateral's size then add,
    3x3 output convs (torchvision's ``FeaturePyramidNetwork``); P6 and P7 by stride-2 3x3 convs
    on the P5 output and on P6 (no ReLU). No normalisation; every conv Xavier-uniform, bias 0.

    Args:
        in_channels: channels of C3, C4, C5.
        out_channels: channels of every P level.
        num_levels: 3 (P3-P5), 4 (P3-P6) or 5 (P3-P7).

    Attributes:
        strides: ``8 * 2**i`` for each level.
        out_channels: channels of every level.

    Raises:
        ValueError: not 3 positive ``in_channels``, ``out_channels`` not positive, or
            ``num_levels`` not in 3..5.
    """

    def __init__(self, in_channels: list[int], out_channels: int, num_levels: int = 5) -> None:
        super().__init__()
        if len(in_channels) != 3 or not all(type(c) is int and c > 0 for c in in_channels):
            raise ValueError(f"in_channels must be 3 positive ints (C3-C5), got {in_channels!r}")
        if type(out_channels) is not int or out_channels <= 0:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        if num_levels not in (3, 4, 5):
            raise ValueError(f"num_levels must be 3, 4 or 5 (P3-P5 to P3-P7), got {num_levels!r}")
        extra = _LastLevelP6P7(out_channels, num_levels - 3) if num_levels > 3 else None
        self.body = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=extra)
        self.in_channels, self.out_channels = list(in_channels), out_channels
        self.strides = tuple(8 * 2**i for i in range(num_levels))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Map ``[C3, C4, C5]`` (``float[B, C_i, H_i, W_i]``) to ``[P3, ...]``, finest first.

        Each is ``float[B, out_channels, h, w]``: P3-P5 keep the sizes of C3-C5, P6 and P7 halve
        the previous size (rounding up).

        Raises:
            ValueError: not exactly 3 feature maps.
        """
        if len(features) != 3:
            raise ValueError(f"FPN expects [C3, C4, C5], got {len(features)} feature maps")
        named = OrderedDict((f"c{i + 3}", f) for i, f in enumerate(features))
        return list(self.body(named).values())


class BackboneWithFPN(nn.Module):
    """A backbone followed by an :class:`FPN`: ``float[B, 3, H, W] -> [P3, ..., P7]``.

    Raises:
        ValueError: the backbone's ``out_channels`` differ from the FPN's ``in_channels``.
    """

    def __init__(self, backbone: nn.Module, fpn: FPN) -> None:
        super().__init__()
        if (channels := list(backbone.out_channels)) != fpn.in_channels:
            raise ValueError(f"backbone gives {channels} channels, FPN expects {fpn.in_channels}")
        self.backbone, self.fpn = backbone, fpn
        self.out_channels, self.strides = fpn.out_channels, fpn.strides

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.fpn(self.backbone(x))


def build_feature_extractor(
    *,
    backbone: str,
    weights: str = "none",
    frozen_stages: int = 1,
    norm_eval: bool = True,
    widths: tuple[int, ...] = (32, 64, 128, 256),
    width_mult: float = 1.0,
    fpn_channels: int = 256,
    num_levels: int = 5,
) -> BackboneWithFPN:
    """Build :func:`build_backbone` ``(backbone, ...)`` followed by an :class:`FPN`.

    Raises:
        ValueError: as :func:`build_backbone` and :class:`FPN`.
    """
    kwargs = dict(weights=weights, frozen_stages=frozen_stages, norm_eval=norm_eval)
    net = build_backbone(backbone, widths=widths, width_mult=width_mult, **kwargs)
    return BackboneWithFPN(net, FPN(net.out_channels, fpn_channels, num_levels))
