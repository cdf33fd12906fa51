"""The shipped built-in model on transformed versions of the real sample case (issue 3).

Each variant of the case goes through the participant steps (``tests.test_invariance.run_chain``:
load, diffusion, units, conform, skull strip, normalize, segment). Its probability map is brought
back onto the native 2 mm grid (world space, trilinear) and scored against the expert mask with the
ISLES'22 metrics.

Variants (the model never saw this case in training):
- ``thick``: a clinical 0.9 x 0.9 x 5 mm acquisition (5 mm slabs averaged along the slice axis,
  in-plane upsampling), so the model grid is reached by resampling;
- ``head``: the skull-stripped case wrapped in a synthetic skull and scalp, so the brain extraction
  really runs before the model;
- ``oblique``: the same world content on a grid rotated by 20 and 10 degrees, in LPS order, with the
  ADC stored in 1e-6 mm2/s.

Measured with the shipped weights (release 6: sha256 661e4653..., 80^3 windows, brain-box inference;
probability >= 0.5, no post-processing; Dice / lesion F1 / TP / FP / predicted ml): native 0.49 / 0.43 / 6
/ 4 / 1.8; head 0.59 / 0.37 / 5 / 4 / 2.2; oblique 0.36 / 0.24 / 3 / 4 / 1.2; thick 0.41 / 0.27 / 3 / 1 / 1.2
(release 5: native 0.47 / 0.35 / 6 / 10 / 2.0; head 0.55 / 0.33 / 5 / 7 / 2.1; oblique 0.32 / 0.28 / 4 / 7
/ 2.0; thick 0.37 / 0.27 / 3 / 1 / 1.1). The
expert mask itself, sent through the same transform and back, scores 0.81 / 0.36 (thick) and 0.93 / 0.88
(oblique). On resampled inputs the model keeps most of its Dice but finds fewer of the
small lesions. These tests guard what it does keep: the main lesions found, Dice at least
``DICE_RATIO`` of the native one, lesion F1 within ``F1_MARGIN`` of the native one or at least
``F1_FLOOR`` (so a native gain alone cannot fail a variant that holds), no burst of false positives
(``FP_MARGIN``) and an absolute volume difference at most ``AVD_MARGIN_ML`` worse.

The app's own mask (the post-processing the weights recommend; now growth at 0.01) is also compared
with the plain 0.5 mask of the same input, both on the input's own grid (where the post-processing acts)
against the expert mask brought there by nearest neighbour: post-processing must not cost more than
``POST_DICE_LOSS`` Dice, add false positives, or worsen the volume difference by more than
``AVD_MARGIN_ML``, on the native case or any variant. (Until release 6 both masks were brought back to
the native 2 mm grid by nearest neighbour instead. There a one-voxel component of the 5 mm grid that no
2 mm voxel centre falls in was not counted in the plain mask, but was counted once grown: model card,
"Stage W".) Release 6 with growth at 0.01 (stage AE; Dice / FP / AVD, plain mask in brackets): native
0.653 / 4 / 0.70 (0.492 / 4 / 2.35), head 0.678 / 3 / 0.56 (0.592 / 4 / 1.96), oblique 0.574 / 5 / 0.64
(0.410 / 8 / 2.36), thick 0.617 / 1 / 1.11 (0.440 / 1 / 2.77); with growth at 0.05 (stage AC): native
0.646 / 4 / 1.04 (0.492 / 4 / 2.35), head 0.669 / 3 / 0.83 (0.592 / 4 / 1.96), oblique 0.563 / 5 / 0.95
(0.410 / 8 / 2.36), thick 0.611 / 1 / 1.28 (0.440 / 1 / 2.77); with growth at 0.2: native 0.610 / 4 / 1.58,
head 0.649 / 3 / 1.31, oblique 0.526 / 5 / 1.45, thick 0.580 / 1 / 1.72. The app mask's native-grid
figures, which the release floors use, are printed too (release 6, growth 0.01: head 0.678 / 0.44, oblique
0.579 / 0.41, thick 0.579 / 0.27 Dice / F1; growth 0.05: 0.669 / 0.44, 0.571 / 0.41, 0.567 / 0.27; growth 0.2:
0.649 / 0.44, 0.531 / 0.41, 0.555 / 0.27).

Bit-identical results for voxel order and ADC units alone are in ``tests/test_invariance.py``.
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to
from scipy import ndimage as ndi

from models.builtin import predictor as bp
from models.builtin.metrics import lesion_metrics
from nodes.skullstrip import synthetic_head
from tests.datasets import sample_case, save
from tests.test_invariance import reorient, run_chain

pytestmark = pytest.mark.skipif(not bp.DEFAULT_WEIGHTS.is_file(), reason="built-in weights not present")

DICE_RATIO = 0.3
F1_MARGIN = 0.12
F1_FLOOR = 0.22  # fixed before round H (2026-11-27), not fitted to any candidate
FP_MARGIN = 5
AVD_MARGIN_ML = 3.0
POST_DICE_LOSS = 0.05
VOXEL_ML = 0.008  # native 2 mm grid


def _thick(c):
    """0.9 x 0.9 mm in-plane, 5 mm slices along the third voxel axis, same world box."""
    z_sigma = (5.0 / 2.0) / 2.355  # 5 mm slab profile in 2 mm voxels (FWHM = slice thickness)
    dwi = ndi.gaussian_filter1d(c["dwi"], z_sigma, axis=2, mode="nearest")
    adc = ndi.gaussian_filter1d(c["adc"], z_sigma, axis=2, mode="nearest")
    src = c["affine"]
    zoom = np.array([0.9 / 2.0, 0.9 / 2.0, 5.0 / 2.0])
    shape = tuple(int(math.floor((n - 1) / z)) + 1 for n, z in zip(c["dwi"].shape, zoom))
    dst = src @ np.diag(list(zoom) + [1.0])
    out = {}
    for name, arr in (("dwi", dwi), ("adc", adc)):
        img = resample_from_to(nib.Nifti1Image(arr, src), (shape, dst), order=1, mode="constant", cval=0.0)
        out[name] = np.asarray(img.dataobj, dtype=np.float32)
    return out["dwi"], out["adc"], dst


def _head(c):
    pad = 10
    dwi = np.pad(c["dwi"], pad)
    adc = np.pad(c["adc"], pad)
    shift = np.eye(4)
    shift[:3, 3] = -pad
    return synthetic_head(dwi, (2.0, 2.0, 2.0), seed=5), adc, c["affine"] @ shift


def _oblique(c):
    a, b = math.radians(20), math.radians(10)
    rot = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]]) @ \
        np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    src = c["affine"]
    centre = src @ np.r_[(np.array(c["dwi"].shape) - 1) / 2.0, 1.0]
    shape = (128, 128, 96)
    lin = src[:3, :3] @ rot
    dst = np.eye(4)
    dst[:3, :3] = lin
    dst[:3, 3] = centre[:3] - lin @ ((np.array(shape) - 1) / 2.0)
    out = {}
    for name in ("dwi", "adc"):
        img = resample_from_to(nib.Nifti1Image(c[name], src), (shape, dst), order=1, mode="constant", cval=0.0)
        out[name] = np.asarray(img.dataobj, dtype=np.float32)
    dwi, aff = reorient(out["dwi"], dst, "LPS")
    adc, _ = reorient(out["adc"] * 1000.0, dst, "LPS")  # 1e-6 mm2/s
    return dwi, adc, aff


VARIANTS = {"thick": _thick, "head": _head, "oblique": _oblique}
_NATIVE: dict = {}


def _score(img, c, order=1):
    """Metrics against the expert mask on the native grid of a probability map (file or image on any
    grid; trilinear, >= 0.5) or, with ``order=0``, of a binary mask (nearest neighbour: the app mask's
    figures reported for the release floors)."""
    img = img if isinstance(img, nib.Nifti1Image) else nib.load(str(img))
    native = resample_from_to(img, (c["mask"].shape, c["affine"]), order=order, mode="constant", cval=0.0)
    return lesion_metrics(np.asarray(native.dataobj) >= 0.5, c["mask"] > 0, VOXEL_ML)


def _score_on_input_grid(img, c):
    """Metrics of a binary mask on its own grid (the grid the app's post-processing acts on), against
    the expert mask brought there by nearest neighbour. Bringing a mask to the 2 mm native grid instead
    can drop a one-voxel component of a 0.9 x 0.9 x 5 mm grid that no 2 mm voxel centre falls in, and
    keep it once grown: a false positive counted for the growth that it did not create."""
    img = img if isinstance(img, nib.Nifti1Image) else nib.load(str(img))
    gt = resample_from_to(nib.Nifti1Image(c["mask"].astype(np.uint8), c["affine"]), img, order=0,
                          mode="constant", cval=0)
    vox_ml = float(abs(np.linalg.det(img.affine[:3, :3]))) / 1000.0
    return lesion_metrics(np.asarray(img.dataobj) >= 0.5, np.asarray(gt.dataobj) > 0, vox_ml)


def _plain_mask(prob_file):
    """The plain 0.5 mask on the input's own grid: the app's mask without any post-processing, scored
    like the app's mask (``_score_on_input_grid``), not like the probabilities (trilinear interpolation
    smooths small components away and so counts fewer false positives)."""
    p = nib.load(str(prob_file))
    return nib.Nifti1Image((np.asarray(p.dataobj) >= 0.5).astype(np.uint8), p.affine)


def _assert_postprocessing_does_not_hurt(app, plain):
    assert app["dice"] >= plain["dice"] - POST_DICE_LOSS, (app, plain)
    assert app["fp"] <= plain["fp"], (app, plain)
    assert app["avd_ml"] <= plain["avd_ml"] + AVD_MARGIN_ML, (app, plain)


def _native(tmp_path_factory):
    if not _NATIVE:
        c = sample_case(1)
        folder = tmp_path_factory.mktemp("native")
        files = run_chain(save(c["dwi"], c["affine"], folder / "dwi.nii.gz"),
                          save(c["adc"], c["affine"], folder / "adc.nii.gz"), folder / "work")
        _NATIVE.update(case=c, metrics=_score(files["prob"], c), app=_score_on_input_grid(files["mask"], c),
                       plain=_score_on_input_grid(_plain_mask(files["prob"]), c))
    return _NATIVE


def test_app_postprocessing_holds_on_native_case(tmp_path_factory):
    ref = _native(tmp_path_factory)
    print(f"native app mask: {ref['app']}  plain: {ref['plain']}  (input grid)")
    _assert_postprocessing_does_not_hurt(ref["app"], ref["plain"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_model_holds_on_transformed_real_case(variant, tmp_path, tmp_path_factory):
    ref = _native(tmp_path_factory)
    c, m0 = ref["case"], ref["metrics"]
    dwi, adc, aff = VARIANTS[variant](c)
    files = run_chain(save(dwi, aff, tmp_path / "dwi.nii.gz"), save(adc, aff, tmp_path / "adc.nii.gz"),
                      tmp_path / "work")
    m = _score(files["prob"], c)
    print(f"{variant}: {m}  native: {m0}")
    assert m["tp"] >= 1, m
    assert m["dice"] >= DICE_RATIO * m0["dice"], (m, m0)
    assert m["lesion_f1"] >= min(m0["lesion_f1"] - F1_MARGIN, F1_FLOOR), (m, m0)
    assert m["fp"] <= m0["fp"] + FP_MARGIN, (m, m0)
    assert m["avd_ml"] <= m0["avd_ml"] + AVD_MARGIN_ML, (m, m0)
    app, plain = _score_on_input_grid(files["mask"], c), _score_on_input_grid(_plain_mask(files["prob"]), c)
    print(f"{variant} app mask: {_score(files['mask'], c, order=0)}  (native grid)")
    print(f"{variant} input grid: app mask {app}  plain: {plain}")
    _assert_postprocessing_does_not_hurt(app, plain)
