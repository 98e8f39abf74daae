"""Backbones: torchvision ResNets (frozen BatchNorm, optional DC5) and timm feature extractors.

Nothing is downloaded: pretrained weights come from a local file (``--pretrained_backbone_path``).
Parameter names follow the official Deformable-DETR (``backbone.0.body.*``).
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from util.checkpoint import CheckpointError
from util.errors import FlagError
from util.misc import NestedTensor

logger = logging.getLogger(__name__)

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all stored as buffers.

    Args:
        n: channels.
        eps: added to the variance.
        keep_input_dtype: ``--amp_backbone_half``: scale and shift are computed from the fp32 buffers, then cast
            to the input's dtype, so a bf16/fp16 activation (a conv under autocast) stays bf16/fp16; an fp32 input
            gives bitwise the default's result. Off (official): the fp32 buffers promote the output to fp32, and
            with it every later activation, ReLU and residual add of the ResNet.
    """

    def __init__(self, n: int, eps: float = 1e-5, *, keep_input_dtype: bool = False) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))
        self.eps = eps
        self.keep_input_dtype = keep_input_dtype
        self._affine_cache: tuple | None = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _scale_shift(self) -> tuple[Tensor, Tensor]:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return scale, b - rm * scale

    def _cached_scale_shift(self) -> tuple[Tensor, Tensor]:
        """The scale and shift, computed again only when a buffer changed: replaced (``.to()``, assignment) or
        written in place (``load_state_dict``, an EMA: the version counter moves). The same operations as per call,
        so the same bits; a host-bound GPU step saves nine operators per layer (53 in a ResNet-50). Plain per call
        under torch.compile and in inference mode (no version counters there), and in a run of several processes:
        DDP's buffer broadcast before each forward writes rank 0's values without moving the version counter."""
        buffers = (self.weight, self.bias, self.running_mean, self.running_var)
        if (torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or any(t.is_inference() for t in buffers)
                or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)):
            return self._scale_shift()
        versions = tuple(t._version for t in buffers)
        cache = self._affine_cache
        if cache is None or cache[1] != versions or any(a is not b for a, b in zip(cache[0], buffers)):
            cache = self._affine_cache = (buffers, versions, *self._scale_shift())
        return cache[2], cache[3]

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self._cached_scale_shift()
        if self.keep_input_dtype:
            return x * scale.to(x.dtype) + shift.to(x.dtype)
        return x * scale + shift


def _pair(v: int | tuple[int, ...]) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


class _ChannelsLastMaxPool(torch.autograd.Function):
    """Max pool of an NCHW map computed on a channels-last copy; the gradient by the NCHW backward kernel.

    Only the forward is faster on channels-last: its backward (and, with a channels-last gradient, the ReLU
    backward before it) is ~3x slower than NCHW's, so the output and the indices are returned NCHW and the
    gradient is scattered by torch's NCHW kernel. The indices are flat positions in each channel's plane in both
    layouts, and both kernels keep the first maximum of a window in the same scan order, so they are the same.
    """

    @staticmethod
    def forward(ctx, x: Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool) -> Tensor:
        out, indices = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), kernel_size, stride, padding,
                                    dilation, ceil_mode, return_indices=True)
        indices = indices.contiguous()
        ctx.save_for_backward(x, indices)
        ctx.args = (_pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation), ceil_mode)
        ctx.mark_non_differentiable(indices)
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, indices = ctx.saved_tensors
        kernel_size, stride, padding, dilation, ceil_mode = ctx.args
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad.contiguous(), x, kernel_size, stride, padding,
                                                                 dilation, ceil_mode, indices)
        return grad_x, None, None, None, None, None


