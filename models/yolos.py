"""YOLOS (hustvl/YOLOS): a plain DeiT/ViT whose sequence carries 100 learned detection tokens after the patches.

The image's patch tokens, a [CLS] token and ``det_token_num`` (``--num_queries``) detection tokens run through
the ViT blocks (timm's ``Block``); the detection tokens' final features go through two 3-layer MLP heads
(K + 1 softmax logits, sigmoid cxcywh boxes). Position embeddings are learned at ``--init_pe_size`` and
bicubically interpolated to every input size; ``--mid_pe_size`` adds YOLOS's per-layer ("mid") position
embeddings after every block but the last. Training is DETR's (softmax criterion, no aux loss) and so is
post-processing. Parameter names are the official ones (``backbone.blocks.<i>.attn.qkv``, ``backbone.det_token``,
``class_embed.layers.<i>``, ...); ImageNet DeiT weights come only from a local file
(``--pretrained_backbone_path``, as the official ``--pre_trained``) and are adapted as the official code does.
"""
from __future__ import annotations

import argparse
from functools import partial
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as activation_checkpoint
from torch import Tensor, nn

from util.errors import FlagError
from util.misc import NestedTensor, nested_tensor_from_tensor_list

from .addons import StepContext, build_addons, plan_addons
from .backbone import load_local_weights
from .criterion import SetCriterion, main_coefs
from .detector import Detector
from .detr import SoftmaxPostProcess
from .layers import MLP
from .matcher import build_matcher
from .outputs import DetrOutputs, layer_predictions
from .query_groups import QueryProvider
from .registry import register_model

# DeiT sizes of the official ``--backbone_name``: (embed dim, depth, heads, pretraining image size, distilled).
VITS = {"tiny": (192, 12, 3, 224, False), "small": (384, 12, 6, 224, False), "base": (768, 12, 12, 384, True)}
PATCH = 16

# hustvl/YOLOS main.py defaults, where they differ from Deformable-DETR's (flags.py), its warm-up cosine schedule
# included (util/lr_schedule.py; --sched step is its StepLR at --lr_drop).
YOLOS_DEFAULTS = {
    "lr": 1e-4, "lr_backbone": 1e-5, "epochs": 150, "lr_drop": 100, "num_queries": 100, "cls_loss": "softmax",
    "eos_coef": 0.1, "set_cost_class": 1.0, "cls_loss_coef": 1.0, "drop_path_rate": 0.0, "aux_loss": False,
    "num_feature_levels": 1, "sched": "warmupcos",
}


def trunc_normal(t: Tensor, std: float = 0.02) -> Tensor:
    with torch.no_grad():
        return nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0)


