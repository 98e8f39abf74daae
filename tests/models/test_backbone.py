"""The ResNet backbone's CPU max pool: the same maxima and gradients as torch's pool, in every ResNet."""
import pytest
import torch
from torch import nn

from models.backbone import MaxPool2dCPUFast, ResNetBackbone


@pytest.mark.parametrize("shape", [(2, 8, 17, 23), (1, 4, 32, 32)])
def test_channels_last_pool_is_bitwise_the_plain_pool(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).relu()  # post-ReLU: many tied zeros, as in the stem
    x[0, 0, :4, :4] = 1.5  # tied positive maxima too
    fast, plain = MaxPool2dCPUFast(3, 2, 1), nn.MaxPool2d(3, 2, 1)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fast(a), plain(b)
    assert ya.is_contiguous() and torch.equal(ya, yb)
    grad = torch.randn(ya.shape, generator=g)
    ya.backward(grad)
    yb.backward(grad)
    assert torch.equal(a.grad, b.grad)


def test_every_resnet_uses_it_without_new_state():
    net = ResNetBackbone("resnet18", train_backbone=True, return_interm_layers=True, dilation=False)
    assert isinstance(net.body.maxpool, MaxPool2dCPUFast)
    assert not any("maxpool" in k for k in net.state_dict())
