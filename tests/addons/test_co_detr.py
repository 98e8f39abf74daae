"""Co-DETR add-on: group sizes and padding, isolation from the main queries, evaluation and exported weights
untouched, loss keys and weights, refusals, training steps (alone and with denoising), DDP with an image without GT."""
import sys

import pytest
import torch

from models import build_model
from models.addons import StepContext
from models.addons.co_detr.common import AuxHeadOutput
from models.addons.co_detr.queries import group_size, select_positives
from tests.conftest import tiny_args
from util.errors import FlagError
from util.misc import nested_tensor_from_tensor_list

TWO_STAGE = ["--with_box_refine", "--two_stage"]
PLUSPLUS = TWO_STAGE + ["--mixed_selection", "--look_forward_twice", "--dropout", "0"]
CO = ["--addons", "co_detr"]


def _build(*flags):
    torch.manual_seed(0)
    return build_model(tiny_args(*flags))


def _step(model, criterion, images, targets, providers=None):
    """A training forward + losses with the engine's calling convention."""
    samples = nested_tensor_from_tensor_list(images)
    ctx = StepContext(images=samples, targets=targets)
    model.train()
    out = model(samples, targets, ctx=ctx, providers=providers)
    return out, criterion(out, targets, ctx=ctx)


@pytest.fixture(scope="module")
def co_model():
    return _build(*TWO_STAGE, *CO, "--dropout", "0")  # no dropout: runs with and without groups draw the same


def _head_output(counts, total=40, num_classes=5):
    coords, labels, tgts = [], [], []
    for n in counts:
        lab = torch.full((total,), num_classes, dtype=torch.long)
        lab[:n] = torch.arange(n) % num_classes
        xy = torch.rand(total, 2) * 20
        coords.append(torch.cat([xy, xy + 10], 1))
        tgt = torch.zeros(total, 4)
        tgt[:n] = torch.tensor([1.0, 2.0, 30.0, 40.0])
        labels.append(lab)
        tgts.append(tgt)
    return AuxHeadOutput({}, coords, labels, tgts, None)


def test_group_size_and_padding_with_random_negatives():
    assert group_size([0, 0], 300) == 9 and group_size([3, 12], 300) == 12 and group_size([500, 2], 300) == 300
    out = _head_output([0, 3])
    sel = select_positives(out, [(50, 40), (50, 40)], 5, None)
    assert sel.boxes.shape == (2, 9, 4) and sel.num_pos == [0, 3]
    assert [len(t["labels"]) for t in sel.targets] == [0, 3]
    # positives first, as normalised cxcywh; padded entries are the head's own negatives (never positives)
    expected = out.coords[1][:3] / torch.tensor([40.0, 50.0, 40.0, 50.0])
    assert torch.allclose(sel.boxes[1, :3, :2], (expected[:, :2] + expected[:, 2:]) / 2)
    assert torch.allclose(sel.targets[1]["boxes"][0], torch.tensor([15.5 / 40, 21 / 50, 29 / 40, 38 / 50]))
    negatives = out.coords[1][3:] / torch.tensor([40.0, 50.0, 40.0, 50.0])
    neg_cx = (negatives[:, 0] + negatives[:, 2]) / 2
    assert all(bool((neg_cx - cx).abs().min() < 1e-6) for cx in sel.boxes[1, 3:, 0])
    # more positives than max_pos_coords: a random subset of exactly that many
    sel = select_positives(_head_output([30, 1]), [(50, 40)] * 2, 5, None, max_pos_coords=12)
    assert sel.boxes.shape == (2, 12, 4) and sel.num_pos == [12, 1]


