"""models/mirror_check.py: each voxel's partner across the midline, and the check of detected lesions."""
import math

import numpy as np
import pytest

from models.detect_lesions import detect_lesions
from models.mirror_check import DETECT_MIRROR_RATIO, MASK_MIRROR_RATIO, mirror_filter, mirror_maps
from tests.test_invariance import back_to, reorient

SHAPE = (44, 50, 40)
ZOOMS = 2.0
YAW = math.radians(9)  # the head is turned: the midline is not a voxel plane
CENTRE = np.array([3.0, -4.0, 2.0])  # and not at the centre of the grid (mm)
BILATERAL = [(16.0, 22.0, -8.0), (-16.0, 22.0, -8.0)]  # a bright pair, mirror images of each other
UNILATERAL = (12.0, -24.0, 10.0)  # a bright spot on one side only


def _head_coordinates(affine):
    """Coordinates (mm) of every voxel in the head's own frame: x across the midline."""
    idx = np.indices(SHAPE).reshape(3, -1)
    world = (affine[:3, :3] @ idx + affine[:3, 3:4]).T - CENTRE
    rot = np.array([[math.cos(YAW), math.sin(YAW), 0], [-math.sin(YAW), math.cos(YAW), 0], [0, 0, 1]])
    return (world @ rot.T).reshape(*SHAPE, 3)


def _phantom():
    """A left-right symmetric brain (ellipsoid, two ventricles, a front-back gradient) with the bright
    pair and the one-sided spot; returns (trace, brain, spot masks, affine)."""
    affine = np.diag([ZOOMS, ZOOMS, ZOOMS, 1.0])
    affine[:3, 3] = -ZOOMS * (np.array(SHAPE) - 1) / 2.0
    h = _head_coordinates(affine)
    x, y, z = h[..., 0], h[..., 1], h[..., 2]
    brain = (x / 34) ** 2 + (y / 44) ** 2 + (z / 32) ** 2 <= 1.0
    trace = 100.0 + 0.3 * y + 8.0 * np.cos(z / 6.0)
    for sx in (-1, 1):
        trace[((x - sx * 9) / 5) ** 2 + (y / 14) ** 2 + ((z - 4) / 6) ** 2 <= 1] = 55.0  # ventricles
    spots = {}
    for name, (cx, cy, cz) in (("left", BILATERAL[0]), ("right", BILATERAL[1]), ("one-sided", UNILATERAL)):
        spots[name] = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= 3.1 ** 2
        trace[spots[name]] = 185.0
    return np.where(brain, trace, 0.0).astype(np.float32), brain, spots, affine


@pytest.fixture(scope="module")
def phantom():
    trace, brain, spots, affine = _phantom()
    return trace, brain, spots, affine, mirror_maps(trace, brain, affine)


def test_partner_of_a_voxel_is_its_mirror_image_across_the_tilted_midline(phantom):
    trace, brain, spots, _, (partner, index) = phantom
    paired = index >= 0
    assert partner.shape == index.shape == trace.shape and index.dtype == np.int64
    assert paired.sum() >= 0.9 * brain.sum() and not paired[~brain].any()
    assert brain.ravel()[index[paired]].all()  # partners lie in the brain
    # the nearest partner voxel of the left spot is in the right one, and back
    assert np.isin(index[spots["left"]], np.flatnonzero(spots["right"])).mean() > 0.5
    assert np.isin(index[spots["right"]], np.flatnonzero(spots["left"])).mean() > 0.5
    # the bright pair sees each other; the one-sided spot sees normal tissue
    assert np.median(partner[spots["left"]]) > 150 and np.median(partner[spots["right"]]) > 150
    assert 80 < np.median(partner[spots["one-sided"]]) < 130
    # away from the spots the partner matches the voxel (the phantom is symmetric)
    inner = paired & brain & ~np.any(list(spots.values()), axis=0)
    assert np.median(np.abs(partner[inner] - trace[inner])) < 5.0


def test_filter_keeps_one_sided_components_and_removes_those_as_bright_across(phantom):
    trace, brain, spots, _, maps = phantom
    mask = spots["left"] | spots["one-sided"]  # the right spot is as bright but not a lesion of the mask
    out, rows = mirror_filter(mask, trace, *maps, DETECT_MIRROR_RATIO)
    assert out.dtype == np.uint8
    assert np.array_equal(out > 0, spots["one-sided"])
    ratios = sorted(r["mirror_ratio"] for r in rows)
    assert ratios[0] < 1.15 and ratios[1] > DETECT_MIRROR_RATIO
    assert 1.5 < ratios[1] < 2.2  # 185 against about 100 across the midline
    # the mask's default ratio is lenient: the left spot (interpolated partners, 1.08-1.10 here) stays
    assert MASK_MIRROR_RATIO == 1.05 and int(mirror_filter(mask, trace, *maps)[0].sum()) == int(mask.sum())


def test_a_bilateral_pair_of_lesions_is_kept_even_when_one_is_dimmer(phantom):
    trace, brain, spots, _, maps = phantom
    dim = np.where(spots["right"], 150.0, trace).astype(np.float32)  # both thalami, one side fainter
    pair = spots["left"] | spots["right"]
    out, rows = mirror_filter(pair, dim, *maps, DETECT_MIRROR_RATIO)
    assert np.array_equal(out > 0, pair) and all(r["bilateral"] and r["kept"] for r in rows)
    # judged alone, the fainter one would go: its twin across is brighter
    out, rows = mirror_filter(spots["right"], dim, *maps, DETECT_MIRROR_RATIO, lesions=spots["right"])
    assert not out.any() and rows[0]["mirror_ratio"] < 1.0 and not rows[0]["bilateral"]
    assert int(mirror_filter(spots["one-sided"], trace, *maps, min_ratio=3.0)[0].sum()) == 0


