"""Box conventions and GIoU."""
import pytest
import torch

from util.box_ops import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    elementwise_generalized_box_iou,
    generalized_box_iou,
)


def test_cxcywh_xyxy_round_trip():
    boxes = torch.rand(50, 4) * 0.5 + 0.1
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes, atol=1e-6)
    assert torch.equal(box_cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.2, 0.4]])), torch.tensor([[0.4, 0.3, 0.6, 0.7]]))


def test_giou_bounds_and_identity():
    a = box_cxcywh_to_xyxy(torch.rand(20, 4) * 0.5 + 0.1)
    b = box_cxcywh_to_xyxy(torch.rand(30, 4) * 0.5 + 0.1)
    g = generalized_box_iou(a, b)
    assert g.shape == (20, 30) and (g <= 1).all() and (g >= -1).all()
    assert torch.allclose(torch.diag(generalized_box_iou(a, a)), torch.ones(20))
    iou, _ = box_iou(a, b)
    assert (g <= iou + 1e-6).all()


def test_elementwise_giou_equals_diagonal():
    a = box_cxcywh_to_xyxy(torch.rand(25, 4) * 0.5 + 0.1)
    b = box_cxcywh_to_xyxy(torch.rand(25, 4) * 0.5 + 0.1)
    assert torch.equal(elementwise_generalized_box_iou(a, b), torch.diag(generalized_box_iou(a, b)))


def test_giou_known_values():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]])  # disjoint: IoU 0, hull 3, union 2 -> -1/3
    assert torch.allclose(generalized_box_iou(a, b), torch.tensor([[-1 / 3]]))


def test_generalized_box_iou_eps_is_the_idea_research_formula():
    """DAB-DETR, DN-DETR and DINO add eps to the union and the hull; eps 0 is the plain formula."""
    a = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.2, 0.3, 0.4, 0.9]])
    b = torch.tensor([[0.3, 0.2, 0.7, 0.5], [0.0, 0.0, 0.2, 0.2], [0.6, 0.6, 0.9, 0.8]])
    got = generalized_box_iou(a, b, eps=1e-3)
    for i in range(2):
        for j in range(3):
            (x0, y0, x1, y1), (u0, v0, u1, v1) = a[i].tolist(), b[j].tolist()
            inter = max(0.0, min(x1, u1) - max(x0, u0)) * max(0.0, min(y1, v1) - max(y0, v0))
            union = (x1 - x0) * (y1 - y0) + (u1 - u0) * (v1 - v0) - inter
            hull = (max(x1, u1) - min(x0, u0)) * (max(y1, v1) - min(y0, v0))
            want = inter / (union + 1e-3) - (hull - union) / (hull + 1e-3)
            assert got[i, j].item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert torch.equal(generalized_box_iou(a, b, eps=0.0), generalized_box_iou(a, b))


def test_idea_research_models_use_the_eps_giou():
    from flags import finalize_args, get_args_parser
    from models import build_model

    small = ["--backbone", "resnet18", "--backbone_from_scratch", "--hidden_dim", "32", "--nheads", "2",
             "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "32", "--num_queries", "5",
             "--device", "cpu"]
    for name, eps in (("deformable_detr", 0.0), ("dab_deformable_detr", 1e-6), ("dn_dab_deformable_detr", 1e-6),
                      ("dino", 1e-6), ("dab_detr", 1e-6), ("detr", 0.0), ("conditional_detr", 0.0)):
        args = finalize_args(get_args_parser().parse_args(["-m", name, *small]))
        _, criterion, _ = build_model(args)
        assert (criterion.giou_eps, criterion.matcher.giou_eps) == (eps, eps), name
