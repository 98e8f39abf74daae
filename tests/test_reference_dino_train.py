"""One training step of the official DINO-4scale with contrastive denoising (tests/data/reference/
dino_4scale_train.pt) is reproduced by ``-m dino`` (dino_4scale.pt's flags).

The file was made here (2026-12-05) like the other reference files: IDEA-Research/DINO @faa8520 with
config/DINO/DINO_4scale.py on CPU (its CUDA op replaced by the grid_sample core it ships, its denoising's
``.cuda()`` a no-op), the deterministic weights, dino_4scale.pt's images and targets, ``torch.manual_seed(seed)``
before the forward (the denoising noise follows it). Checked: the total (1e-4), every weighted term, denoising's
included (2e-5 relative: they agree to 4e-7 here, and a box noise 1 % off moves them by more; ours names the aux
layers' denoising terms ``loss_ce_0_dn`` where DINO says ``loss_ce_dn_0``), and every parameter's gradient norm
(1e-3 relative). As for dino_4scale.pt, the encoder's top-k
follows the official ranking where two tokens differ by float noise only.
"""
from __future__ import annotations

import re

import pytest
import torch

from tests.test_reference import REF_DIR, follow_reference_ranking, load_reference
from util.misc import nested_tensor_from_tensor_list

pytestmark = pytest.mark.skipif(not (REF_DIR / "dino_4scale_train.pt").is_file(), reason="reference file absent")


def _ours(key: str) -> str:
    key = key.replace("_interm", "_enc")
    return re.sub(r"_dn_(\d+)$", r"_\1_dn", key)


@pytest.mark.slow
def test_training_step_with_denoising_matches():
    ref, model, criterion, _ = load_reference("dino_4scale_train")
    model.train()
    samples = nested_tensor_from_tensor_list(ref["images"])
    follow_reference_ranking(model, ref, samples)
    torch.manual_seed(ref["seed"])
    outputs = model(samples, ref["targets"])
    losses = criterion(outputs, ref["targets"])
    total = criterion.total_loss(losses)
    total.backward()
    assert total.item() == pytest.approx(float(ref["total"]), rel=1e-4)
    weighted = {k: w for k, w in ref["weight_dict"].items() if w}
    assert sum("_dn" in k for k in weighted) == 18  # 3 terms x 6 decoder outputs
    for key, w in weighted.items():
        ours = _ours(key)
        assert criterion.weight_dict[ours] == w, key
        assert losses[ours].item() * w == pytest.approx(float(ref["losses"][key]) * w, rel=2e-5, abs=1e-6), key
    params = dict(model.named_parameters())
    assert set(ref["grad_norms"]) == {n for n, p in params.items() if p.requires_grad}
    for name, norm in ref["grad_norms"].items():
        grad = params[name].grad
        ours = 0.0 if grad is None else grad.norm().item()
        assert ours == pytest.approx(float(norm), rel=1e-3, abs=1e-7), name
    grad_norm = torch.stack([p.grad.norm() for p in params.values() if p.grad is not None]).norm()
    assert grad_norm.item() == pytest.approx(float(ref["grad_norm"]), rel=1e-4)
