"""--amp_backbone_half and --channels_last: off, the backbone is bitwise the official one; on, it trains, its state
dict is the default's, and YOLOS (no CNN body) refuses them before anything is built."""
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


# --channels_last ------------------------------------------------------------------------------------------------
def test_channels_last_backbone_matches_the_default():
    model, _, _ = build_model(tiny_args("--channels_last"))
    default, _, _ = build_model(tiny_args())
    assert list(model.state_dict()) == list(default.state_dict())  # names unchanged
    default.load_state_dict(model.state_dict(), strict=True)
    body = model.backbone[0].body
    assert body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not default.backbone[0].body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    images = _images()
    with torch.no_grad():
        (feats, pos), (ref_feats, ref_pos) = model.backbone(images), default.backbone(images)
    for f, ref, p, ref_p in zip(feats, ref_feats, pos, ref_pos):
        assert f.tensors.is_contiguous()  # handed on in the default (NCHW) layout
        torch.testing.assert_close(f.tensors, ref.tensors, rtol=1e-4, atol=1e-5)
        assert torch.equal(f.mask, ref.mask) and torch.equal(p, ref_p)


@pytest.mark.parametrize("amp", [(), ("--amp", "--amp_backbone_half")], ids=["fp32", "bf16_backbone_half"])
def test_channels_last_trains(amp):
    model, loss, grads = _step("--channels_last", *amp)
    _, ref_loss, ref_grads = _step(*amp)
    assert torch.isfinite(loss) and grads.keys() == ref_grads.keys()
    torch.testing.assert_close(loss, ref_loss, **({"rtol": 1e-5, "atol": 0} if not amp else BF16))
    w = model.backbone[0].body.layer4[0].conv1.weight
    assert w.grad.is_contiguous(memory_format=torch.channels_last)  # the gradient follows the weight's layout


def test_channels_last_checkpoint_loads_strictly_without_the_flag(tmp_path):
    model, _, _ = build_model(tiny_args("--channels_last"))
    torch.save({"model": model.state_dict()}, tmp_path / "checkpoint.pth")
    plain, _, _ = build_model(tiny_args())
    plain.load_state_dict(torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"], strict=True)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))
    assert plain.backbone[0].body.conv1.weight.is_contiguous()  # loading keeps the model's own layout
    back, _, _ = build_model(tiny_args("--channels_last"))  # and the other way round
    back.load_state_dict(plain.state_dict(), strict=True)
    assert back.backbone[0].body.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_compiles():
    """--compile traces the channels-last body (AOT autograd: strides are part of the trace); the body alone is run,
    so only it is traced (compilation is lazy)."""
    import torch._dynamo
    torch._dynamo.reset()
    compiled, _, _ = build_model(tiny_args("--channels_last", "--compile", "--compile_backend", "aot_eager"))
    model, _, _ = build_model(tiny_args("--channels_last"))
    model.load_state_dict(compiled.state_dict(), strict=True)
    images = _images()
    try:
        outs = [[f.tensors for f in m.backbone[0](images)] for m in (compiled, model)]
        for feats in outs:
            sum(f.square().mean() for f in feats).backward()
    finally:
        torch._dynamo.reset()
    for f, ref in zip(*outs):
        assert f.is_contiguous()
        torch.testing.assert_close(f, ref, rtol=1e-4, atol=1e-5)
    for (name, p), ref in zip(compiled.backbone.named_parameters(), model.backbone.parameters()):
        assert (p.grad is None) == (ref.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref.grad, rtol=1e-4, atol=1e-6)


def test_run_with_both_flags_resumes_and_evaluates_without_them(tmp_path):
    import main as main_module
    from flags import finalize_args, get_args_parser
    from tests.conftest import synthetic_flags

    def run(*flags: str) -> dict:
        return main_module.main(finalize_args(get_args_parser().parse_args(synthetic_flags(tmp_path, "out", *flags))))

    flags = ("--amp", "--amp_backbone_half", "--channels_last")
    log = run("--epochs", "1", *flags)
    ckpt = str(tmp_path / "out" / "checkpoint.pth")
    assert run("--eval", "--resume", ckpt, *flags)["test_coco_eval_bbox"] == log["test_coco_eval_bbox"]
    assert "test_coco_eval_bbox" in run("--eval", "--resume", ckpt)  # a plain model: the state dict loads strictly


# refusals --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (("-m", "yolos", "--amp_backbone_half"), "--amp_backbone_half: -m yolos is a plain ViT"),
    (("-m", "yolos", "--channels_last"), "--channels_last: -m yolos is a plain ViT"),
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


@pytest.mark.parametrize("flags", [("--channels_last", "--backbone_from_scratch"), ("--amp_backbone_half",),
                                   ("-m", "detr", "--amp_backbone_half", "--channels_last")])
def test_accepted(flags):
    validate_args(tiny_args(*flags))