class MaxPool2dCPUFast(nn.MaxPool2d):
    """The ResNet stem's max pool, its forward on a channels-last copy on CPU.

    PyTorch's CPU max pool with indices is slower on NCHW than on NHWC maps (the small benchmark model's
    8x64x64x64 stem, one thread: 15 ms vs 8 ms with the copies); its backward is fastest on NCHW, so the gradient
    stays NCHW (``_ChannelsLastMaxPool``). The maxima, the indices and the gradient are bitwise the plain pool's
    (tests/models/test_backbone.py). Other devices, channels-last inputs and ``torch.compile`` (Dynamo cannot trace
    the autograd.Function when its input requires grad; the compiler picks its own pool kernel) run the plain pool.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type != "cpu" or x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last)
                or self.return_indices or torch.compiler.is_compiling()):
            return super().forward(x)
        return _ChannelsLastMaxPool.apply(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                          self.ceil_mode)


def load_local_weights(module: nn.Module, path: str, name: str) -> None:
    """Load backbone weights from a local file (torchvision/timm state dict, or a dict under 'model').

    Classification-head keys are ignored; any other missing key is reported.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file cannot be read, or holds weights of another architecture (names the file).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--pretrained_backbone_path: {path} does not exist (nothing is downloaded; "
                                f"put the {name} weights there)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"--pretrained_backbone_path: cannot read {path} ({type(e).__name__}: {reason}); "
                              f"it must be a torchvision/timm {name} state dict saved with torch.save") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"--pretrained_backbone_path: {path} holds a {type(state).__name__}, not a state dict "
                              f"of {name} weights")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = module.state_dict()
    shapes = [k for k, v in state.items() if k in own and getattr(v, "shape", None) != own[k].shape]
    if shapes or not set(state) & set(own):
        example = (f" (e.g. {shapes[0]}: {list(getattr(state[shapes[0]], 'shape', []))} in the file, "
                   f"{list(own[shapes[0]].shape)} in {name})" if shapes else "")
        what = (f"{len(shapes)} of its tensors have other shapes than {name}'s{example}" if shapes
                else f"none of its {len(state)} names is a parameter name of the {name} feature extractor (file: "
                     f"{next(iter(state), None)}, ...; {name}: {next(iter(own), None)}, ...)")
        raise CheckpointError(f"--pretrained_backbone_path {path} does not hold {name} weights: {what}; pass the "
                              f"weights of --backbone {name}, or the --backbone the file was saved from")
    missing, unexpected = module.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.startswith(("fc.", "head", "classifier"))]
    if unexpected and name in RESNETS:
        raise CheckpointError(f"--pretrained_backbone_path {path} does not hold {name} weights: it has "
                              f"{len(unexpected)} tensors {name} does not (e.g. {unexpected[0]}), the weights of a "
                              f"deeper ResNet?; pass the weights of --backbone {name}, or the --backbone the file was "
                              "saved from")
    logger.info("loaded %s weights from %s (missing %d, unexpected %d)", name, path, len(missing), len(unexpected))
    if missing:
        logger.warning("--pretrained_backbone_path %s lacks %d %s weights (first: %s); check that the file holds "
                       "%s weights with torchvision/timm parameter names (optionally under 'model' or 'state_dict')",
                       path, len(missing), name, missing[:5], name)