def test_a_component_without_partners_in_the_brain_or_across_the_midline_is_kept(phantom):
    trace, brain, _, _, (partner, index) = phantom
    blob = np.zeros(SHAPE, bool)
    blob[20:23, 25:28, 18:21] = True
    out, rows = mirror_filter(blob, trace, partner, np.full(SHAPE, -1))  # no partner in the brain
    assert np.array_equal(out > 0, blob) and rows[0]["mirror_ratio"] is None and rows[0]["kept"]
    # a bright lesion across the midline is its own partner: not compared with itself, kept
    h = _head_coordinates(_phantom()[3])
    midline = brain & (np.abs(h[..., 0]) <= 4.5) & (np.abs(h[..., 1] - 30) <= 4.5) & (np.abs(h[..., 2]) <= 4.5)
    bright = np.where(midline, 190.0, trace).astype(np.float32)
    maps = mirror_maps(bright, brain, _phantom()[3])
    out, rows = mirror_filter(midline, bright, *maps, DETECT_MIRROR_RATIO)
    assert np.array_equal(out > 0, midline) and rows[0]["mirror_ratio"] is None


def test_storage_order_and_repeat_give_the_same_maps(phantom):
    trace, brain, spots, affine, (partner, index) = phantom
    again = mirror_maps(trace, brain, affine)
    assert np.array_equal(again[0], partner) and np.array_equal(again[1], index)
    mask = spots["left"] | spots["one-sided"]
    ref = mirror_filter(mask, trace, partner, index, DETECT_MIRROR_RATIO)[0]
    assert np.array_equal(ref > 0, spots["one-sided"])
    for codes in ("LPS", "SAR"):
        t2, a2 = reorient(trace, affine, codes)
        b2, _ = reorient(brain, affine, codes)
        m2, _ = reorient(mask, affine, codes)
        p2, i2 = mirror_maps(t2, b2, a2)
        assert np.array_equal(back_to(p2, a2, affine), partner), codes
        # the indices are of the other storage order; the check gives the same components
        assert np.array_equal(back_to(mirror_filter(m2, t2, p2, i2, DETECT_MIRROR_RATIO)[0], a2, affine), ref), codes


def test_detection_with_the_mirror_check(phantom):
    trace, brain, spots, affine, maps = phantom
    adc = np.where(brain, 0.8, 0.0)
    prob = np.full(SHAPE, 0.02, np.float32)
    mask = np.zeros(SHAPE, bool)
    for name in ("left", "one-sided"):
        adc[spots[name]], prob[spots[name]] = 0.5, 0.3  # restricted, faint; the right spot: only bright
    calls = []

    def lazy():
        calls.append(1)
        return maps

    plain, rows = detect_lesions(mask, prob, trace, adc, brain)
    assert len(rows) == 2 and all(r["kept"] for r in rows)
    checked, rows = detect_lesions(mask, prob, trace, adc, brain, mirror=lazy)
    assert calls == [1] and np.array_equal(checked > 0, spots["one-sided"])
    assert sorted(r["kept"] for r in rows) == [False, True]
    assert all(r["mirror_ratio"] is not None for r in rows)
    # with the right spot a lesion of the mask, the left one is its bilateral twin: kept
    both, rows = detect_lesions(spots["right"], prob, trace, adc, brain, mirror=lazy)
    assert np.array_equal(both > 0, spots["right"] | spots["left"] | spots["one-sided"])
    # no candidate: the maps are not computed
    detect_lesions(mask, np.zeros(SHAPE, np.float32), trace, adc, brain, mirror=lazy)
    assert calls == [1, 1]


def test_a_brain_too_small_to_register_pairs_nothing_and_keeps_everything():
    trace = np.full((8, 8, 8), 100.0, np.float32)
    brain = np.zeros((8, 8, 8), bool)
    brain[3:5, 3:5, 3:5] = True
    partner, index = mirror_maps(trace, brain, np.eye(4))
    assert (index == -1).all()
    out, rows = mirror_filter(brain, trace, partner, index)
    assert np.array_equal(out > 0, brain) and rows[0]["kept"] and rows[0]["mirror_ratio"] is None


def test_a_large_one_sided_lesion_does_not_pull_the_mirror_off_the_midline():
    """A bright infarct over a sixth of one hemisphere (the trace doubled): the partners elsewhere still
    match, and the infarct is far brighter than its partners."""
    trace, brain, _, affine = _phantom()
    h = _head_coordinates(affine)
    infarct = brain & (h[..., 0] > 8) & (np.abs(h[..., 1] + 5) < 16) & (np.abs(h[..., 2]) < 12)
    assert 0.05 < infarct.sum() / brain.sum() < 0.2
    bright = np.where(infarct, 2.0 * trace, trace).astype(np.float32)
    partner, index = mirror_maps(bright, brain, affine)
    paired = index >= 0
    assert paired.sum() >= 0.9 * brain.sum()
    across = np.zeros(SHAPE, bool)
    across.ravel()[index[infarct & paired]] = True  # where the infarct's partners are
    rest = paired & ~infarct & ~across
    assert np.median(np.abs(partner[rest] - bright[rest])) < 5.0
    out, rows = mirror_filter(infarct, bright, partner, index, DETECT_MIRROR_RATIO)
    assert np.array_equal(out > 0, infarct) and rows[0]["mirror_ratio"] > 1.7
