"""A toy add-on written here, outside the package, runs on every host through the declared interface.

It uses every kind of hook: a before-forward hook (writes to the step's stash), one query group per image of
the batch (built by the host like its main queries, from rows it asked the host for), a loss term of its own
with a generated weight, and an evaluation-model swap. Nothing outside this file knows about it.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import engine
import main
from models import build_model
from models.addons import AddOn, HostRequest, LossSpec, StepContext, evaluation_model, loss_key
from models.query_groups import QueryGroup
from models.registry import ADDONS, register_addon
from tests.conftest import synthetic_flags, tiny_args
from util.misc import nested_tensor_from_tensor_list

ROWS = 3  # extra query rows per toy group


class EvalSpy(nn.Module):
    """The swapped evaluation model: the same detector, counting its calls."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


class ToyAddOn(AddOn):
    name = "toy"
    order = 90
    requires = frozenset({"group_queries"})
    spies: list[EvalSpy] = []  # every evaluation model it handed out (for the tests)

    def __init__(self, model: nn.Module, weight: float) -> None:
        self.model, self.weight = model, weight
        self.seen: list[int] = []
        self.spy: EvalSpy | None = None

    @classmethod
    def add_args(cls, parser) -> None:
        parser.add_argument("--toy_weight", default=0.5, type=float)

    @classmethod
    def request(cls, args) -> HostRequest:
        return HostRequest(extra_queries=ROWS)

    @classmethod
    def from_args(cls, args, model) -> ToyAddOn:
        return cls(model, args.toy_weight)

    def loss_specs(self, main_spec: LossSpec) -> list[LossSpec]:
        return [LossSpec("toy", 0, {"loss_norm": self.weight})]

    def before_forward(self, model, ctx: StepContext) -> None:
        ctx.stash["toy_images"] = ctx.images.tensors.shape[0]

    def query_groups(self, enc, ctx: StepContext) -> list[QueryGroup]:
        groups = []
        for i in range(ctx.stash.get("toy_images", 0)):  # one group per image of the batch
            tgt, reference, query_pos = self.model.group_queries(enc, enc.num_queries, ROWS)
            groups.append(QueryGroup(f"toy{i}", tgt, reference, query_pos))
        self.seen.append(len(groups))
        return groups

    def extra_losses(self, outputs, ctx: StepContext) -> dict[str, torch.Tensor]:
        boxes = [g["pred_boxes"] for name, g in outputs.get("groups", {}).items() if name.startswith("toy")]
        value = sum(b.square().mean() for b in boxes) if boxes else outputs["pred_boxes"].sum() * 0
        return {loss_key("loss_norm", None, "toy"): value}

    def eval_model(self, model: nn.Module) -> nn.Module:
        if self.spy is None or self.spy.model is not model:
            self.spy = EvalSpy(model)
            ToyAddOn.spies.append(self.spy)
        return self.spy


@pytest.fixture(scope="module", autouse=True)
def toy_registered():
    register_addon("toy")(ToyAddOn)
    yield
    ADDONS._items.pop("toy")  # leave the registry as the other tests expect it


HOSTS = {"deformable_detr": ["--with_box_refine", "--two_stage"], "dab_deformable_detr": ["-m", "dab_deformable_detr"],
         "dino": ["-m", "dino", "--no-use_dn"]}


@pytest.mark.parametrize("host", HOSTS.values(), ids=HOSTS.keys())
def test_toy_addon_runs_every_hook(host, batch):
    images, targets = batch
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(*host, "--addons", "toy", "--dropout", "0"))
    (toy,) = criterion.addons
    assert criterion.weight_dict["loss_norm_toy"] == 0.5
    assert model.num_extra_queries == ROWS
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    loader = [(nested_tensor_from_tensor_list(images), targets)]
    stats = engine.train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), 0, 0.1,
                                   addons=criterion.addons, print_freq=100)
    assert toy.seen == [len(images)]  # the before-forward hook's stash reached the query-group hook
    assert stats["loss_norm_toy"] > 0  # its own term, weighted and logged
    # the groups ran behind the block mask: the main queries' outputs equal a forward without the add-on
    model.train()
    samples = nested_tensor_from_tensor_list(images)
    ctx = StepContext(images=samples, targets=targets, stash={"toy_images": 2})
    with torch.no_grad():
        with_groups = model(samples, targets, ctx=ctx)
        without = model(samples, targets, providers=())
    assert set(with_groups["groups"]) == {"toy0", "toy1"}
    assert with_groups["groups"]["toy0"]["pred_logits"].shape[1] == ROWS
    torch.testing.assert_close(with_groups["pred_logits"], without["pred_logits"], rtol=1e-5, atol=1e-5)
    assert evaluation_model(model, criterion.addons) is toy.spy and toy.spy.model is model


def test_evaluation_uses_the_swapped_model(tmp_path):
    args = main.get_args_parser().parse_args(synthetic_flags(tmp_path, "out", "--with_box_refine", "--two_stage",
                                                             "--addons", "toy", "--epochs", "1"))
    ToyAddOn.spies.clear()
    main.main(args)
    log = main.read_log(args.output_dir)
    assert "train_loss_norm_toy" in log[-1] and "test_coco_eval_bbox" in log[-1]
    assert ToyAddOn.spies and ToyAddOn.spies[-1].calls == 2  # the 4 validation images, batch 2


def test_a_host_without_the_capability_is_refused(monkeypatch):
    monkeypatch.setattr(ToyAddOn, "requires", frozenset({"anchor_groups"}))
    with pytest.raises(ValueError, match="'toy'.*anchor_groups"):
        build_model(tiny_args("--addons", "toy"))  # one-stage Deformable-DETR has no 4-d anchor queries
