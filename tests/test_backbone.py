"""Backbones (shapes, freezing, norm_eval), the FPN (wiring, P6/P7, init) and bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from colad.backbone import (
    _NUM_STAGES,
    BACKBONES,
    FPN,
    BackboneWithFPN,
    build_backbone,
    build_feature_extractor,
)

CHANNELS = {
    "resnet18": [128, 256, 512],
    "resnet50": [512, 1024, 2048],
    "resnet101": [512, 1024, 2048],
    "efficientnet_b0": [40, 112, 320],
    "repvgg_a0": [96, 192, 1280],
    "tiny": [64, 128, 256],
}


def ceil_sizes(h: int, w: int, strides) -> list[tuple[int, int]]:
    return [(math.ceil(h / s), math.ceil(w / s)) for s in strides]


# ----------------------------------------------------------------------------------------------
# Backbones


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_gives_c3_c5_with_declared_channels_and_sizes(name):
    torch.manual_seed(0)
    model = build_backbone(name).eval()
    assert model.out_channels == CHANNELS[name] and model.strides == (8, 16, 32)
    assert model.num_stages == _NUM_STAGES[name]
    with torch.no_grad():
        for h, w in [(64, 96), (70, 90)]:  # divisible by 32, and not
            feats = model(torch.randn(1, 3, h, w))
            assert [f.shape[1] for f in feats] == CHANNELS[name]
            assert [tuple(f.shape[-2:]) for f in feats] == ceil_sizes(h, w, (8, 16, 32))
            assert all(torch.isfinite(f).all() for f in feats)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "repvgg_a0", "tiny"])
def test_random_init_freezes_nothing(name):
    model = build_backbone(name, frozen_stages=2, norm_eval=True).train()
    assert model.frozen_stages == 0 and not model.norm_eval
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())


def test_tiny_is_groupnorm_resnet_with_custom_widths():
    model = build_backbone("tiny", widths=(12, 20, 36, 52))
    assert model.out_channels == [20, 36, 52]
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 1 + 3 * 4  # stem; per block bn1, bn2, shortcut
    for norm in norms:
        assert norm.num_channels % norm.num_groups == 0 and norm.num_groups == 4
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    blocks = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert all(isinstance(b, torchvision.models.resnet.BasicBlock) for b in blocks)
    assert all(b.stride == 2 and b.downsample is not None for b in blocks)
    feats = model(torch.randn(2, 3, 128, 160))
    assert [tuple(f.shape) for f in feats] == [(2, 20, 16, 20), (2, 36, 8, 10), (2, 52, 4, 5)]


# ----------------------------------------------------------------------------------------------
# Freezing and norm_eval


def bn_state(model) -> dict[str, torch.Tensor]:
    """The running means of every BatchNorm of ``model``, by module name."""
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    return {n: m.running_mean.clone() for n, m in bns}


FROZEN = {  # the modules frozen_stages=1 must freeze, and one that must stay trainable
    "resnet18": (["conv1", "bn1", "layer1"], "layer2"),
    "efficientnet_b0": (["features.0", "features.1"], "features.2"),
    "repvgg_a0": (["body.stem", "body.stages_0"], "body.stages_1"),
}


@pytest.mark.parametrize("name", list(FROZEN))
def test_freeze_one_stage_and_norm_eval(name):
    torch.manual_seed(0)
    model = build_backbone(name)
    model.freeze(1, norm_eval=True)
    model.eval().train()  # train() must re-apply both settings
    modules = dict(model.named_modules())
    frozen, trainable = FROZEN[name]
    for prefix in frozen:
        assert not any(p.requires_grad for p in modules[prefix].parameters()), prefix
        assert not any(m.training for m in modules[prefix].modules()), prefix
    assert all(p.requires_grad for p in modules[trainable].parameters())
    assert modules[trainable].training
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert bns and not any(bn.training for bn in bns)
    # BN affine parameters outside the frozen stages still train
    outside = [m for m in modules[trainable].modules() if isinstance(m, _BatchNorm)]
    assert outside and all(bn.weight.requires_grad and bn.bias.requires_grad for bn in outside)

    before = bn_state(model)
    feats = model(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(before[k], v) for k, v in bn_state(model).items())
    sum(f.sum() for f in feats).backward()
    assert all(p.grad is None for p in modules[frozen[-1]].parameters())
    assert all(bn.weight.grad is not None for bn in outside)


def test_freeze_depth_and_undo_on_resnet18():
    model = build_backbone("resnet18")
    model.freeze(3, norm_eval=False)
    model.train()
    for name in ["conv1", "bn1", "layer1", "layer2", "layer3"]:
        assert not any(p.requires_grad for p in getattr(model, name).parameters())
        assert not getattr(model, name).training
    assert all(p.requires_grad for p in model.layer4.parameters())
    assert model.layer4[0].bn1.training  # norm_eval=False: BN outside frozen stages trains
    before = bn_state(model)
    model(torch.randn(2, 3, 64, 64))
    after = bn_state(model)
    assert not torch.equal(before["layer4.0.bn1"], after["layer4.0.bn1"])
    assert torch.equal(before["layer3.0.bn1"], after["layer3.0.bn1"])  # frozen stage

    model.freeze(0, norm_eval=False)  # a second call replaces the first
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match=r"0\.\.4"):
        model.freeze(5)


@pytest.mark.parametrize(
    ("name", "factory", "weights"),
    [
        ("resnet18", "resnet18", torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
        ("resnet50", "resnet50", torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
        (
            "efficientnet_b0",
            "efficientnet_b0",
            torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1,
        ),
    ],
)
def test_pretrained_requests_imagenet_weights_and_freezes(monkeypatch, name, factory, weights):
    """weights="imagenet" without a download: the torchvision factory is replaced by a stub."""
    real, seen = getattr(torchvision.models, factory), []

    def stub(*, weights=None):
        seen.append(weights)
        return real(weights=None)

    monkeypatch.setattr(torchvision.models, factory, stub)
    model = build_backbone(name, weights="imagenet", frozen_stages=1).train()
    assert seen == [weights]
    assert model.frozen_stages == 1 and model.norm_eval
    assert not any(m.training for m in model.modules() if isinstance(m, _BatchNorm))
    stem = next(iter(model.stages()[0][0].parameters()))
    assert not stem.requires_grad


def test_pretrained_repvgg_asks_timm_for_weights(monkeypatch):
    import timm  # slow to import: only here

    real, seen = timm.create_model, []

    def stub(name, *, pretrained, **kwargs):
        seen.append((name, pretrained, kwargs))
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", stub)
    model = build_backbone("repvgg_a0", weights="imagenet", frozen_stages=2, norm_eval=False)
    assert seen == [("repvgg_a0", True, {"features_only": True, "out_indices": (2, 3, 4)})]
    assert not any(p.requires_grad for p in model.body.stages_1.parameters())
    assert all(p.requires_grad for p in model.body.stages_2.parameters())
    assert model.train().body.stages_2.training


@pytest.fixture
def no_network(monkeypatch):
    """The network is unreachable: every name lookup and connection fails as it does offline."""
    import socket

    def unreachable(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setattr(socket, "create_connection", unreachable)


def test_imagenet_weights_offline_say_where_to_place_the_file(no_network, tmp_path, monkeypatch):
    from colad.backbone import WeightsUnavailable

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsUnavailable) as caught:
        build_backbone("resnet18", weights="imagenet")
    message = str(caught.value)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in message and "TORCH_HOME" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "--weights" in message and "unreachable" in message
    # ... and once the file is where the message says, the same call works offline
    expected.parent.mkdir(parents=True, exist_ok=True)
    placed = torchvision.models.resnet18(weights=None)
    torch.save(placed.state_dict(), expected)
    model = build_backbone("resnet18", weights="imagenet")
    assert torch.equal(model.conv1.weight, placed.conv1.weight)


def test_the_command_line_reports_offline_weights_without_a_traceback(
    no_network, tmp_path, monkeypatch, capsys
):
    from colad.__main__ import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("COLAD_DATA", str(tmp_path / "data"))
    status = main(["train", "paa", "--profile", "smoke", "--backbone", "resnet18",
                   "--weights", "imagenet", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2
    last = err.strip().splitlines()[-1]  # after the generated data's progress bar
    assert last.startswith("error: could not get the ImageNet weights of resnet18")
    assert "Traceback" not in err and "hub/checkpoints" in err


def test_weights_from_a_file_are_loaded_strictly(tmp_path):
    from colad.backbone import WeightsUnavailable

    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": source.state_dict()}, path)  # a training script's wrapper
    model = build_backbone("resnet18", weights=str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    # a classifier without its last layer is fine; another network's weights are not
    head_less = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    torch.save(head_less, path)
    build_backbone("resnet18", weights=str(path))
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(
        WeightsUnavailable, match=r"do not fit resnet18: wrong shape: layer1\.0\.conv1"
    ):
        build_backbone("resnet18", weights=str(path))
    with pytest.raises(WeightsUnavailable, match="no such file"):
        build_backbone("resnet18", weights=str(tmp_path / "absent.pth"))
    path.write_text("not a checkpoint")
    with pytest.raises(WeightsUnavailable, match="cannot be read"):
        build_backbone("resnet18", weights=str(path))


def test_configs_saved_with_pretrained_still_load():
    from colad.config import ModelConfig

    assert ModelConfig.from_dict({"pretrained": True}).weights == "imagenet"
    assert ModelConfig.from_dict({"pretrained": False}).weights == "none"
    with pytest.raises(ValueError, match="ModelConfig.weights"):
        ModelConfig(weights="")


# ----------------------------------------------------------------------------------------------
# FPN


def fake_features(in_channels, sizes, batch=1):
    torch.manual_seed(0)
    return [torch.randn(batch, c, h, w) for c, (h, w) in zip(in_channels, sizes, strict=True)]


@pytest.mark.parametrize("num_levels", [3, 4, 5])
def test_fpn_levels_strides_and_sizes(num_levels):
    fpn = FPN([8, 16, 32], 24, num_levels=num_levels)
    strides = (8, 16, 32, 64, 128)[:num_levels]
    assert fpn.strides == strides and fpn.out_channels == 24
    outs = fpn(fake_features([8, 16, 32], ceil_sizes(70, 90, (8, 16, 32)), batch=2))
    assert len(outs) == num_levels
    assert [tuple(p.shape[:2]) for p in outs] == [(2, 24)] * num_levels
    assert [tuple(p.shape[-2:]) for p in outs] == ceil_sizes(70, 90, strides)


def test_fpn_top_down_uses_nearest_upsampling_to_the_finer_size():
    fpn = FPN([8, 16, 32], 24, num_levels=3)
    c3, c4, c5 = fake_features([8, 16, 32], [(9, 13), (5, 7), (3, 4)])  # odd: not a 2x upsample
    lateral, output = fpn.body.inner_blocks, fpn.body.layer_blocks
    assert [m[0].kernel_size for m in lateral] == [(1, 1)] * 3
    assert [m[0].kernel_size for m in output] == [(3, 3)] * 3
    top5 = lateral[2](c5)
    top4 = lateral[1](c4) + F.interpolate(top5, size=(5, 7), mode="nearest")
    top3 = lateral[0](c3) + F.interpolate(top4, size=(9, 13), mode="nearest")
    p3, p4, p5 = fpn([c3, c4, c5])
    torch.testing.assert_close(p5, output[2](top5))
    torch.testing.assert_close(p4, output[1](top4))
    torch.testing.assert_close(p3, output[0](top3))


def test_fpn_p6_from_p5_output_and_p7_from_p6_without_relu():
    fpn = FPN([8, 16, 32], 24, num_levels=5)
    p3, p4, p5, p6, p7 = fpn(fake_features([8, 16, 32], [(16, 16), (8, 8), (4, 4)]))
    conv6, conv7 = fpn.body.extra_blocks.convs
    assert conv6.stride == conv7.stride == (2, 2) and conv6.kernel_size == (3, 3)
    torch.testing.assert_close(p6, conv6(p5))
    torch.testing.assert_close(p7, conv7(p6))
    assert p6.min() < 0  # so a ReLU before P7 would have changed it:
    assert not torch.allclose(p7, conv7(F.relu(p6)))


def test_fpn_convs_are_xavier_uniform_with_zero_bias_and_no_norm():
    torch.manual_seed(0)
    fpn = FPN([128, 256, 512], 256, num_levels=5)
    convs = [m for m in fpn.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 + 3 + 2
    assert not any(isinstance(m, _BatchNorm | nn.GroupNorm) for m in fpn.modules())
    for conv in convs:
        assert conv.bias is not None and torch.equal(conv.bias, torch.zeros_like(conv.bias))
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert conv.weight.abs().max() <= bound
        # kaiming_uniform(a=1), torchvision's default, has std 1/sqrt(fan_in): 0.088 vs 0.072
        # for the 128 -> 256 lateral
        assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)


def test_feature_extractor_tiny_end_to_end():
    torch.manual_seed(0)
    model = build_feature_extractor(backbone="tiny", fpn_channels=32, num_levels=5)
    assert isinstance(model, BackboneWithFPN)
    assert model.out_channels == 32 and model.strides == (8, 16, 32, 64, 128)
    outs = model(torch.randn(2, 3, 160, 192))
    assert [tuple(p.shape) for p in outs] == [
        (2, 32, 20, 24),
        (2, 32, 10, 12),
        (2, 32, 5, 6),
        (2, 32, 3, 3),
        (2, 32, 2, 2),
    ]
    sum(p.sum() for p in outs).backward()
    assert model.backbone.stem[0].weight.grad is not None


# ----------------------------------------------------------------------------------------------
# Bad arguments


def test_unknown_backbone_lists_the_names():
    with pytest.raises(ValueError, match="resnet18.*repvgg_a0.*tiny"):
        build_backbone("resnet34")


@pytest.mark.parametrize(
    "widths", [(32, 64, 128), (32, 64, 128, 256, 512), (32, 0, 128, 256), (32.0, 64, 128, 256)]
)
def test_bad_widths(widths):
    with pytest.raises(ValueError, match="widths must be 4 positive ints"):
        build_backbone("tiny", widths=widths)


@pytest.mark.parametrize(
    ("name", "frozen_stages"),
    [("resnet18", 5), ("resnet50", -1), ("efficientnet_b0", 8), ("tiny", True), ("tiny", 5)],
)
def test_bad_frozen_stages(name, frozen_stages):
    with pytest.raises(ValueError, match=f"frozen_stages must be in 0..{_NUM_STAGES[name]}"):
        build_backbone(name, frozen_stages=frozen_stages)


def test_tiny_has_no_pretrained_weights():
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_backbone("tiny", weights="imagenet")


def test_bad_fpn_arguments():
    for num_levels in (2, 6):
        with pytest.raises(ValueError, match="num_levels must be 3, 4 or 5"):
            FPN([8, 16, 32], 24, num_levels=num_levels)
    with pytest.raises(ValueError, match="in_channels must be 3 positive ints"):
        FPN([8, 16, 32, 64], 24)
    with pytest.raises(ValueError, match="out_channels must be a positive int"):
        FPN([8, 16, 32], 0)
    with pytest.raises(ValueError, match=r"expects \[C3, C4, C5\], got 2"):
        FPN([8, 16, 32], 24)(fake_features([8, 16], [(4, 4), (2, 2)]))
    with pytest.raises(ValueError, match=r"backbone gives \[64, 128, 256\] channels"):
        BackboneWithFPN(build_backbone("tiny"), FPN([8, 16, 32], 24))
