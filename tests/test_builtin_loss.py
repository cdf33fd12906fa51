"""Training loss of the built-in model (``models/builtin/loss.py``)."""

from __future__ import annotations

import pytest
import torch

monai_losses = pytest.importorskip("monai.losses")

from models.builtin.loss import LesionWeightedDiceCE, lesion_size_weights  # noqa: E402


def _two_lesions():
    y = torch.zeros(1, 1, 24, 24, 24)
    y[0, 0, 2:12, 2:12, 2:12] = 1  # 1000 voxels
    y[0, 0, 20, 20, 20:22] = 1  # a 2-voxel embolus
    return y


def test_weight_one_is_monai_dice_ce():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 16, 16, 16)
    y = (torch.rand(2, 1, 16, 16, 16) > 0.9).float()
    ref = monai_losses.DiceCELoss(sigmoid=True, batch=True, smooth_nr=1e-4, smooth_dr=1e-4)(logits, y)
    assert torch.allclose(LesionWeightedDiceCE(1.0)(logits, y), ref)


def test_weights_by_component_size():
    y = _two_lesions()
    w = lesion_size_weights(y, max_weight=4.0, ref_voxels=64.0)
    assert w.shape == y.shape
    assert float(w[0, 0, 0, 0, 0]) == 1.0  # background
    assert float(w[0, 0, 5, 5, 5]) == 1.0  # 1000 voxels: 64 / 1000 clipped to 1
    assert float(w[0, 0, 20, 20, 21]) == 4.0  # 2 voxels: 32 clipped to 4


def test_small_lesion_gets_more_gradient():
    y = _two_lesions()
    grads = []
    for weight in (1.0, 4.0):
        logits = torch.zeros_like(y, requires_grad=True)
        LesionWeightedDiceCE(weight)(logits, y).backward()
        grads.append(float(logits.grad[0, 0, 20, 20, 20].abs()) / float(logits.grad[0, 0, 5, 5, 5].abs()))
    assert grads[1] > 2.0 * grads[0]
