"""Denoising is official by default: the same draws from torch's global generator, layout, mask and indices.

tests/data/dn_official_draws.pt holds the outputs of the official functions for six small batches. It was
produced (once, outside this repository) by running IDEA-Research/DINO @faa8520 models/dino/dn_components.py
``prepare_for_cdn`` and IDEA-Research/DN-DETR @ff3902a models/dn_dab_deformable_detr/dn_components.py
``prepare_for_dn`` on CPU (their ``.cuda()``/``.to('cuda')`` shimmed to no-ops; torch 2.x) after
``torch.manual_seed(case["seed"])``, with the stored targets and label table (K = 5, D = 8, 3 matching
queries), and recording: the DN content and anchor logits (the DN part of their padded outputs), the full
self-attention mask (DN part first), the positive indices their criteria use, the DN loss count, and the
next ``torch.rand(4)`` (what the generator gives after the call: the draws consumed must match).
"""
from pathlib import Path

import pytest
import torch
from torch import nn

from models import build_model
from models.addons import StepContext
from models.addons.builder import build_addons, enabled_addons
from models.addons.dn import Denoising, DenoisingConfig, DenoisingQueries
from models.query_groups import EncoderOutput, build_group_attn_mask
from tests.conftest import tiny_args

DATA = torch.load(Path(__file__).resolve().parents[1] / "data" / "dn_official_draws.pt")
CASES = DATA["cases"]


def _config(case):
    p = case["params"]
    if case["mode"] == "cdn":
        return DenoisingConfig("cdn", budget=p["dn_number"], label_noise_prob=p["ratio"] * 0.5,
                               box_noise_scale=p["scale"])
    return DenoisingConfig("dn", num_groups=p["scalar"], label_noise_prob=p["lns"], box_noise_scale=p["bns"])


def _group(case, config=None):
    """Our group for a stored case, built after the case's seed with the stored label table (host-owned)."""
    table = nn.Embedding(*case["table"].shape)
    with torch.no_grad():
        table.weight.copy_(case["table"])
    queries = DenoisingQueries(DATA["num_classes"], DATA["hidden_dim"], config or _config(case),
                               indicator=case["mode"] == "dn", label_enc=table)
    torch.manual_seed(case["seed"])
    group = queries(case["targets"], len(case["targets"]), torch.device("cpu"))
    return group, torch.rand(4)


@pytest.mark.parametrize("case", CASES, ids=[f"{c['mode']}-{c['seed']}" for c in CASES])
def test_group_equals_the_official_function(case):
    group, next_draw = _group(case)
    assert torch.equal(next_draw, case["next_draw"])  # the same draws were consumed, in the same amount
    pad = case["pad_size"]
    assert group.size == pad and group.meta["num_groups"] == case["num_groups"]
    if pad == 0:
        return
    assert torch.equal(group.tgt, case["content"])  # noised labels (and padding) exactly
    # Anchors: identical logits; the sigmoid of the host may differ by one float32 ulp (vectorised vs scalar).
    torch.testing.assert_close(group.reference, case["anchor_logits"].sigmoid(), rtol=0, atol=1e-6)
    # The official mask (DN part first) is ours with the denoising block moved to the front.
    q = case["num_queries"]
    ours = build_group_attn_mask(q, [group], torch.device("cpu"))
    order = torch.cat([torch.arange(q, q + pad), torch.arange(q)])
    assert torch.equal(ours[order][:, order], case["mask"])
    for (slots, gt), positives, t in zip(group.meta["indices"], case["positives"], case["targets"]):
        assert torch.equal(slots, positives)
        assert torch.equal(gt, torch.arange(len(t["labels"])).repeat(case["num_groups"]))
    assert group.meta["num_boxes"] == case["num_tgt"]  # one process: DINO's num_boxes x G, DN-DETR's count


# ------------------------------------------------------------------------------------- group count
@pytest.mark.parametrize("budget, max_gt, groups", [
    (100, 7, 14), (100, 101, 1), (50, 7, 7), (50, 60, 1),  # 2 * dn_number >= 100: a budget, dn_number // S
    (49, 7, 98), (10, 7, 20), (10, 1, 20), (1, 30, 2), (0, 3, 1),  # below: a fixed 2 * dn_number groups
    (100, 0, 1), (10, 0, 1),  # no GT in the batch
])
def test_dino_group_count_rule(budget, max_gt, groups):
    assert DenoisingConfig("cdn", budget=budget).layout(max_gt) == (groups, max_gt)


@pytest.mark.parametrize("budget, max_gt, groups", [(49, 7, 7), (10, 7, 1), (10, 20, 1), (100, 7, 14)])
def test_always_budget_rule(budget, max_gt, groups):
    assert DenoisingConfig("cdn", budget=budget, always_budget=True).layout(max_gt) == (groups, max_gt)


def test_dn_detr_group_count_is_fixed():
    assert DenoisingConfig("dn", num_groups=5).layout(40) == (5, 40)
    assert DenoisingConfig("dn", num_groups=5).layout(0) == (5, 0)


