"""models/grow_lesions.py: hysteresis growth confirmed by the contrast test, voxel by voxel."""
import numpy as np

from models.grow_lesions import grow_lesions
from models.postprocess import STRUCTURE_26
from tests.datasets import tissue_arrays
from scipy import ndimage

SHAPE = (24, 22, 20)


def _case():
    """A 4^3 lesion core, a one-voxel restricted rim on one face, a 5-voxel restricted tail from the rim,
    a low-probability patch with normal contrast, a restricted patch under ``low`` and a disconnected
    restricted patch."""
    prob, trace, adc, brain, put = tissue_arrays(SHAPE, 0.05)
    put((slice(8, 12), slice(8, 12), slice(8, 12)), 0.9, 250.0, 0.4)       # core: 64 voxels
    put((slice(12, 13), slice(8, 12), slice(8, 12)), 0.35, 180.0, 0.5)     # rim: 16, grows
    put((slice(13, 18), slice(9, 10), slice(9, 10)), 0.35, 180.0, 0.5)     # tail: 5, grows through rim
    put((slice(7, 8), slice(8, 12), slice(8, 12)), 0.35, 100.0, 0.8)       # normal contrast: no
    put((slice(8, 12), slice(12, 13), slice(8, 12)), 0.1, 180.0, 0.5)      # under low: no
    put((slice(2, 4), slice(2, 4), slice(2, 4)), 0.35, 180.0, 0.5)         # disconnected: no
    mask = prob >= 0.5
    return mask, prob, trace, adc, brain


def test_grows_only_into_connected_restricted_voxels_above_low():
    mask, prob, trace, adc, brain = _case()
    out, rows = grow_lesions(mask, prob, trace, adc, brain, low=0.3)
    assert out.dtype == np.uint8 and int(out.sum()) == 64 + 16 + 5
    assert rows == [{"size": 64, "added": 21}]
    assert out[17, 9, 9] and not out[7, 9, 9] and not out[9, 12, 9] and not out[2, 2, 2]
    assert ndimage.label(out, STRUCTURE_26)[1] == 1  # no component created
    # a low threshold above the rim's probability adds nothing
    assert int(grow_lesions(mask, prob, trace, adc, brain, low=0.4)[0].sum()) == 64


def test_brain_mask_bounds_the_growth():
    mask, prob, trace, adc, brain = _case()
    brain[15:, :, :] = False  # cuts the tail after two voxels
    out, rows = grow_lesions(mask, prob, trace, adc, brain, low=0.3)
    assert rows[0]["added"] == 16 + 2 and not out[15:].any()


def test_units_and_storage_order_do_not_change_the_result():
    mask, prob, trace, adc, brain = _case()
    ref = grow_lesions(mask, prob, trace, adc, brain)[0]
    # ADC in mm2/s instead of 1e-3 mm2/s, trace on another scale
    assert np.array_equal(grow_lesions(mask, prob, trace * 7.0, adc / 1000.0, brain)[0], ref)
    # flipped and transposed storage
    def t(a):
        return np.ascontiguousarray(np.transpose(a[::-1, :, ::-1], (2, 0, 1)))
    out = grow_lesions(t(mask), t(prob), t(trace), t(adc), t(brain))[0]
    assert np.array_equal(out, t(ref))


def test_empty_mask_and_components_without_a_shell():
    mask, prob, trace, adc, brain = _case()
    out, rows = grow_lesions(np.zeros(SHAPE, bool), prob, trace, adc, brain)
    assert not out.any() and rows == []
    # a component filling the whole brain has no tissue around it: left as it is
    full = brain.copy()
    out, rows = grow_lesions(full, np.ones(SHAPE), trace, adc, brain)
    assert np.array_equal(out > 0, full) and rows[0]["added"] == 0
