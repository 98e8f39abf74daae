"""Host-device synchronisations per training step (util/sync_counter.py, tools/count_syncs.py): a step of
the main models, with and without the add-ons, must not get more syncs than the figures below (README
"Benchmarks": before this was measured, 56-197 per step)."""
from __future__ import annotations

import logging

import pytest
import torch

from models.matcher import HungarianMatcher, run_stages, staged, to_host
from tools.count_syncs import per_step
from util.sync_counter import SyncCounter

SMALL = "--enc_layers 1 --dec_layers 2 --hidden_dim 32 --dim_feedforward 64 --num_queries 12 --lr_backbone 0"
# (flags, syncs per step at most): engine 1 (the losses' .tolist()), matching 1 (one device-to-host copy for
# every layer and group), denoising 1 (its label-flip nonzero), MS-DETR 1 more (its draws' sizes).
LIMITS = {
    "deformable_detr": ("", 2),
    "two_stage_refine": ("--with_box_refine --two_stage", 2),
    "two_stage_refine_dn": ("--with_box_refine --two_stage --use_dn", 3),
    "two_stage_refine_hybrid": ("--with_box_refine --two_stage --num_queries_one2many 24 --k_one2many 6", 2),
    "two_stage_refine_ms_detr": ("--with_box_refine --two_stage --use_ms_detr --use_aux_ffn", 3),
    "dab_deformable_detr": ("-m dab_deformable_detr", 2),
    "dino_cdn": ("-m dino --use_dn --contrastive --dn_number 4", 3),
    # OD-DETR: the teacher's stage queries for its auxiliary group are chosen on the host (one copy in the
    # forward), the teacher-guided matching shares the criterion's copy
    "two_stage_refine_od": ("--with_box_refine --two_stage --use_ema --addons od", 3),
    # Teach-DETR: its teacher-box matching of every layer, set and the encoder in one more copy
    "two_stage_refine_teach": ("--with_box_refine --two_stage --ensemble --ext_ann_files t=unused.json", 3),
    # Co-DETR: its heads in one more copy (the RPN's and the RoI head's assignments, the RoIs' levels, ATSS's
    # positives; the proposals' NMS on the device, util/nms.py)
    "two_stage_refine_co_detr": ("--with_box_refine --two_stage --addons co_detr", 3),
}
SLOW = {"two_stage_refine_dn", "two_stage_refine_hybrid", "two_stage_refine_ms_detr", "dab_deformable_detr",
        "dino_cdn", "two_stage_refine_od", "two_stage_refine_teach", "two_stage_refine_co_detr"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in LIMITS])
def test_syncs_per_step_do_not_grow(name):
    flags, limit = LIMITS[name]
    logging.disable(logging.INFO)
    try:
        n, four = per_step(f"{SMALL} {flags}", batch_size=2, image_size=64, rebuild=False)
    finally:
        logging.disable(logging.NOTSET)
    assert n <= limit, f"{name}: {n} syncs per step > {limit}; where (4 steps): {four.by_site()}"
    # no host tensor (an index made on the host) meets a device tensor: on a GPU a blocking upload, or an error
    assert not four.host_meets_device, f"{name}: {four.host_meets_device.most_common()}"


def test_counter_counts_reads_and_data_dependent_shapes():
    x = torch.arange(6.0)
    with SyncCounter() as syncs:
        x.sum().item()
        x[x > 2]
        x.nonzero()
        float(x[0])
        (x * 2).sum()  # not a sync
    assert syncs.total == 4 and syncs.counts["item"] == 1


def test_counter_finds_host_tensors_meeting_device_tensors():
    """Provenance: host-made indices (factories without device=, from_numpy, numpy arrays, results of host-only
    operations) into a device tensor are listed; moved ones, explicit devices and host-only work are not."""
    import numpy as np

    weights = torch.randn(5, 3)  # made before counting: a device tensor (like parameters and the batch)
    with SyncCounter() as syncs:
        i = torch.as_tensor([1, 2])
        weights[i]
        weights[np.array([0, 1])]
        weights.index_select(0, torch.from_numpy(np.array([1])))
        weights[i + 1]
        weights[torch.as_tensor([0, 1], device="cpu")]  # explicit device
        weights[torch.arange(2).to("cpu", non_blocking=True)]  # moved
        torch.arange(3) * 2  # host only
        weights * torch.tensor(2.0)  # a 0-d host tensor is a scalar
    found = syncs.host_meets_device
    assert sum(found.values()) == 4 and found[f"tests/test_sync_count.py:{_line('weights[i]')} __getitem__"] == 1
    assert torch.from_numpy(np.zeros(1)).dtype == torch.float64  # restored after counting


