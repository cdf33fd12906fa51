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


def _brute_lesion_dice(prob, y, radius):
    """Per-component Dice on the component plus background within ``radius`` (chessboard), by scipy."""
    import numpy as np
    from scipy import ndimage

    lab, n = ndimage.label(y > 0.5, structure=np.ones((3, 3, 3)))
    out = []
    for k in range(1, n + 1):
        comp = lab == k
        region = ndimage.binary_dilation(comp, np.ones((3, 3, 3)), iterations=radius) & ((lab == 0) | comp)
        inter = prob[comp].sum()
        out.append(2 * inter / (prob[region].sum() + comp.sum() + 1e-4))
    return out


def test_lesion_wise_dice_matches_brute_force():
    from models.builtin.loss import lesion_wise_loss

    torch.manual_seed(1)
    y = _two_lesions()
    logits = torch.randn_like(y) * 2
    got = float(lesion_wise_loss(logits, y, radius=3))
    dices = _brute_lesion_dice(torch.sigmoid(logits)[0, 0].numpy(), y[0, 0].numpy(), 3)
    assert len(dices) == 2
    assert abs(got - (1 - sum(dices) / 2)) < 1e-5


def test_lesion_wise_dice_counts_each_lesion_once():
    from models.builtin.loss import lesion_wise_loss

    y = _two_lesions()
    big_only = torch.full_like(y, -20.0)
    big_only[0, 0, 2:12, 2:12, 2:12] = 20.0  # the infarct found, the 2-voxel embolus missed
    small_only = torch.full_like(y, -20.0)
    small_only[0, 0, 20, 20, 20:22] = 20.0  # the embolus found, the infarct missed
    # whatever their sizes, missing either lesion costs half of the term
    assert abs(float(lesion_wise_loss(big_only, y)) - 0.5) < 1e-3
    assert abs(float(lesion_wise_loss(small_only, y)) - 0.5) < 1e-3
    # the batch Dice barely notices the missed embolus
    batch = LesionWeightedDiceCE(1.0)
    assert float(batch(big_only, y)) < 0.01 < float(batch(small_only, y))


def test_lesion_wise_dice_near_and_far_false_positives():
    from models.builtin.loss import lesion_wise_loss

    y = torch.zeros(1, 1, 32, 32, 32)
    y[0, 0, 5:8, 5:8, 5:8] = 1
    exact = torch.where(y > 0, 20.0, -20.0)
    near, far = exact.clone(), exact.clone()
    near[0, 0, 9:11, 5:8, 5:8] = 20.0  # 2-3 voxels from the lesion
    far[0, 0, 25:27, 25:28, 25:28] = 20.0
    base = float(lesion_wise_loss(exact, y))
    assert base < 1e-3
    assert float(lesion_wise_loss(far, y)) == pytest.approx(base, abs=1e-6)
    assert float(lesion_wise_loss(near, y)) > 0.2


def test_lesion_wise_dice_without_lesions_is_zero_with_graph():
    from models.builtin.loss import lesion_wise_loss

    logits = torch.randn(2, 1, 8, 8, 8, requires_grad=True)
    loss = lesion_wise_loss(logits, torch.zeros(2, 1, 8, 8, 8))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_lesion_dice_weight_zero_keeps_the_old_loss():
    torch.manual_seed(2)
    logits = torch.randn(2, 1, 16, 16, 16)
    y = (torch.rand(2, 1, 16, 16, 16) > 0.95).float()
    old = LesionWeightedDiceCE(4.0)(logits, y)
    assert torch.equal(LesionWeightedDiceCE(4.0, lesion_dice_weight=0.0)(logits, y), old)
    assert float(LesionWeightedDiceCE(4.0, lesion_dice_weight=1.0)(logits, y)) > float(old)


def test_false_positive_terms_count_each_false_lesion_once():
    from models.builtin.loss import lesion_wise_loss

    y = torch.zeros(1, 1, 32, 32, 32)
    y[0, 0, 5:8, 5:8, 5:8] = 1
    exact = torch.where(y > 0, 20.0, -20.0)
    far = exact.clone()
    far[0, 0, 25:27, 25:28, 25:28] = 20.0  # one false lesion far from the true one
    touching = exact.clone()
    touching[0, 0, 8:12, 5:8, 5:8] = 20.0  # grows out of the true lesion: not an ISLES false positive
    assert float(lesion_wise_loss(far, y, fp_threshold=0.5)) == pytest.approx(0.5, abs=1e-3)
    assert float(lesion_wise_loss(touching, y, fp_threshold=0.5)) < 0.5
    assert float(lesion_wise_loss(touching, y, radius=0, fp_threshold=0.5)) < 1e-3
    # without lesions, only the false ones count; the gradient reaches their voxels and nothing else
    logits = torch.full((1, 1, 16, 16, 16), -20.0)
    logits[0, 0, 3:5, 3:5, 3:5] = 1.0
    logits.requires_grad_(True)
    loss = lesion_wise_loss(logits, torch.zeros_like(logits), fp_threshold=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(float(torch.sigmoid(torch.tensor(1.0))), abs=1e-5)
    assert bool((logits.grad[0, 0, 3:5, 3:5, 3:5] > 0).all())
    assert float(logits.grad.abs().sum()) == pytest.approx(float(logits.grad[0, 0, 3:5, 3:5, 3:5].abs().sum()))
