"""models/detect_lesions.py: faint components apart from the mask, kept when their contrast confirms them."""
import numpy as np
from scipy import ndimage

from models.detect_lesions import DETECT_LOW, detect_lesions
from models.postprocess import STRUCTURE_26
from tests.datasets import tissue_arrays

SHAPE = (26, 24, 22)


def _case():
    """A 3^3 lesion (probability 0.9), a faint restricted patch touching it, a faint restricted patch apart
    (found), a faint patch with normal contrast (not found), a restricted patch under the threshold and
    one outside the brain."""
    prob, trace, adc, brain, put = tissue_arrays(SHAPE, 0.02)
    put((slice(6, 9), slice(6, 9), slice(6, 9)), 0.9, 250.0, 0.4)       # lesion: 27 voxels
    put((slice(9, 10), slice(6, 9), slice(6, 9)), 0.3, 180.0, 0.5)      # touching it: left to growth
    put((slice(15, 17), slice(15, 17), slice(4, 5)), 0.3, 180.0, 0.55)  # apart, restricted: 4, found
    put((slice(15, 17), slice(4, 6), slice(15, 17)), 0.3, 105.0, 0.78)  # apart, normal contrast: 8, no
    put((slice(4, 6), slice(16, 18), slice(16, 18)), 0.07, 180.0, 0.5)  # restricted, probability 0.07
    put((slice(0, 1), slice(10, 12), slice(10, 12)), 0.3, 180.0, 0.5)   # outside the brain
    mask = prob >= 0.5
    return mask, prob, trace, adc, brain


def test_adds_restricted_components_apart_from_the_mask_only():
    mask, prob, trace, adc, brain = _case()
    out, rows = detect_lesions(mask, prob, trace, adc, brain)
    assert out.dtype == np.uint8 and int(out.sum()) == 27 + 4
    assert np.array_equal(out[mask], np.ones(27, np.uint8))  # the mask is kept as it is
    assert out[15, 15, 4] and not out[9, 7, 7] and not out[15, 4, 15] and not out[4, 16, 16]
    assert not out[0].any()
    assert ndimage.label(out, STRUCTURE_26)[1] == 2
    # two candidates apart from the mask; the restricted one is kept
    assert sorted((r["size"], r["kept"]) for r in rows) == [(4, True), (8, False)]
    kept = next(r for r in rows if r["kept"])
    assert kept["dwi_ratio"] >= 1.25 and kept["adc_ratio"] <= 0.95


def test_threshold_decides_which_faint_components_are_candidates():
    mask, prob, trace, adc, brain = _case()
    assert DETECT_LOW == 0.1
    out = detect_lesions(mask, prob, trace, adc, brain, low=0.05)[0]
    assert out[4, 16, 16] and int(out.sum()) == 27 + 4 + 8
    assert int(detect_lesions(mask, prob, trace, adc, brain, low=0.35)[0].sum()) == 27


def test_units_and_storage_order_do_not_change_the_result():
    mask, prob, trace, adc, brain = _case()
    ref = detect_lesions(mask, prob, trace, adc, brain)[0]
    assert np.array_equal(detect_lesions(mask, prob, trace * 7.0, adc / 1000.0, brain)[0], ref)

    def t(a):
        return np.ascontiguousarray(np.transpose(a[::-1, :, ::-1], (2, 0, 1)))
    assert np.array_equal(detect_lesions(t(mask), t(prob), t(trace), t(adc), t(brain))[0], t(ref))


def test_nothing_to_detect_and_an_empty_mask():
    mask, prob, trace, adc, brain = _case()
    out, rows = detect_lesions(mask, np.where(mask, prob, 0.0), trace, adc, brain)
    assert np.array_equal(out > 0, mask) and rows == []
    # with no mask, every restricted faint component is a candidate of its own
    out, rows = detect_lesions(np.zeros(SHAPE, bool), prob, trace, adc, brain)
    assert len(rows) == 3 and out[15, 15, 4] and out[7, 7, 7]