def _line(code: str) -> int:
    import inspect
    lines = inspect.getsource(test_counter_finds_host_tensors_meeting_device_tensors).splitlines()
    first = inspect.getsourcelines(test_counter_finds_host_tensors_meeting_device_tensors)[1]
    return first + next(k for k, line in enumerate(lines) if line.strip() == code)


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(3, 10, 4, generator=g), "pred_boxes": torch.rand(3, 10, 4, generator=g)}
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    return outputs, targets


def test_many_matchings_share_one_copy_and_equal_the_single_calls():
    matcher = HungarianMatcher()
    cases = [_case(s) for s in range(4)]
    alone = [matcher(o, t) for o, t in cases]
    with SyncCounter() as syncs:
        batched = run_stages([matcher.stages(o, t) for o, t in cases])
    assert syncs.total == 1  # the one .cpu()
    for a, b in zip(alone, batched):
        assert all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


def test_to_host_keeps_dtypes_shapes_and_bits():
    tensors = [torch.randn(3, 5), torch.tensor([True, False, True]), torch.arange(7), torch.zeros(0, 4),
               torch.randn(2, 2).double(), torch.tensor(3, dtype=torch.int32), torch.randn(3, 4).t(),  # strided
               torch.randn(5).bfloat16(), torch.randn(2, 3, requires_grad=True), torch.arange(5)[::2],
               torch.tensor([False]), torch.randn(4, 1).half()]
    with SyncCounter() as syncs:
        host = to_host(tensors)
    assert syncs.total == 1
    for a, b in zip(tensors, host):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.detach(), b) and not b.requires_grad
    tensors[0].zero_()  # copies, not views of the inputs (on the CPU too), also for a single tensor
    (single,) = to_host([tensors[2]])
    tensors[2].zero_()
    assert host[0].abs().sum() > 0 and torch.equal(single, torch.arange(7))


def test_a_subclass_that_overrides_the_call_is_not_staged():
    class Custom(HungarianMatcher):
        def forward(self, outputs, targets):
            return super().forward(outputs, targets)

    assert staged(HungarianMatcher()) is not None and staged(Custom()) is None
    assert staged(lambda o, t: []) is None


def test_batched_costs_equal_the_per_image_loop():
    """The GPU's batched cost matrix ([B, Q, sum G] then the diagonal blocks) against the per-image loop
    (the CPU's); equal up to the CPU's rounding of vectorised functions, with and without ``valid``."""
    matcher = HungarianMatcher()
    for seed in range(3):
        outputs, targets = _case(seed)
        outputs["valid"] = torch.rand(3, 10, generator=torch.Generator().manual_seed(seed)) > 0.3
        for out in (outputs, {k: v for k, v in outputs.items() if k != "valid"}):
            per_image, batched = matcher.costs(out, targets), matcher.costs(out, targets, batched=True)
            assert per_image.shape == batched.shape and torch.allclose(per_image, batched, rtol=1e-6, atol=1e-6)


def _layers(seed: int, n: int = 3):
    """n prediction sets (a group's decoder layers) against the same targets, with and without ``valid``."""
    outputs, targets = _case(seed)
    g = torch.Generator().manual_seed(100 + seed)
    layers = [{"pred_logits": torch.randn(3, 10, 4, generator=g), "pred_boxes": torch.rand(3, 10, 4, generator=g),
               "valid": outputs["valid"] if "valid" in outputs else torch.rand(3, 10, generator=g) > 0.3}
              for _ in range(n)]
    return layers, targets


@pytest.mark.parametrize("with_valid", [True, False])
def test_all_layers_in_one_matching_equal_the_layer_by_layer_matching(with_valid):
    """``layer_stages`` (the criterion's: one generator, on a GPU one cost computation for every layer of a group)
    against each layer's own ``stages``: the CPU path's costs bitwise, the GPU's batched costs up to the CPU's
    rounding of vectorised functions, and the same indices either way."""
    matcher = HungarianMatcher()
    for seed in range(3):
        layers, targets = _layers(seed)
        if not with_valid:
            layers = [{k: v for k, v in o.items() if k != "valid"} for o in layers]
        single = [matcher.costs(o, targets) for o in layers]
        assert torch.equal(matcher.layer_costs(layers, targets), torch.cat(single))
        batched = matcher.layer_costs(layers, targets, batched=True)
        assert torch.allclose(batched, torch.cat(single), rtol=1e-6, atol=1e-6)
        alone = [matcher(o, targets) for o in layers]
        with SyncCounter() as syncs:
            together = run_stages([matcher.layer_stages(layers, targets)])[0]
        assert syncs.total == 1 and len(together) == len(layers)
        for a, b in zip(alone, together):
            assert all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


def test_layer_costs_fall_back_to_single_calls_when_shapes_differ():
    matcher = HungarianMatcher()
    layers, targets = _layers(0)
    layers[1] = {"pred_logits": layers[1]["pred_logits"][:, :7], "pred_boxes": layers[1]["pred_boxes"][:, :7]}
    expected = torch.cat([matcher.costs(o, targets, batched=True) for o in layers])
    assert torch.equal(matcher.layer_costs(layers, targets, batched=True), expected)
    no_targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 3
    assert matcher.layer_costs(_layers(1)[0], no_targets, batched=True).numel() == 0