class BackboneBase(nn.Module):
    """Runs a feature extractor and resizes the padding mask to every returned level.

    Args:
        body: the feature extractor (its parameter names are ``backbone.0.body.*``).
        strides, num_channels: of every returned level.
        nhwc_output: the body returns [B, H, W, C] maps (timm transformers); they are permuted to [B, C, H, W].
        channels_last: ``--channels_last``: the body's weights are converted to the channels-last memory format
            here, once (names, shapes and values unchanged: state dicts load both ways), and its input image
            before every call, so that convs on tensor cores need no NCHW<->NHWC transposes. The returned
            maps are made contiguous (NCHW) as without the flag: the rest of the model runs its usual layout.
        float_features: ``--amp_backbone_half``: the body ran in the autocast dtype; its maps are handed on in
            fp32, the dtype the official fp32 BatchNorm gives them, so position encodings and everything after
            the backbone see what they see without the flag (one cast per returned map).

    Attributes:
        strides: stride of every returned level.
        num_channels: channels of every returned level.
    """

    def __init__(self, body: nn.Module, strides: list[int], num_channels: list[int], nhwc_output: bool, *,
                 channels_last: bool = False, float_features: bool = False) -> None:
        super().__init__()
        if channels_last:
            body.to(memory_format=torch.channels_last)  # 4-d weights only; 1-d BatchNorm buffers are unaffected
        self.body = body
        self.strides = strides
        self.num_channels = num_channels
        self.nhwc_output = nhwc_output
        self.channels_last = channels_last
        self.float_features = float_features

    def forward(self, tensor_list: NestedTensor) -> list[NestedTensor]:
        """Feature maps [B, C_l, H_l, W_l] (NCHW) of every returned level, each with its [B, H_l, W_l] padding
        mask (True = padding), nearest-resized from ``tensor_list.mask``."""
        images = tensor_list.tensors  # [B, 3, H, W]
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        feats = self.body(images)
        out = []
        for x in feats.values() if isinstance(feats, dict) else feats:
            if self.nhwc_output:  # timm transformers may return NHWC maps
                x = x.permute(0, 3, 1, 2)
            if self.float_features:  # bf16/fp16 -> fp32 and NCHW in one copy; an fp32 NCHW map is returned as is
                x = x.to(torch.float32, memory_format=torch.contiguous_format)
            mask = F.interpolate(tensor_list.mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
            out.append(NestedTensor(x.contiguous(), mask))
        return out


class ResNetBackbone(BackboneBase):
    """torchvision ResNet with FrozenBatchNorm2d; conv1 and layer1 are always frozen (official)."""

    def __init__(self, name: str, train_backbone: bool, return_interm_layers: bool, dilation: bool,
                 pretrained_path: str | None = None, from_scratch: bool = False, num_levels: int = 3, *,
                 amp_backbone_half: bool = False, channels_last: bool = False) -> None:
        if name not in RESNETS:
            raise ValueError(f"unknown ResNet {name!r}; choose from {RESNETS} or a timm model as timm:<name>")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"--dilation (DC5) needs a Bottleneck ResNet (resnet50/101); {name} has BasicBlocks")
        if amp_backbone_half and from_scratch:
            raise ValueError("--amp_backbone_half acts on the frozen BatchNorm; with --backbone_from_scratch the "
                             "BatchNorm is trainable (and already keeps the autocast dtype)")
        # From scratch, frozen statistics would be an identity: train BatchNorm and every stage instead.
        norm = nn.BatchNorm2d if from_scratch else partial(FrozenBatchNorm2d, keep_input_dtype=amp_backbone_half)
        net = getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=[False, False, dilation],
                                                norm_layer=norm)
        if pretrained_path:
            load_local_weights(net, pretrained_path, name)
        pool = net.maxpool  # no parameters: names and state dicts are unchanged
        net.maxpool = MaxPool2dCPUFast(pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                       ceil_mode=pool.ceil_mode)
        for pname, p in net.named_parameters():
            trained_stage = from_scratch or any(layer in pname for layer in ("layer2", "layer3", "layer4"))
            if not train_backbone or not trained_stage:
                p.requires_grad_(False)
        layers = ["layer1", "layer2", "layer3", "layer4"][-num_levels:] if return_interm_layers else ["layer4"]
        strides = [4, 8, 16, 32][-num_levels:] if return_interm_layers else [32]
        if dilation:
            strides[-1] = 16
        channels = [self._out_channels(getattr(net, layer)) for layer in layers]
        body = IntermediateLayerGetter(net, return_layers={layer: str(i) for i, layer in enumerate(layers)})
        super().__init__(body, strides, channels, nhwc_output=False, channels_last=channels_last,
                         float_features=amp_backbone_half)

    @staticmethod
    def _out_channels(layer: nn.Sequential) -> int:
        block = layer[-1]
        norm = block.bn3 if hasattr(block, "bn3") else block.bn2
        return int(norm.weight.shape[0])


