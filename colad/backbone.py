"""Backbones (C3-C5) and the FPN (P3-P7) shared by every detector of the book.

A backbone maps ``float[B, 3, H, W]`` to ``[C3, C4, C5]`` of size ``ceil(H / s) x ceil(W / s)``
at strides ``s`` = 8, 16, 32. ImageNet-initialised ones are fine-tuned as in mmdet (frozen stem
and first stages, BatchNorm in eval mode): see :meth:`Backbone.freeze`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

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
    pretrained: bool = False,
    frozen_stages: int = 1,
    norm_eval: bool = True,
    widths: tuple[int, ...] = (32, 64, 128, 256),
    width_mult: float = 1.0,
) -> Backbone:
    """Build a backbone returning ``[C3, C4, C5]`` at strides 8, 16, 32.

    Freezing applies only with ``pretrained=True``: ``frozen_stages=k`` freezes the stem and
    stages ``1..k`` (ResNet: conv1+bn1 and layer1..layerk, k <= 4; EfficientNet-B0: ``features[0]``
    and ``features[1..k]``, k <= 7; RepVGG-A0: stem and ``stages_0..stages_{k-1}``, k <= 4) and
    ``norm_eval`` keeps every BatchNorm in eval mode. With random initialisation nothing is frozen
    and BN statistics are trained (freezing random weights is never wanted), but ``frozen_stages``
    is still range-checked. "tiny" has GroupNorm (nothing for ``norm_eval`` to do) and no weights.

    Args:
        name: one of :data:`BACKBONES`.
        pretrained: load ImageNet weights (torchvision ``IMAGENET1K_V1``; timm's default for
            repvgg_a0); downloads them on first use.
        frozen_stages: stages frozen after the stem (0 = none); see above.
        norm_eval: keep BatchNorm in eval mode (with ``pretrained=True``).
        widths: channels of tiny's four stages (strides 4, 8, 16, 32); checked for every name.
        width_mult: scales the channels of every other backbone (same blocks and depths; 1 is
            the published network). Scaled networks have no pretrained weights: they are the
            CPU-sized stand-ins of the book's quick profile.

    Returns:
        A :class:`Backbone`, ``forward(float[B, 3, H, W]) -> [C3, C4, C5]`` with channels
        resnet18 128/256/512, resnet50/101 512/1024/2048, efficientnet_b0 40/112/320, repvgg_a0
        96/192/1280, tiny ``widths[1:]``.

    Raises:
        ValueError: unknown name, bad ``widths`` or ``frozen_stages``, or "tiny" pretrained.
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
    if pretrained and name == "tiny":
        raise ValueError('backbone "tiny" has no pretrained weights; use pretrained=False')
    if not (isinstance(width_mult, int | float) and 0 < width_mult <= 1):
        raise ValueError(f"width_mult must be in (0, 1], got {width_mult!r}")
    if width_mult != 1 and (pretrained or name == "tiny"):
        raise ValueError(
            f"width_mult={width_mult} needs a randomly initialised backbone other "
            'than "tiny" (pretrained weights exist only at width 1; tiny has widths)'
        )
    models = torchvision.models
    if name.startswith("resnet") and pretrained:
        weights = getattr(models, f"ResNet{name[6:]}_Weights").IMAGENET1K_V1
        model: Backbone = _ResNet(getattr(models, name)(weights=weights))
    elif name.startswith("resnet"):
        model = _ResNet(_scaled_resnet(name, width_mult))
    elif name == "efficientnet_b0" and pretrained:
        weights = models.EfficientNet_B0_Weights.IMAGENET1K_V1
        model = _EfficientNet(models.efficientnet_b0(weights=weights))
    elif name == "efficientnet_b0":
        model = _EfficientNet(_scaled_efficientnet(width_mult))
    elif name == "repvgg_a0":
        kwargs = dict(features_only=True, out_indices=(2, 3, 4))
        if pretrained or width_mult == 1:
            import timm  # slow to import, and only this backbone needs it

            model = _RepVGG(timm.create_model(name, pretrained=pretrained, **kwargs))
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
    pretrained: bool = False,
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
    kwargs = dict(pretrained=pretrained, frozen_stages=frozen_stages, norm_eval=norm_eval)
    net = build_backbone(backbone, widths=widths, width_mult=width_mult, **kwargs)
    return BackboneWithFPN(net, FPN(net.out_channels, fpn_channels, num_levels))