# ------------------------------------------------------------------------------- opt-in flags
def _same_group(a, b):
    assert torch.equal(a[1], b[1])  # the same generator consumption
    ga, gb = a[0], b[0]
    assert torch.equal(ga.tgt, gb.tgt) and torch.equal(ga.reference, gb.reference)
    assert torch.equal(ga.attn_mask, gb.attn_mask) and ga.meta["num_boxes"] == gb.meta["num_boxes"]
    assert len(ga.meta["indices"]) == len(gb.meta["indices"])
    for (slots_a, gt_a), (slots_b, gt_b) in zip(ga.meta["indices"], gb.meta["indices"]):
        assert torch.equal(slots_a, slots_b) and torch.equal(gt_a, gt_b)
    assert (ga.meta["valid"] is None) == (gb.meta["valid"] is None)
    assert ga.meta["valid"] is None or torch.equal(ga.meta["valid"], gb.meta["valid"])


def _with(case, **changes):
    return DenoisingConfig(**{**_config(case).__dict__, **changes})


def test_always_budget_changes_only_the_group_count():
    case = CASES[0]  # dn_number 50, S = 3
    _same_group(_group(case, _with(case, always_budget=True)), _group(case))  # >= 50: already a budget
    flagged = _group(case, _with(case, budget=24, always_budget=True))  # 24 // 3 = 8 groups (official: 48)
    assert flagged[0].meta["num_groups"] == 8 and _with(case, budget=24).layout(3) == (48, 3)
    _same_group(flagged, _group(case, _with(case, budget=4)))  # the official group of 8 groups (2 * 4)


def test_cap_is_off_by_default_and_only_caps():
    case = CASES[0]
    assert _config(case).max_queries == 0
    _same_group(_group(case, _with(case, max_queries=10_000)), _group(case))  # a cap that does not bind
    capped = _group(case, _with(case, max_queries=24))  # 2 S = 6 slots per group: 4 groups
    assert capped[0].size == 24
    _same_group(capped, _group(case, _with(case, budget=2)))  # the official group of 4 groups (2 * 2)
    dn = CASES[4]  # DN-DETR, S = 3
    _same_group(_group(dn, _with(dn, max_queries=7)), _group(dn, _with(dn, num_groups=2)))


def test_flags_reach_the_config():
    args = tiny_args("--with_box_refine", "--two_stage", "--use_dn", "--contrastive", "--dn_number", "30",
                     "--dn_always_budget", "--dn_max_queries", "64")
    _, criterion, _ = build_model(args)
    cfg = criterion.addons[0].queries.config
    assert (cfg.mode, cfg.budget, cfg.always_budget, cfg.max_queries) == ("cdn", 30, True, 64)
    _, criterion, _ = build_model(tiny_args("--with_box_refine", "--two_stage", "--use_dn", "--contrastive"))
    cfg = criterion.addons[0].queries.config
    assert (cfg.always_budget, cfg.max_queries, cfg.label_noise_prob) == (False, 0, 0.25)


# ------------------------------------------------------------------------------- interface
class _StandIn(nn.Module):
    """A tiny host that owns the label table, as the official DINO and DN-DETR models do."""

    capabilities = frozenset({"anchor_groups"})

    def __init__(self, width: int, indicator: bool) -> None:
        super().__init__()
        self.reserved_content_channels = int(indicator)
        self.label_enc = nn.Embedding(6, width)
        self.head = nn.Linear(4, 4)

    @property
    def label_table(self):
        return getattr(self, "label_enc", None)


def _enc(batch=2):
    z = torch.zeros(batch, 3, 32)
    return EncoderOutput(z, z[..., 0].bool(), torch.tensor([[1, 3]]), torch.ones(batch, 1, 2), 8)


def test_no_targets_no_group():
    dn = Denoising.from_args(tiny_args("--use_dn", "--contrastive"), _StandIn(32, False))
    torch.manual_seed(0)
    assert dn.query_groups(_enc(), StepContext(targets=None)) == []
    after = torch.rand(2)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(2))  # nothing drawn


@pytest.mark.parametrize("flags, width, indicator", [(("--use_dn", "--contrastive"), 32, False),
                                                     (("--use_dn",), 31, True)])
def test_host_owned_table_is_used_without_duplicate_keys(flags, width, indicator):
    host = _StandIn(width, indicator)
    addons = build_addons(tiny_args(*flags), host, enabled_addons(tiny_args(*flags)))
    assert [a.name for a in addons] == ["dn"] and addons[0].module() is None
    assert sorted(host.state_dict()) == ["head.bias", "head.weight", "label_enc.weight"]
    assert addons[0].queries.table is host.label_enc and not list(addons[0].queries.parameters())
    t = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]])}]
    (group,) = addons[0].query_groups(_enc(1), StepContext(targets=t))
    assert group.tgt.shape[-1] == 32
    group.tgt.sum().backward()
    assert host.label_enc.weight.grad is not None and host.label_enc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("flags, width", [(("--use_dn", "--contrastive"), 31), (("--use_dn",), 32)])
def test_host_table_of_the_wrong_width_is_refused(flags, width):
    with pytest.raises(ValueError, match="label_enc"):
        Denoising.from_args(tiny_args(*flags), _StandIn(width, "--contrastive" not in flags))


def test_without_a_host_table_the_addon_owns_one():
    host = _StandIn(32, False)
    del host.label_enc
    args = tiny_args("--use_dn", "--contrastive")
    addons = build_addons(args, host, enabled_addons(args))
    assert "addons.dn.label_enc.weight" in host.state_dict()
    assert addons[0].queries.table is host.addons.dn.label_enc