def test_loss_groups_label_weight_one_box_weight_zero_for_padding(co_model, batch):
    model, criterion, _ = co_model
    images, targets = batch
    with torch.no_grad():
        out, _ = _step(model, criterion, images, targets)
    addon = criterion.addons[-1]
    groups = {g.suffix: g for g in addon.loss_groups(out, StepContext(targets=targets))}
    assert set(groups) == {"co_rcnn", "co_atss"}
    for name, g in groups.items():
        n = out["groups"][name]["pred_logits"].shape[1]
        assert n >= 9 and g.valid is None  # every entry's class is supervised (padding: background)
        assert len(g.indices[1][0]) == 0  # the image without GT: no box loss, only background
        p = len(g.targets[0]["labels"])
        assert torch.equal(g.indices[0][0], torch.arange(p)) and g.num_boxes == p


def test_weights_are_lambda1_and_lambda2_times_layers(co_model):
    _, criterion, _ = _build(*TWO_STAGE, *CO, "--lambda_1", "0.5", "--lambda_2", "3", "--num_dec_layer", "6")
    w = criterion.weight_dict
    assert w["loss_ce_co_atss"] == 2.0 * 0.5 and w["loss_bbox_0_co_rcnn"] == 5.0 * 0.5
    assert w["loss_atss_cls"] == 18 and w["loss_atss_giou"] == 36 and w["loss_atss_centerness"] == 18
    assert w["loss_rpn_cls"] == 18 and w["loss_rpn_bbox"] == 18 and w["loss_rcnn_cls"] == 18
    assert w["loss_rcnn_giou"] == 180
    assert co_model[1].weight_dict["loss_atss_giou"] == 2.0 * 2 * 2  # default L = --dec_layers (2 here)


@pytest.mark.slow
def test_positive_queries_hidden_from_and_blind_to_the_main_queries(co_model, batch):
    model, criterion, _ = co_model
    images, targets = batch
    atss_proj, main_proj = model.addons["co_detr"].queries.aux_pos_trans[1].bias, model.transformer.pos_trans.bias
    saved = [atss_proj.detach().clone(), main_proj.detach().clone()]
    with torch.no_grad():
        torch.manual_seed(1)
        a, _ = _step(model, criterion, images, targets)
        atss_proj.add_(0.5)  # the ATSS group's projection: the main queries and the R-CNN group must not move
        torch.manual_seed(1)
        b, _ = _step(model, criterion, images, targets)
        atss_proj.copy_(saved[0])
        main_proj.add_(0.5)  # the main queries' projection: the groups must not move
        torch.manual_seed(1)
        c, _ = _step(model, criterion, images, targets)
        main_proj.copy_(saved[1])
    assert not torch.equal(a["groups"]["co_atss"]["pred_logits"], b["groups"]["co_atss"]["pred_logits"])
    assert torch.equal(a["pred_logits"], b["pred_logits"])
    assert torch.equal(a["groups"]["co_rcnn"]["pred_logits"], b["groups"]["co_rcnn"]["pred_logits"])
    assert not torch.equal(a["pred_logits"], c["pred_logits"])
    for name in ("co_rcnn", "co_atss"):
        assert torch.equal(a["groups"][name]["pred_logits"], c["groups"][name]["pred_logits"])


