"""The ResNet backbone: its CPU max pool (the same maxima and gradients as torch's pool, in every ResNet) and its frozen
BatchNorm's cached scale and shift (the per-call computation's bits, recomputed whenever a buffer changes)."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from models.backbone import FrozenBatchNorm2d, MaxPool2dCPUFast, ResNetBackbone


@pytest.mark.parametrize("shape", [(2, 8, 17, 23), (1, 4, 32, 32)])
@pytest.mark.parametrize("pool_args", [dict(kernel_size=3, stride=2, padding=1),  # the ResNet stem's
                                       dict(kernel_size=2, stride=2, ceil_mode=True),
                                       dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=2)])
def test_channels_last_pool_is_bitwise_the_plain_pool(shape, pool_args):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).relu()  # post-ReLU: many tied zeros, as in the stem
    x[0, 0, :4, :4] = 1.5  # tied positive maxima too
    fast, plain = MaxPool2dCPUFast(**pool_args), nn.MaxPool2d(**pool_args)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fast(a), plain(b)
    assert ya.is_contiguous() and torch.equal(ya, yb)
    grad = torch.randn(ya.shape, generator=g)
    ya.backward(grad)
    yb.backward(grad)
    # bitwise, and NCHW: a channels-last gradient made the ReLU backward before the pool ~3x slower
    assert a.grad.is_contiguous() and torch.equal(a.grad, b.grad)
    _, indices = nn.functional.max_pool2d(x, **pool_args, return_indices=True)
    _, fast_indices = nn.functional.max_pool2d(x.contiguous(memory_format=torch.channels_last), **pool_args,
                                               return_indices=True)
    assert torch.equal(fast_indices.contiguous(), indices)  # the same maximum kept in each window


def test_every_resnet_uses_it_without_new_state():
    net = ResNetBackbone("resnet18", train_backbone=True, return_interm_layers=True, dilation=False)
    assert isinstance(net.body.maxpool, MaxPool2dCPUFast)
    assert not any("maxpool" in k for k in net.state_dict())


def test_compiled_pool_with_a_grad_requiring_input():
    """``--compile`` with a trainable stem (``--backbone_from_scratch``): Dynamo could not trace the
    autograd.Function and the first training step crashed; compiled, the module runs the plain pool."""
    import torch._dynamo
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    net = nn.Sequential(conv, MaxPool2dCPUFast(kernel_size=3, stride=2, padding=1))
    x = torch.randn(2, 3, 17, 23, generator=g)
    y = net(x)
    y.sum().backward()
    expected = conv.weight.grad.clone()
    conv.weight.grad = None
    net.compile(backend="eager")
    y_compiled = net(x)
    y_compiled.sum().backward()
    assert torch.equal(y_compiled, y) and torch.equal(conv.weight.grad, expected)


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _plain(bn: FrozenBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """The per-call computation (the official FrozenBatchNorm2d's)."""
    w, b, rv, rm = (t.reshape(1, -1, 1, 1) for t in (bn.weight, bn.bias, bn.running_var, bn.running_mean))
    scale = w * (rv + bn.eps).rsqrt()
    return x * scale + (b - rm * scale)


def _randomised(n: int, seed: int) -> FrozenBatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = FrozenBatchNorm2d(n)
    bn.load_state_dict({"weight": torch.randn(n, generator=g), "bias": torch.randn(n, generator=g),
                        "running_mean": torch.randn(n, generator=g), "running_var": torch.rand(n, generator=g) + 0.1})
    return bn


def test_frozen_bn_caches_its_scale_and_shift_until_a_buffer_changes():
    bn = _randomised(6, 0)
    x = torch.randn(2, 6, 5, 7, requires_grad=True)
    assert torch.equal(bn(x), _plain(bn, x))
    with _Count() as first:
        bn(x)
    with _Count() as again:
        y = bn(x)
    assert first.ops == again.ops == 2 and torch.equal(y, _plain(bn, x))  # was 11 a call
    y.sum().backward()  # the cached tensors carry no graph; x gets its gradient
    assert torch.equal(x.grad, bn.weight.reshape(1, -1, 1, 1) * (bn.running_var.reshape(1, -1, 1, 1) + bn.eps).rsqrt()
                       .expand_as(x))
    # written in place (load_state_dict, an EMA, DDP's broadcast), replaced, or changed in dtype: recomputed
    bn.load_state_dict(_randomised(6, 1).state_dict())
    assert torch.equal(bn(x), _plain(bn, x))
    with torch.no_grad():
        bn.running_var.mul_(2)
    assert torch.equal(bn(x), _plain(bn, x))
    bn.bias = torch.randn(6)
    assert torch.equal(bn(x), _plain(bn, x))
    bn.double()
    assert torch.equal(bn(x.double()), _plain(bn, x.double()))


def test_frozen_bn_in_inference_mode_then_training():
    bn = _randomised(4, 2)
    x = torch.randn(1, 4, 3, 3)
    with torch.inference_mode():
        assert torch.equal(bn(x), _plain(bn, x))
    x.requires_grad_()
    bn(x).sum().backward()  # no inference tensor was cached for autograd to save
    assert x.grad is not None


def _ddp_rank(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 4, 1), _randomised(4, 3)
    ddp = torch.nn.parallel.DistributedDataParallel(nn.Sequential(conv, bn))
    x = torch.randn(1, 4, 2, 2)
    ddp(x)
    if rank == 1:  # this rank's buffer drifts (a write the version counter misses); DDP's broadcast restores rank 0's
        bn.running_var.data.mul_(3)
    y = ddp(x)
    features = conv(x).detach()
    with _Count() as count:
        bn(features)
    torch.save({"equal": torch.equal(y, _plain(bn, conv(x))), "ops": count.ops}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_frozen_bn_computes_per_call_under_ddp(tmp_path):
    """DDP's buffer broadcast writes rank 0's values before each forward without moving the version counter: in a
    run of several processes the layer computes its scale and shift at every call."""
    import torch.multiprocessing as mp
    mp.spawn(_ddp_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["equal"] and result["ops"] == 11