class TimmBackbone(BackboneBase):
    """Any timm model with ``features_only`` (Swin, ConvNeXt, ...): the last three stages, all trained."""

    ALIASES = {
        "swin_tiny": "swin_tiny_patch4_window7_224",
        "swin_small": "swin_small_patch4_window7_224",
        "swin_base": "swin_base_patch4_window7_224",
        "swin_large": "swin_large_patch4_window7_224",
        "swin_large_window12": "swin_large_patch4_window12_384",
        "convnext_tiny": "convnext_tiny",
    }

    def __init__(self, name: str, train_backbone: bool, return_interm_layers: bool,
                 pretrained_path: str | None = None, drop_path_rate: float = 0.0, num_levels: int = 3, *,
                 channels_last: bool = False) -> None:
        import timm  # imported lazily: only timm backbones need it

        model_name = self.ALIASES.get(name, name)
        kwargs = {"features_only": True, "pretrained": False, "drop_path_rate": drop_path_rate}
        if "swin" in model_name:
            kwargs["strict_img_size"] = False  # any input size, padded to the window inside timm
        if not timm.is_model(model_name):
            raise FlagError(f"--backbone {name}: unknown backbone; use resnet18/34/50/101, swin_tiny/small/large, "
                            f"convnext_tiny or timm:<name> with a timm model name")
        body = timm.create_model(model_name, **kwargs)
        n = len(body.feature_info.channels())
        idx = list(range(n - num_levels, n)) if return_interm_layers else [n - 1]
        body = timm.create_model(model_name, out_indices=tuple(idx), **kwargs)
        if pretrained_path:
            load_local_weights(body, pretrained_path, model_name)
        if not train_backbone:
            body.requires_grad_(False)
        fmt = getattr(body, "output_fmt", "NCHW")
        super().__init__(body, body.feature_info.reduction(), body.feature_info.channels(),
                         nhwc_output=str(fmt).endswith("NHWC"), channels_last=channels_last)


class Joiner(nn.Sequential):
    """backbone.0 = feature extractor, backbone.1 = position encoding (official module names)."""

    def __init__(self, backbone: BackboneBase, position_embedding: nn.Module) -> None:
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, tensor_list: NestedTensor) -> tuple[list[NestedTensor], list[Tensor]]:
        feats = self[0](tensor_list)
        pos = [self[1](x).to(x.tensors.dtype) for x in feats]
        return feats, pos


def build_backbone(name: str, position_embedding: nn.Module, *, lr_backbone: float, num_feature_levels: int,
                   dilation: bool = False, pretrained_path: str | None = None, drop_path_rate: float = 0.0,
                   from_scratch: bool = False, num_backbone_levels: int = 3, amp_backbone_half: bool = False,
                   channels_last: bool = False) -> Joiner:
    """``name``: resnet18/34/50/101, or a timm model (``timm:<name>`` or a known alias like swin_tiny).

    ``from_scratch``: ResNets get trainable BatchNorm and all stages trained (no pretrained weights).
    ``num_backbone_levels``: stages returned when multi-scale: 3 (C3-C5, Deformable-DETR) or 4 (C2-C5,
    DINO 5-scale).
    ``amp_backbone_half`` (ResNets with frozen BatchNorm): under autocast the body runs in the autocast dtype
    (see FrozenBatchNorm2d). ``channels_last``: the body runs in the channels-last memory format (see BackboneBase).
    """
    train_backbone = lr_backbone > 0
    multi_scale = num_feature_levels > 1
    if pretrained_path is None and not from_scratch:
        logger.warning("backbone %s starts from random weights%s: pass --pretrained_backbone_path FILE with local "
                       "ImageNet weights to reproduce the papers (nothing is downloaded), or --backbone_from_scratch "
                       "to train from random weights%s", name,
                       " with frozen BatchNorm and conv1/layer1" if name in RESNETS else "",
                       " (trainable BatchNorm, every stage trained)" if name in RESNETS else "")
    if name in RESNETS:
        body = ResNetBackbone(name, train_backbone, multi_scale, dilation, pretrained_path, from_scratch,
                              num_backbone_levels, amp_backbone_half=amp_backbone_half, channels_last=channels_last)
    else:
        timm_name = name.removeprefix("timm:")
        if dilation:
            raise ValueError("--dilation (DC5) is only available for ResNet backbones")
        if amp_backbone_half:
            raise ValueError("--amp_backbone_half acts on the frozen BatchNorm of the ResNet backbones; "
                             f"--backbone {name} has none")
        body = TimmBackbone(timm_name, train_backbone, multi_scale, pretrained_path, drop_path_rate,
                            num_backbone_levels, channels_last=channels_last)
    return Joiner(body, position_embedding)
