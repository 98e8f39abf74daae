"""The add-on interface: what an add-on may ask of a host model, the step context, loss groups and hooks.

An add-on is one paper's training-time addition (denoising, hybrid matching, MS-DETR, ...), in one file
of this package, registered with ``register_addon``. It states the host capabilities it needs
(``requires``), what the host must build for it (``request``: extra query rows, a decoder-layer
factory, reserved content channels), and implements any of the hooks below, each receiving the step's
``StepContext``. Loss keys and weights come from the same ``LossSpec`` (``loss_key``), so nobody writes
a weight dict by hand. With every add-on off a run is bitwise the baseline.

Hooks, in the order a training step calls them (models/__init__.py's README section has an example):
  before_forward(model, ctx)      e.g. a teacher forward; results go to ``ctx.stash``
  query_groups(enc, ctx)          extra decoder query groups (any number) behind the one block mask
  loss_groups(outputs, ctx)       extra supervised groups, each with its own assigner or fixed indices
  assigner(group, ctx)            replace the assigner of any group (main, encoder, another add-on's)
  extra_losses(outputs, ctx)      named terms the add-on computes itself (weights declared in loss_specs)
  after_step(model, ctx)          after the optimizer step (e.g. an EMA update)
  eval_model(model)               the model to evaluate instead (e.g. the EMA copy)
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, ClassVar, Mapping, Sequence

from torch import Tensor, nn

from ..query_groups import EncoderOutput, QueryGroup, QueryProvider

Indices = list[tuple[Tensor, Tensor]]
Matcher = Callable[[Mapping[str, Any], Sequence[Mapping[str, Tensor]]], Indices]
TERMS = ("loss_ce", "loss_bbox", "loss_giou")

# What a host model may offer add-ons (``Detector.capabilities``); an add-on lists what it needs in
# ``requires`` and a host that lacks one is refused at build time with this description.
CAPABILITIES = {
    "anchor_groups": "query groups of 4-d anchor boxes whose positional queries the host derives (denoising)",
    "group_queries": "extra queries built exactly like the main ones (group_queries(enc, start, count))",
    "decoder_layer": "decoder layers built from an add-on's factory (HostRequest.decoder_layer)",
    "learned_content": "content queries from a learned table (HostRequest.reserved_content_channels)",
    "decoder_states": "the decoder's per-layer query states (transformer.decoder's output hs) and the main queries "
                      "rebuilt by group_queries(enc, 0, num_queries)",
}


def loss_key(name: str, layer: int | None = None, suffix: str = "") -> str:
    """``loss_giou`` + ``_3`` (aux layer) + ``_dn`` (group suffix) -> ``loss_giou_3_dn``."""
    key = name if layer is None else f"{name}_{layer}"
    return f"{key}_{suffix}" if suffix else key


@dataclass(frozen=True)
class LossSpec:
    """Declares the weighted loss keys of one supervised group or of an add-on's own terms.

    Attributes:
        suffix: key suffix ("" for the main queries, "enc", "dn", "one2many", ...).
        num_aux_layers: aux layers supervised besides the last one (keys ``_0`` .. ``_{n-1}``).
        coefs: coefficient per term name (``loss_ce``, ``loss_bbox``, ``loss_giou``, or any name).
        weight: multiplies every coefficient (e.g. lambda_one2many).
    """

    suffix: str
    num_aux_layers: int
    coefs: Mapping[str, float]
    weight: float = 1.0

    def weight_dict(self) -> dict[str, float]:
        out = {}
        for layer in [None, *range(self.num_aux_layers)]:
            for term, coef in self.coefs.items():
                out[loss_key(term, layer, self.suffix)] = coef * self.weight
        return out


@dataclass
class LossGroup:
    """One supervised set of predictions at one step.

    Attributes:
        suffix: matches a declared LossSpec.
        outputs: ``pred_logits`` [B, N, K], ``pred_boxes`` [B, N, 4] and optionally ``aux_outputs``.
        targets: per image ``labels`` and ``boxes`` (cxcywh).
        matcher: assigner ``(outputs, targets) -> indices``; None = the criterion's Hungarian matcher.
        indices: fixed (query, target) indices used for every layer (e.g. denoising); overrides matcher.
        num_boxes: normaliser before the all-reduce; None = number of target boxes.
        valid: [B, N] bool, queries whose classification is supervised (None: all; unlisted queries
            are background). False slots get no loss at all (DN-DETR's padding slots).
        log: also log class_error of the last layer.
    """

    suffix: str
    outputs: Mapping[str, Any]
    targets: Sequence[Mapping[str, Tensor]]
    matcher: Matcher | None = None
    indices: Indices | None = None
    num_boxes: float | None = None
    valid: Tensor | None = None
    log: bool = False


@dataclass(frozen=True)
class HostRequest:
    """What the enabled add-ons ask the host model to build (the builder passes it to the constructors).

    Add-ons never patch a built model: what changes the model's own parameters is requested here, so that
    parameter names and shapes are those of the seeds' released checkpoints.

    Attributes:
        extra_queries: rows appended to the host's learned query tables after the Q main rows, for groups
            built like the main queries (H-DETR's one-to-many queries: ``query_embed`` [Q + extra, ...]).
        decoder_layer: decoder-layer class or factory with the standard layer's arguments (MS-DETR's layer);
            None = the standard layer.
        reserved_content_channels: trailing channels of every content query the add-on reserves: the host's
            learned content table is that much narrower and its queries end in zeros there (DN-DETR's
            indicator bit: 1).
    """

    extra_queries: int = 0
    decoder_layer: Callable[..., nn.Module] | None = None
    reserved_content_channels: int = 0

    def merge(self, other: HostRequest, who: str) -> HostRequest:
        """This request plus an add-on's (``who`` names it in the error when both choose a decoder layer)."""
        if self.decoder_layer is not None and other.decoder_layer is not None:
            raise ValueError(f"{who} needs its own decoder layer, but another add-on already chose one")
        return HostRequest(self.extra_queries + other.extra_queries, self.decoder_layer or other.decoder_layer,
                           max(self.reserved_content_channels, other.reserved_content_channels))


@dataclass
class StepContext:
    """What add-ons see of the current training step (one object for all hooks of the step).

    Attributes:
        images: the batch (NestedTensor, on the device); None when the caller did not give it.
        targets: the batch's targets (on the device); None when the model was called without targets.
        epoch: current epoch.
        step: global step counter.
        stash: free per-step slot for add-ons to pass things between hooks (e.g. teacher outputs).
        ema: the EMA copy of the model when EMA is on (``--use_ema`` or an add-on with ``needs_ema``), else
            None. Never wrapped by DDP, fp32, no gradients; add-ons run it as a teacher in ``before_forward``.
    """

    images: Any = None
    targets: Sequence[Mapping[str, Tensor]] | None = None
    epoch: int = 0
    step: int = 0
    stash: dict[str, Any] = field(default_factory=dict)
    ema: nn.Module | None = None


class AddOn:
    """Base of a training add-on; every hook is optional. Subclasses register with ``register_addon``.

    Class attributes:
        name: registry name, flag prefix and loss suffix.
        order: add-ons are applied in increasing order (fixed, independent of the command line).
        requires: host capabilities the add-on needs (keys of ``CAPABILITIES``).
        needs_ema: the add-on uses the EMA model (``StepContext.ema``); enabling it switches EMA on.
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 100
    requires: ClassVar[frozenset[str]] = frozenset()
    needs_ema: ClassVar[bool] = False

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        """Declare the add-on's flags (the seed paper's names)."""

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        """Whether the seed's own flags switch this add-on on (``--addons NAME`` always does)."""
        return False

    @classmethod
    def request(cls, args: argparse.Namespace) -> HostRequest:
        """What the host must build for this add-on (default: nothing)."""
        return HostRequest()

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: nn.Module) -> AddOn:
        """Build the add-on for a built host; the only place that reads ``args``."""
        raise NotImplementedError

    def module(self) -> nn.Module | None:
        """Parameters the add-on owns; kept under ``model.addons[name]``."""
        return None

    def loss_specs(self, main: LossSpec) -> list[LossSpec]:
        """Weighted loss keys this add-on produces (``main`` gives the base coefficients)."""
        return []

    def before_forward(self, model: nn.Module, ctx: StepContext) -> None:
        """Called by the engine before the model's forward (training only)."""

    def query_groups(self, enc: EncoderOutput, ctx: StepContext) -> list[QueryGroup]:
        """Extra decoder query groups for this step (training only)."""
        return []

    def loss_groups(self, outputs: Mapping[str, Any], ctx: StepContext) -> list[LossGroup]:
        """Extra supervised groups for this step (``ctx.targets`` holds the targets)."""
        return []

    def assigner(self, group: LossGroup, ctx: StepContext) -> Matcher | None:
        """An assigner replacing ``group``'s (any group: "" main, "enc", another add-on's); None keeps it."""
        return None

    def extra_losses(self, outputs: Mapping[str, Any], ctx: StepContext) -> dict[str, Tensor]:
        """Loss terms the add-on computes itself, under keys declared by its ``loss_specs``."""
        return {}

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        """Called after the optimizer step (e.g. an EMA update)."""

    def eval_model(self, model: nn.Module) -> nn.Module | None:
        """The model to evaluate instead of ``model`` (e.g. an EMA copy); None: ``model`` itself."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State saved in checkpoints under ``addons/<name>``."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state


def overrides(addon: AddOn, hook: str) -> bool:
    """Whether ``addon`` implements ``hook`` (the engine skips the others)."""
    return getattr(type(addon), hook) is not getattr(AddOn, hook)


def query_providers(addons: Sequence[AddOn], ctx: StepContext) -> list[QueryProvider]:
    """The query-group hooks of the add-ons that have one, bound to this step's context."""
    return [partial(a.query_groups, ctx=ctx) for a in addons if overrides(a, "query_groups")]