@pytest.mark.slow
def test_main_queries_see_nothing_of_the_groups(co_model, batch):
    model, criterion, _ = co_model
    images, targets = batch
    with torch.no_grad():
        with_groups, _ = _step(model, criterion, images, targets)
        alone, _ = _step(model, criterion, images, targets, providers=())
    torch.testing.assert_close(with_groups["pred_logits"], alone["pred_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(with_groups["pred_boxes"], alone["pred_boxes"], rtol=0, atol=1e-6)


def test_evaluation_and_exported_weights_independent_of_the_addon(co_model, batch):
    model, _, _ = co_model
    base, base_criterion, _ = _build(*TWO_STAGE, "--dropout", "0")
    host = {k: v for k, v in model.state_dict().items() if not k.startswith("addons.")}
    for k, v in base.state_dict().items():  # the add-on's parameters are drawn after the host's
        assert torch.equal(host[k], v), k
    base.load_state_dict(host, strict=True)
    assert all(k.startswith("addons.co_detr.") for k in model.state_dict() if k not in host)
    images, _ = batch
    with torch.no_grad():
        ours = model.eval()(nested_tensor_from_tensor_list(images))
        theirs = base.eval()(nested_tensor_from_tensor_list(images))
    assert "groups" not in ours
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(ours[key], theirs[key])
    assert not any("co_" in k or "atss" in k or "rpn" in k for k in base_criterion.weight_dict)


@pytest.mark.parametrize("flags", [
    pytest.param(TWO_STAGE + CO, id="deformable"),
    pytest.param(PLUSPLUS + CO + ["--co_heads", "atss"], id="plusplus-atss", marks=pytest.mark.slow),
    pytest.param(TWO_STAGE + CO + ["--use_dn", "--contrastive", "--dn_number", "6"], id="deformable-cdn",
                 marks=pytest.mark.slow),
    pytest.param(["-m", "dino", "--num_queries", "8"] + CO, id="dino", marks=pytest.mark.slow),
    pytest.param(["-m", "dino", "--num_queries", "8", "--dn_number", "6"] + CO + ["--co_heads", "atss"],
                 id="dino-cdn-atss"),
    pytest.param(["-m", "dino", "--num_queries", "8", "--num_feature_levels", "5", "--dn_number", "6"] + CO,
                 id="dino-5scale", marks=pytest.mark.slow),
])
def test_training_step_every_parameter_gets_a_gradient(flags, batch):
    model, criterion, _ = _build(*flags)
    images, targets = batch
    out, losses = _step(model, criterion, images, targets)
    total = criterion.total_loss(losses)
    assert torch.isfinite(total)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    heads = criterion.addons[-1].heads
    for head in heads:
        assert f"loss_ce_co_{head}" in losses and f"loss_giou_0_co_{head}" in losses
    assert ("loss_atss_cls" in losses) == ("atss" in heads) and ("loss_rcnn_giou" in losses) == ("rcnn" in heads)
    if "--use_dn" in flags or "-m" in flags:
        assert "dn" in out["groups"]


def test_heads_only_without_positive_queries(batch):
    model, criterion, _ = _build(*TWO_STAGE, *CO, "--co_heads", "atss", "--no-with_pos_coord")
    images, targets = batch
    out, losses = _step(model, criterion, images, targets)
    assert "loss_atss_cls" in losses and not any("co_atss" in k for k in losses)
    criterion.total_loss(losses).backward()
    assert all(p.grad is not None for p in model.addons.parameters())


def test_roi_head_width_flag(batch):
    rcnn = _build(*TWO_STAGE, *CO)[0].addons.co_detr.rcnn  # the official 1024 by default
    assert rcnn.box_head.fc6.out_features == rcnn.box_head.fc7.out_features == rcnn.cls_score.in_features == 1024
    model, criterion, _ = _build(*TWO_STAGE, *CO, "--fc_out_channels", "32")
    rcnn = model.addons.co_detr.rcnn
    assert rcnn.box_head.fc7.out_features == rcnn.cls_score.in_features == rcnn.bbox_pred.in_features == 32
    _, losses = _step(model, criterion, *batch)
    assert torch.isfinite(losses["loss_rcnn_cls"]) and torch.isfinite(losses["loss_rcnn_giou"])


def test_atss_anchor_scale_flag(batch):
    assert _build(*TWO_STAGE, *CO)[0].addons.co_detr.atss.octave_base_scale == 8.0  # the official anchors
    model, criterion, _ = _build(*TWO_STAGE, *CO, "--co_heads", "atss", "--atss_octave_base_scale", "2")
    atss = model.addons.co_detr.atss
    assert atss.octave_base_scale == 2.0
    _, losses = _step(model, criterion, *batch)
    assert all(torch.isfinite(losses[k]) for k in ("loss_atss_cls", "loss_atss_giou", "loss_atss_centerness"))
    with pytest.raises(FlagError, match="atss_octave_base_scale"):
        _build(*TWO_STAGE, *CO, "--atss_octave_base_scale", "0")


@pytest.mark.parametrize("flags, message", [
    (["-m", "dab_deformable_detr"] + CO, "co_detr runs on"),
    (CO, "anchor"),  # one-stage deformable_detr: 2-d references
    (TWO_STAGE + CO + ["--co_heads"], "at least one"),
])
def test_refused_hosts_and_flags(flags, message):
    with pytest.raises(FlagError, match=message):
        build_model(tiny_args(*flags))


def _ddp_worker(rank, init_file, result_file):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model, criterion, _ = _build(*TWO_STAGE, *CO)
    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    images = [torch.randn(3, 64, 64, generator=g), torch.randn(3, 48, 56, generator=g)]
    empty = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    full = {"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.3, 0.2, 0.2]])}
    targets = [empty, empty] if rank == 1 else [full, empty]  # rank 1: no GT at all
    for _ in range(2):  # a parameter without gradient fails DDP at the next step
        samples = nested_tensor_from_tensor_list(images)
        ctx = StepContext(images=samples, targets=targets)
        out = ddp(samples, targets, ctx=ctx)
        loss = criterion.total_loss(criterion(out, targets, ctx=ctx))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({k: v.detach().clone() for k, v in model.addons.state_dict().items()}, f"{result_file}.{rank}")
    dist.barrier()  # no rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test on Linux")
def test_ddp_two_processes_with_an_image_without_gt(tmp_path, monkeypatch):
    import torch.multiprocessing as mp
    # restored after the test: later tests compare in-process runs with subprocess runs bitwise
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path / "w")), nprocs=2, join=True)
    w0, w1 = torch.load(f"{tmp_path}/w.0"), torch.load(f"{tmp_path}/w.1")
    for k in w0:  # the same update on both ranks: every gradient was all-reduced
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("flags", [TWO_STAGE, ["-m", "dino"]])
def test_sizes_and_level_shapes_reach_the_heads_from_the_host(flags):
    """The pyramid's level shapes and the images' sizes come from the host (the encoder's Python shapes, the
    batch's ``sizes``): the same values as the tensors say, read without a host-device synchronisation."""
    from models.addons.co_detr.pyramid import image_sizes
    from util.misc import NestedTensor
    from util.sync_counter import SyncCounter

    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 64, 48, generator=g), torch.randn(3, 40, 64, generator=g)]
    samples = nested_tensor_from_tensor_list(images)
    assert samples.sizes == ((64, 48), (40, 64)) and samples.to("cpu").sizes == samples.sizes
    with SyncCounter() as syncs:
        sizes = image_sizes(samples, None)
    assert syncs.total == 0 and sizes == image_sizes(NestedTensor(samples.tensors, samples.mask), None)
    model, _, _ = _build(*flags)
    seen = []
    model.train()
    model(samples, providers=[lambda enc: seen.append(enc)])
    enc = seen[0]
    assert enc.shapes is not None and [list(s) for s in enc.shapes] == enc.spatial_shapes.tolist()


def test_device_nms_path_trains_bitwise_as_the_host_path(batch, monkeypatch):
    """A whole Co-DETR step on the GPU's code path (the device NMS, the heads' one shared host copy) against the
    CPU's (torchvision's NMS per image): the same losses, gradients and generator state, bitwise."""
    from models.addons.co_detr import rcnn_rpn

    images, targets = batch

    def step(device_nms):
        monkeypatch.setattr(rcnn_rpn, "DEVICE_NMS", device_nms)
        model, criterion, _ = _build(*TWO_STAGE, *CO)
        torch.manual_seed(1)
        _, losses = _step(model, criterion, images, targets)
        criterion.total_loss(losses).backward()
        return losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, torch.get_rng_state()

    ref, device = step(False), step(True)
    assert set(ref[0]) == set(device[0]) and all(torch.equal(ref[0][k], device[0][k]) for k in ref[0])
    assert set(ref[1]) == set(device[1]) and all(torch.equal(ref[1][k], device[1][k]) for k in ref[1])
    assert torch.equal(ref[2], device[2])
