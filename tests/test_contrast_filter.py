"""Contrast check of predicted lesion components (``models/contrast_filter.py``)."""

from __future__ import annotations

import numpy as np

from models.contrast_filter import contrast_filter


def _scene():
    rng = np.random.default_rng(0)
    shape = (40, 40, 40)
    dwi = 100 + rng.normal(0, 2, shape)
    adc = 0.8 + rng.normal(0, 0.01, shape)
    brain = np.ones(shape, bool)
    mask = np.zeros(shape, np.uint8)
    # 1: acute lesion, bright trace and low ADC
    mask[5:9, 5:9, 5:9] = 1
    dwi[5:9, 5:9, 5:9] *= 1.8
    adc[5:9, 5:9, 5:9] *= 0.6
    # 2: T2 shine-through, bright trace with normal ADC
    mask[20:24, 5:9, 5:9] = 1
    dwi[20:24, 5:9, 5:9] *= 2.5
    # 3: low ADC without bright trace
    mask[5:9, 20:24, 5:9] = 1
    adc[5:9, 20:24, 5:9] *= 0.7
    # 4: a 1-voxel embolus, bright and restricted
    mask[30, 30, 30] = 1
    dwi[30, 30, 30] *= 1.6
    adc[30, 30, 30] *= 0.75
    return mask, dwi, adc, brain


def test_keeps_restricted_lesions_only():
    mask, dwi, adc, brain = _scene()
    out, rows = contrast_filter(mask, dwi, adc, brain)
    assert [r["kept"] for r in rows] == [True, False, False, True]
    assert out.dtype == np.uint8 and out.sum() == 64 + 1
    assert out[6, 6, 6] and out[30, 30, 30] and not out[21, 6, 6] and not out[6, 21, 6]
    assert rows[0]["dwi_ratio"] > 1.7 and rows[0]["adc_ratio"] < 0.65


def test_unit_free_and_does_not_touch_inputs():
    mask, dwi, adc, brain = _scene()
    before = mask.copy()
    a, _ = contrast_filter(mask, dwi, adc, brain)
    b, _ = contrast_filter(mask, dwi * 37.0, adc * 1000.0, brain)
    assert np.array_equal(a, b) and np.array_equal(mask, before)


def test_component_without_tissue_around_is_kept():
    mask = np.ones((6, 6, 6), np.uint8)
    out, rows = contrast_filter(mask, np.ones(mask.shape), np.ones(mask.shape), np.ones(mask.shape, bool))
    assert out.all() and rows[0]["kept"] and rows[0]["dwi_ratio"] is None


def test_excluded_voxels_are_not_tissue_of_the_shell():
    """A faint spot on the face of a bright, restricted lesion that is not part of ``mask``: judged against
    a shell that is mostly that lesion it fails; with the lesion in ``exclude`` the shell is the tissue
    beyond it, and it passes."""
    shape = (30, 30, 30)
    dwi, adc, brain = np.full(shape, 100.0), np.full(shape, 0.8), np.ones(shape, bool)
    lesion = np.zeros(shape, bool)
    lesion[8:20, 8:20, 8:20] = True
    spot = np.zeros(shape, bool)
    spot[18:20, 13:15, 13:15] = True  # inside the lesion's box, on its face
    lesion &= ~spot
    dwi[lesion], adc[lesion] = 250.0, 0.4
    dwi[spot], adc[spot] = 160.0, 0.6
    row = contrast_filter(spot, dwi, adc, brain)[1][0]
    assert not row["kept"] and row["dwi_ratio"] == 160.0 / 250.0
    out, rows = contrast_filter(spot, dwi, adc, brain, exclude=lesion)
    assert rows[0]["kept"] and rows[0]["dwi_ratio"] == 1.6 and rows[0]["adc_ratio"] == 0.6 / 0.8
    assert np.array_equal(out > 0, spot)  # the excluded voxels are not added to the mask