def test_criterion_losses_with_the_gpu_layer_batching_are_the_same(monkeypatch):
    """A training step's losses with every group's layers matched by the GPU path (forced here on the CPU): the
    losses depend on the costs only through the indices, so they are bitwise those of the CPU path."""
    from models import build_model
    from tests.conftest import tiny_args
    from util.misc import nested_tensor_from_tensor_list

    def losses():
        torch.manual_seed(0)
        model, criterion, _ = build_model(tiny_args("--with_box_refine", "--two_stage", "--num_queries_one2many",
                                                    "16", "--k_one2many", "2"))
        g = torch.Generator().manual_seed(0)
        images = [torch.randn(3, 64, 64, generator=g), torch.randn(3, 48, 56, generator=g)]
        targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[.5, .5, .3, .3], [.3, .3, .2, .2]])},
                   {"labels": torch.tensor([0]), "boxes": torch.tensor([[.4, .6, .2, .3]])}]
        model.train()
        return criterion(model(nested_tensor_from_tensor_list(images), targets), targets)

    plain = losses()
    calls = []
    original = HungarianMatcher.layer_costs

    def forced(self, layers, targets, batched=None):
        calls.append(len(layers))
        return original(self, layers, targets, batched=True)

    monkeypatch.setattr(HungarianMatcher, "layer_costs", forced)
    batched = losses()
    assert sorted(calls) == [2, 2]  # the main queries' and the one-to-many group's 2 decoder layers, once each
    assert plain.keys() == batched.keys()
    assert all(torch.equal(plain[k], batched[k]) for k in plain)


def test_a_subclass_that_overrides_stages_or_costs_is_matched_layer_by_layer():
    from models.matcher import layer_staged

    class OwnCosts(HungarianMatcher):
        def costs(self, outputs, targets, batched=None):
            return super().costs(outputs, targets, batched)

    class OwnStages(HungarianMatcher):
        def stages(self, outputs, targets):
            return (yield from super().stages(outputs, targets))

    assert layer_staged(HungarianMatcher()) is not None
    assert layer_staged(OwnCosts()) is None and layer_staged(OwnStages()) is None


def test_counter_counts_blocking_uploads():
    """Blocking host-to-device copies wait for the device on a GPU: counted as ``upload NAME``. Non-blocking copies
    of host tensors, and host-only work, are not."""
    weights = torch.randn(4)  # made before counting: a device tensor
    with SyncCounter() as syncs:
        weights.new_tensor([1.0, 2.0, 3.0, 4.0])  # host data onto the device
        torch.tensor([1.0, 2.0], device=weights.device)
        torch.as_tensor([1, 2]).to(weights.device)  # a host tensor moved, blocking
        torch.zeros(2, device=weights.device).copy_(torch.as_tensor([1.0, 2.0]))
        torch.as_tensor([1, 2]).to(weights.device, non_blocking=True)  # not a sync
        torch.as_tensor([1.0]).new_tensor([3.0])  # host only
        weights * 2.0
    assert syncs.total == 4 and syncs.counts["upload new_tensor"] == 1 and syncs.counts["upload to"] == 1
    assert syncs.counts["upload tensor"] == 1 and syncs.counts["upload copy_"] == 1 and sum(syncs.uploads.values()) == 4


@pytest.mark.parametrize("compute_losses,per_batch", [(True, 2), (False, 1)])
def test_evaluation_syncs_per_batch(tmp_path, compute_losses, per_batch):
    """engine.evaluate: the criterion's matching (with losses) and ONE copy of the batch's loss values, image ids
    and detections (was a float() per loss term, an item() per image and three copies per image)."""
    from torch.utils.data import DataLoader

    import datasets
    from engine import evaluate
    from flags import finalize_args, get_args_parser
    from models import build_model
    from tests.conftest import synthetic_flags
    from util.misc import collate_fn

    args = finalize_args(get_args_parser().parse_args(synthetic_flags(tmp_path, "out", "--with_box_refine",
                                                                      "--two_stage")))
    model, criterion, post = build_model(args)
    dataset = datasets.build_dataset("val", args)
    batches = list(DataLoader(dataset, batch_size=2, collate_fn=collate_fn))  # data loading is not counted
    logging.disable(logging.INFO)
    try:
        with SyncCounter() as syncs:
            stats, _ = evaluate(model, criterion, post, batches, datasets.get_coco_api_from_dataset(dataset),
                                torch.device("cpu"), print_freq=100, compute_losses=compute_losses)
    finally:
        logging.disable(logging.NOTSET)
    assert syncs.total == per_batch * len(batches), syncs.by_site()
    assert not syncs.host_meets_device and len(stats["coco_eval_bbox"]) == 12
    assert ("loss" in stats) == compute_losses
