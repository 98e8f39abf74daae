"""Box conventions and GIoU."""
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
