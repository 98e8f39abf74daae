"""The add-on interface of the criterion: loss groups, loss specs, step context and the AddOn base.

An add-on contributes any of: extra decoder query groups (``query_group``), extra supervised
groups (``loss_groups``, each with its own matcher or fixed indices and its own num_boxes), and an
after-step hook (EMA updates). Loss keys and weights are generated from the same ``LossSpec``
(``loss_key``), so nobody writes a weight dict by hand.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, ClassVar, Mapping, Sequence

from torch import Tensor, nn

from ..query_groups import EncoderOutput, QueryGroup, QueryProvider

Indices = list[tuple[Tensor, Tensor]]
TERMS = ("loss_ce", "loss_bbox", "loss_giou")


def loss_key(name: str, layer: int | None = None, suffix: str = "") -> str:
    """``loss_giou`` + ``_3`` (aux layer) + ``_dn`` (group suffix) -> ``loss_giou_3_dn``."""
    key = name if layer is None else f"{name}_{layer}"
    return f"{key}_{suffix}" if suffix else key


@dataclass(frozen=True)
class LossSpec:
    """Declares the weighted loss keys of one supervised group.

    Attributes:
        suffix: key suffix ("" for the main queries, "enc", "dn", "one2many", ...).
        num_aux_layers: aux layers supervised besides the last one (keys ``_0`` .. ``_{n-1}``).
        coefs: coefficient per term name (``loss_ce``, ``loss_bbox``, ``loss_giou``).
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
    matcher: Callable[[Mapping[str, Any], Sequence[Mapping[str, Tensor]]], Indices] | None = None
    indices: Indices | None = None
    num_boxes: float | None = None
    valid: Tensor | None = None
    log: bool = False


@dataclass(frozen=True)
class ModelOptions:
    """What enabled add-ons ask of the host model at build time (the model builder applies it).

    Add-ons never patch a built model: an add-on whose seed changes the model's own parameters says so
    here, so that the parameter names and shapes are those of the seed's released checkpoints.

    Attributes:
        extra_queries: rows appended to the learned query table after the Q main rows (H-DETR's
            one-to-many queries: ``query_embed.weight`` [Q + extra, 2C] one-stage, [Q + extra, C] with
            mixed selection); only the first Q rows are main queries.
        decoder_layer: decoder-layer class or factory with the standard layer's arguments (MS-DETR's
            layer with the auxiliary FFN); None = the standard layer.
        content_indicator: DN-DETR's indicator bit: the learned content queries are C-1 wide and get a
            last channel 0 (denoising queries get 1); honoured by hosts whose content queries are a
            learned table (dab_deformable_detr, dino), which expose ``content_indicator = True``.
    """

    extra_queries: int = 0
    decoder_layer: Callable[..., Any] | None = None
    content_indicator: bool = False


@dataclass
class StepContext:
    """What add-ons see of the current training step.

    Attributes:
        targets: the batch's targets (on the device); None when the model was called without targets.
        epoch: current epoch.
        step: global step counter.
        extras: free slot for add-ons to pass things between hooks within the step.
    """

    targets: Sequence[Mapping[str, Tensor]] | None = None
    epoch: int = 0
    step: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


class AddOn:
    """Base of a training add-on; every hook is optional. Subclasses register with ``register_addon``.

    Class attributes:
        name: registry name, flag prefix and loss suffix.
        order: add-ons are applied in increasing order (fixed, independent of the command line).
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 100

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        """Declare the add-on's flags (the seed paper's names)."""

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        """Whether the seed's own flags switch this add-on on (``--addons NAME`` always does)."""
        return False

    @classmethod
    def model_options(cls, args: argparse.Namespace, options: ModelOptions) -> ModelOptions:
        """The host-model options this add-on needs, added to ``options`` (default: none)."""
        return options

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: nn.Module) -> AddOn:
        """Build the add-on; the only place that reads ``args``."""
        raise NotImplementedError

    def module(self) -> nn.Module | None:
        """Parameters the add-on owns; kept under ``model.addons[name]``."""
        return None

    def loss_specs(self, main: LossSpec) -> list[LossSpec]:
        """Weighted loss keys this add-on produces (``main`` gives the base coefficients)."""
        return []

    def query_group(self, enc: EncoderOutput, ctx: StepContext) -> QueryGroup | None:
        """An extra decoder query group for this step (training only)."""
        return None

    def loss_groups(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]) -> list[LossGroup]:
        """Extra supervised groups for this step."""
        return []

    def encoder_matcher(self, enc_outputs: Mapping[str, Any]) -> Callable[..., Indices] | None:
        """An assigner replacing the default one for the two-stage encoder proposals (None: keep it)."""
        return None

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        """Called after the optimizer step (e.g. an EMA update)."""

    def state_dict(self) -> dict[str, Any]:
        """State saved in checkpoints under ``addons/<name>``."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state


def query_providers(addons: Sequence[AddOn], ctx: StepContext) -> list[QueryProvider]:
    """The query-group hooks of the add-ons that have one, bound to this step's context."""
    return [partial(a.query_group, ctx=ctx) for a in addons if type(a).query_group is not AddOn.query_group]