def resize_patch_pos(pos: Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Patch position embeddings [..., h*w, C] on ``grid`` (h, w) -> [..., h'*w', C] on ``new_grid`` (bicubic)."""
    if tuple(grid) == tuple(new_grid):
        return pos
    lead, c = pos.shape[:-2], pos.shape[-1]
    x = pos.reshape(-1, grid[0], grid[1], c).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=new_grid, mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).reshape(*lead, new_grid[0] * new_grid[1], c)


class YolosViT(nn.Module):
    """DeiT with detection tokens: [CLS] + patches + det tokens -> the det tokens' features [B, D, C].

    Args:
        size: ``tiny``/``small``/``base`` (DeiT-Ti/S/B, VITS).
        det_token_num: detection tokens (the queries).
        init_pe_size: (H, W) image size the position embeddings are stored for.
        mid_pe_size: (H, W) of the mid position embeddings, or None (none).
        drop_path_rate: stochastic depth (linear over the blocks).
        use_checkpoint: activation checkpointing per block.
        pretrained_path: a local DeiT checkpoint, loaded before the detection adaptation (official order).
    """

    def __init__(self, size: str, det_token_num: int, init_pe_size: Sequence[int], mid_pe_size: Sequence[int] | None,
                 drop_path_rate: float = 0.0, use_checkpoint: bool = False, pretrained_path: str | None = None) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        dim, depth, heads, pretrain_size, distilled = VITS[size]
        self.embed_dim, self.depth, self.det_token_num = dim, depth, det_token_num
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        grid = pretrain_size // PATCH
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1 + int(distilled), dim))
        rates = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, drop_path=r, norm_layer=norm)
                                    for r in rates)
        self.norm = norm(dim)
        trunc_normal(self.pos_embed)
        trunc_normal(self.cls_token)
        self.apply(self._init_weights)
        if pretrained_path:
            load_local_weights(self, pretrained_path, f"DeiT-{size}")
        self._adapt_to_detection((grid, grid), init_pe_size, mid_pe_size)
        self.use_checkpoint = use_checkpoint

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def _adapt_to_detection(self, grid: tuple[int, int], init_pe_size: Sequence[int],
                            mid_pe_size: Sequence[int] | None) -> None:
        """The official ``finetune_det``: det tokens and their positions, patch positions resized to init_pe_size,
        mid position embeddings. A distilled DeiT's first position (its [CLS]) is dropped, as there."""
        pos = self.pos_embed.data
        if pos.shape[1] - 1 != grid[0] * grid[1]:
            pos = pos[:, 1:]
        self.det_token = nn.Parameter(trunc_normal(torch.zeros(1, self.det_token_num, self.embed_dim)))
        det_pos = trunc_normal(torch.zeros(1, self.det_token_num, self.embed_dim))
        self.pe_grid = (init_pe_size[0] // PATCH, init_pe_size[1] // PATCH)
        patches = resize_patch_pos(pos[:, 1:], grid, self.pe_grid)
        self.pos_embed = nn.Parameter(torch.cat([pos[:, :1], patches, det_pos], 1))
        self.mid_grid = None
        if mid_pe_size is not None:
            self.mid_grid = (mid_pe_size[0] // PATCH, mid_pe_size[1] // PATCH)
            # The official size formula: (H * W) // patch**2 positions (not (H // p) * (W // p)).
            n = mid_pe_size[0] * mid_pe_size[1] // PATCH ** 2
            self.mid_pos_embed = nn.Parameter(torch.zeros(self.depth - 1, 1, 1 + n + self.det_token_num,
                                                          self.embed_dim))
            trunc_normal(self.mid_pos_embed)

    def no_weight_decay(self) -> set[str]:
        """Official: the tokens and their positions get no weight decay (nor do biases and norms)."""
        return {"pos_embed", "cls_token", "det_token"}

    def _positions(self, table: Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
        d = self.det_token_num
        cls, patches, det = table[..., :1, :], table[..., 1:-d, :], table[..., -d:, :]
        return torch.cat([cls, resize_patch_pos(patches, grid, new_grid), det], -2)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] (padding included: YOLOS ignores the mask). Returns the det tokens [B, D, C]."""
        b, _, h, w = x.shape
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        new_grid = (h // PATCH, w // PATCH)
        pos = self._positions(self.pos_embed, self.pe_grid, new_grid)
        mid = None if self.mid_grid is None else self._positions(self.mid_pos_embed, self.mid_grid, new_grid)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x, self.det_token.expand(b, -1, -1)], 1) + pos
        for i, block in enumerate(self.blocks):
            if self.use_checkpoint and x.requires_grad:
                x = activation_checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if mid is not None and i < self.depth - 1:
                x = x + mid[i]
        return self.norm(x)[:, -self.det_token_num:]


class YOLOS(Detector):
    """YOLOS detector: ViT with detection tokens and DETR's two heads (3-layer MLPs).

    Args:
        backbone: YolosViT.
        num_classes: K; the classifier has K + 1 logits (the last: "no object").
    """

    capabilities = frozenset()
    two_stage = False  # no encoder proposals (the contract's flag)

    def __init__(self, backbone: YolosViT, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        dim = backbone.embed_dim
        self.class_embed = MLP(dim, dim, num_classes + 1, 3)
        self.bbox_embed = MLP(dim, dim, 4, 3)
        self.num_queries = backbone.det_token_num
        self.aux_loss = False

    def no_weight_decay_names(self) -> set[str]:
        """Parameters the official optimizer trains without weight decay: the ViT's biases, norms, tokens and
        their positions (main.py puts them in a group with weight decay 0)."""
        skip = self.backbone.no_weight_decay()
        return {f"backbone.{n}" for n, p in self.backbone.named_parameters()
                if p.dim() == 1 or n.endswith(".bias") or n.split(".")[-1] in skip}

    def forward(self, samples: NestedTensor | Sequence[Tensor], targets: Sequence[dict] | None = None,
                providers: Sequence[QueryProvider] | None = None, ctx: StepContext | None = None) -> DetrOutputs:
        """``pred_logits`` [B, D, K + 1], ``pred_boxes`` [B, D, 4] normalised cxcywh (of the padded image, as
        the official model sees it). ``targets``/``providers``/``ctx``: the host interface (no query groups)."""
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        if providers:
            raise ValueError("YOLOS takes no add-on query groups")
        x = self.backbone(samples.tensors)
        return layer_predictions([self.class_embed(x)], [self.bbox_embed(x).sigmoid()], aux_loss=False)


def add_yolos_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("YOLOS (hustvl/YOLOS flags; --num_queries is its --det_token_num)")
    g.add_argument("--backbone_name", default="tiny", choices=sorted(VITS),
                   help="-m yolos: the DeiT size (tiny: YOLOS-Ti, small: YOLOS-S, base: YOLOS-B)")
    g.add_argument("--init_pe_size", default=[800, 1344], type=int, nargs=2, metavar=("H", "W"),
                   help="-m yolos: image size the position embeddings are stored for (YOLOS-S: 512 864)")
    g.add_argument("--mid_pe_size", default=None, type=int, nargs=2, metavar=("H", "W"),
                   help="-m yolos: per-layer (mid) position embeddings of this image size (YOLOS-S: 512 864)")


def check_yolos_args(args: Any) -> None:
    if args.masks or args.frozen_weights:
        raise FlagError("-m yolos: --masks/--frozen_weights (segmentation) are not supported")
    if args.cls_loss != "softmax":
        raise FlagError("-m yolos classifies with a 'no object' logit: it needs --cls_loss softmax (its default)")
    if args.two_stage or args.with_box_refine or args.dilation:
        raise FlagError("-m yolos is a plain ViT: --two_stage/--with_box_refine/--dilation do not apply")
    for dest in ("init_pe_size", "mid_pe_size"):
        size = getattr(args, dest)
        if size is not None and min(size) < PATCH:
            raise FlagError(f"--{dest} must be at least {PATCH} pixels (one patch), got {size[0]} {size[1]}")


@register_model("yolos", defaults=YOLOS_DEFAULTS, source="hustvl/YOLOS main.py")
def build_yolos(args: Any) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """YOLOS from the official flags (``--backbone_name``, ``--init_pe_size``, ``--mid_pe_size``; ``--num_queries``
    = det tokens; ``--pretrained_backbone_path`` = ``--pre_trained``)."""
    check_yolos_args(args)
    classes, request = plan_addons(args, YOLOS.capabilities)
    del request  # nothing can be requested of a host without capabilities
    vit = YolosViT(args.backbone_name, args.num_queries, args.init_pe_size, args.mid_pe_size, args.drop_path_rate,
                   args.use_checkpoint, args.pretrained_backbone_path)
    model = YOLOS(vit, args.num_classes)
    addons = build_addons(args, model, classes)
    criterion = SetCriterion(args.num_classes, build_matcher(args), main_coefs(args), num_aux_layers=0,
                             cls_loss="softmax", eos_coef=args.eos_coef, addons=addons)
    return model, criterion, {"bbox": SoftmaxPostProcess()}


build_yolos.add_args = add_yolos_args
