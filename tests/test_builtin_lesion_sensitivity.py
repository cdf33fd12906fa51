"""models/builtin/lesion_sensitivity.py: per-lesion rows (size, max probability, contrast) and their summary."""

from pathlib import Path

import numpy as np
import pytest

from models.builtin.lesion_sensitivity import lesion_rows, summarise

CASE = Path(__file__).resolve().parents[1] / "bids_app" / "data" / "demo" / "isles22-sample"


def _volume():
    trace = np.ones((20, 20, 20), np.float32)
    adc = np.full((20, 20, 20), 0.8, np.float32)
    label = np.zeros((20, 20, 20), bool)
    prob = np.zeros((20, 20, 20), np.float32)
    label[5, 5, 5:8] = True  # 3 voxels, trace 2x, ADC 0.5x: found
    trace[5, 5, 5:8], adc[5, 5, 5:8], prob[5, 5, 6] = 2.0, 0.4, 0.9
    label[14, 14, 14] = True  # 1 voxel, trace 1.5x, ADC 0.75x: missed
    trace[14, 14, 14], adc[14, 14, 14], prob[14, 14, 14] = 1.5, 0.6, 0.1
    return prob, label, trace, adc


def test_rows_give_size_probability_and_contrast():
    prob, label, trace, adc = _volume()
    rows = sorted(lesion_rows(prob, label, trace, adc, np.ones_like(label)), key=lambda r: r["size"])
    assert [r["size"] for r in rows] == [1, 3]
    assert rows[0]["max_prob"] == pytest.approx(0.1) and rows[1]["max_prob"] == pytest.approx(0.9)
    assert rows[1]["trace_ratio"] == pytest.approx(2.0) and rows[1]["adc_ratio"] == pytest.approx(0.5)
    assert rows[0]["trace_ratio"] == pytest.approx(1.5) and rows[0]["adc_ratio"] == pytest.approx(0.75)
    assert rows[0]["csf_share"] == 0.0 and rows[1]["csf_share"] == 0.0


def test_shell_is_the_second_ring_away_from_other_lesions_and_inside_the_brain():
    trace = np.ones((20, 20, 20), np.float32)
    adc = np.full((20, 20, 20), 0.8, np.float32)
    label = np.zeros((20, 20, 20), bool)
    label[10, 10, 10] = True  # lesion A: one voxel, trace 2x
    trace[10, 10, 10] = 2.0
    label[12:14] = True  # lesion B: a slab two voxels away, and its first ring (x = 11), both bright
    trace[11:14] = 5.0
    trace[10, 9:12, 9:12] = 2.0  # A's own first ring (partial volume): left out of its shell
    adc[9, 8, 8:13] = 3.0  # CSF in 5 of the 32 shell voxels
    brain = np.zeros_like(label)
    brain[9:] = True  # x < 9 is outside the brain
    prob = np.zeros_like(trace)
    rows = lesion_rows(prob, label, trace, adc, brain)
    a = [r for r in rows if r["size"] == 1]
    # A's shell: x = 9 and 10 at chessboard distance 2 (32 voxels of trace 1); without leaving out B and
    # its first ring (41 more voxels of the ring, trace 5) the median would be 5
    assert len(a) == 1 and a[0]["trace_ratio"] == pytest.approx(2.0)
    assert a[0]["csf_share"] == pytest.approx(5 / 32)
    # a lesion whose shell lies outside the brain is left out
    brain[:] = False
    brain[8:13, 8:13, 8:13] = True
    assert 1 in [r["size"] for r in lesion_rows(prob, label, trace, adc, brain)]
    brain[:] = False
    brain[9:12, 9:12, 9:12] = True
    assert lesion_rows(prob, label, trace, adc, brain) == []


def test_summary_bands():
    prob, label, trace, adc = _volume()
    s = summarise(lesion_rows(prob, label, trace, adc, np.ones_like(label)))
    assert s["all"] == {"n": 2, "found_0.5": 0.5, "found_0.2": 0.5}
    assert s["size"]["1-1"]["found_0.5"] == 0.0 and s["size"]["2-4"]["found_0.5"] == 1.0
    assert s["size"]["5-14"] == {"n": 0}
    assert s["small_contrast"]["trace 1.9-2.3 / adc 0.0-0.6"]["n"] == 1  # the 3-voxel lesion (2.0x, 0.5x)
    assert sum(v["n"] for v in s["small_contrast"].values()) == 1  # the 1-voxel one is not "small" (2-14)


def test_real_case_rows_agree_with_the_plain_mask():
    """On the demo case, through the app's input steps: one row per expert lesion with a shell, and the lesions
    with max probability >= 0.5 are exactly those the plain 0.5 mask of the same prediction touches."""
    from models.builtin.lesion_sensitivity import real_rows
    from models.builtin.metrics import label26
    from models.builtin.predictor import BuiltinPredictor
    from models.builtin.real_data import load_reference, prepare_case

    dwi = CASE / "sub-strokecase0009/ses-0001/dwi/sub-strokecase0009_ses-0001_dwi.nii.gz"
    adc = CASE / "sub-strokecase0009/ses-0001/dwi/sub-strokecase0009_ses-0001_adc.nii.gz"
    msk = CASE / "derivatives/sub-strokecase0009/ses-0001/sub-strokecase0009_ses-0001_msk.nii.gz"
    pred = BuiltinPredictor()
    seen = []
    predict = pred.predict
    pred.predict = lambda d, a: seen.append(predict(d, a)) or seen[-1]  # keep the one prediction made
    rows = real_rows(pred, dwi, adc, msk)
    assert len(seen) == 1
    dwi_n, _, affine = prepare_case(dwi, adc)
    gt = load_reference(msk, affine, dwi_n.shape)
    lab, n_gt = label26(gt)
    assert 0 < len(rows) <= n_gt and sum(r["size"] for r in rows) <= int(gt.sum())
    assert all(0.0 <= r["max_prob"] <= 1.0 and r["trace_ratio"] > 0 and r["adc_ratio"] > 0 for r in rows)
    assert all(0.0 <= r["csf_share"] <= 1.0 for r in rows)
    touched = {int(v) for v in np.unique(lab[(seen[0] >= 0.5) & gt])} - {0}
    sizes_touched = sorted(int((lab == v).sum()) for v in touched)
    assert sorted(r["size"] for r in rows if r["max_prob"] >= 0.5) == sizes_touched
