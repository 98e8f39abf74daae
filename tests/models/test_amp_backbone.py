"""--amp_backbone_half: off, the backbone is bitwise the official one; on, the ResNet runs in the autocast dtype and
trains; YOLOS, timm backbones and --backbone_from_scratch (no frozen BatchNorm) refuse it before anything is built."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from engine import autocast
from flags import FlagError, validate_args
from models import build_model
from models.backbone import FrozenBatchNorm2d
from tests.conftest import tiny_args
from util.misc import nested_tensor_from_tensor_list

BF16 = {"rtol": 1.6e-2, "atol": 1e-2}  # bf16 keeps 8 bits of mantissa (relative step 2**-8 = 3.9e-3)


def _frozen_bn(n: int, **kwargs) -> FrozenBatchNorm2d:
    g = torch.Generator().manual_seed(0)
    bn = FrozenBatchNorm2d(n, **kwargs)
    bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
    bn.bias.copy_(torch.randn(n, generator=g))
    bn.running_mean.copy_(torch.randn(n, generator=g))
    bn.running_var.copy_(torch.rand(n, generator=g) + 0.1)
    return bn


def _images():
    g = torch.Generator().manual_seed(0)
    return nested_tensor_from_tensor_list([torch.randn(3, 64, 64, generator=g), torch.randn(3, 48, 56, generator=g)])


TARGETS = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[.5, .5, .3, .3], [.3, .3, .2, .2]])},
           {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]


@functools.lru_cache(maxsize=None)  # references shared by several tests (read only)
def _step(*flags: str):
    """One training step of the tiny Deformable-DETR (bf16 autocast with --amp): model, loss, gradients by name."""
    torch.manual_seed(0)
    args = tiny_args(*flags)
    model, criterion, _ = build_model(args)
    model.train()
    torch.manual_seed(1)
    with autocast(torch.device("cpu"), args.amp, args.amp_dtype):
        out = model(_images(), TARGETS)
        loss = criterion.total_loss(criterion(out, TARGETS))
    loss.backward()
    return model, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


# --amp_backbone_half --------------------------------------------------------------------------------------------
def test_frozen_bn_default_is_the_official_formula():
    bn = _frozen_bn(6)
    x = torch.randn(2, 6, 5, 7)
    scale = bn.weight[:, None, None] * (bn.running_var[:, None, None] + bn.eps).rsqrt()
    assert torch.equal(bn(x), x * scale + (bn.bias[:, None, None] - bn.running_mean[:, None, None] * scale))


def test_frozen_bn_keep_input_dtype_is_bitwise_the_default_in_fp32():
    x = torch.randn(2, 6, 5, 7)
    out = _frozen_bn(6, keep_input_dtype=True)(x)
    assert out.dtype == torch.float32 and torch.equal(out, _frozen_bn(6)(x))


def test_frozen_bn_under_autocast():
    conv = nn.Conv2d(3, 6, 3)
    x = torch.randn(2, 3, 9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)  # bf16
        official, half = _frozen_bn(6)(y), _frozen_bn(6, keep_input_dtype=True)(y)
    assert y.dtype == torch.bfloat16
    assert official.dtype == torch.float32  # the fp32 buffers promote the output (the official code's AMP runs)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), official, **BF16)


@pytest.mark.parametrize("flags", [(), ("-m", "detr"), ("-m", "dino", "--num_feature_levels", "5")],
                         ids=["deformable_detr", "detr", "dino_5scale"])
def test_backbone_body_runs_in_the_autocast_dtype(flags):
    model, _, _ = build_model(tiny_args(*flags, "--amp_backbone_half"))
    default, _, _ = build_model(tiny_args(*flags))
    default.load_state_dict(model.state_dict())
    dtypes: dict[str, torch.dtype] = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(model.backbone[0].body, name).register_forward_hook(
            lambda m, i, o, name=name: dtypes.__setitem__(name, o.dtype))
    images = _images()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (feats, pos), (ref_feats, ref_pos) = model.backbone(images), default.backbone(images)
    assert set(dtypes.values()) == {torch.bfloat16}
    for f, ref, p, ref_p in zip(feats, ref_feats, pos, ref_pos):
        assert f.tensors.dtype == ref.tensors.dtype == torch.float32  # handed on as the official code does
        assert p.dtype == torch.float32 and torch.equal(p, ref_p)  # positions and masks untouched
        assert torch.equal(f.mask, ref.mask)
        # random weights from scratch: relative to the map's scale (bf16 rounding accumulates over the stages)
        assert (f.tensors - ref.tensors).abs().max() <= 0.05 * ref.tensors.abs().max()


def test_amp_backbone_half_trains():
    _, loss, grads = _step("--amp", "--amp_backbone_half")
    _, ref_loss, ref_grads = _step("--amp")
    assert torch.isfinite(loss)
    assert grads.keys() == ref_grads.keys() and all(torch.isfinite(g).all() for g in grads.values())
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=0)


def test_amp_backbone_half_without_autocast_is_bitwise_the_default():
    _, loss, grads = _step("--amp_backbone_half")
    _, ref_loss, ref_grads = _step()
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)


# refusals --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (("-m", "yolos", "--amp_backbone_half"), "--amp_backbone_half: -m yolos is a plain ViT"),
    (("--amp_backbone_half", "--backbone", "swin_tiny"), "--amp_backbone_half acts on the frozen BatchNorm"),
    (("--amp_backbone_half", "--backbone_from_scratch"), "--backbone_from_scratch"),
])
def test_refused_before_anything_is_built(flags, message, monkeypatch):
    import models.backbone
    import models.yolos

    def built(*args, **kwargs):
        raise AssertionError("a model part was built before the flags were refused")
    for module, name in ((models.backbone, "build_backbone"), (models.yolos, "YolosViT")):
        monkeypatch.setattr(module, name, built)
    with pytest.raises(FlagError, match=message):
        validate_args(tiny_args(*flags))
    with pytest.raises(FlagError, match=message):
        build_model(tiny_args(*flags))


@pytest.mark.parametrize("flags", [("--amp_backbone_half",), ("-m", "detr", "--amp_backbone_half")])
def test_accepted(flags):
    validate_args(tiny_args(*flags))
