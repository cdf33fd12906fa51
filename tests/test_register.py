"""nodes/register.py: FLAIR -> DWI registration on the real demo case and on a synthetic known motion."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from bids_app.errors import InputError
from nodes import register as R

SES = Path(__file__).parents[1] / "bids_app/data/demo/isles22-sample/sub-strokecase0009/ses-0001"
FLAIR = SES / "anat/sub-strokecase0009_ses-0001_FLAIR.nii.gz"
DWI = SES / "dwi/sub-strokecase0009_ses-0001_dwi.nii.gz"


def nmi(a, b, mask, bins=32):
    """Normalised mutual information (H(A) + H(B)) / H(A, B) inside ``mask`` (1 = independent, 2 = identical)."""
    h, _, _ = np.histogram2d(a[mask], b[mask], bins=bins)
    p = h / h.sum()
    px, py = p.sum(1), p.sum(0)

    def ent(q):
        q = q[q > 0]
        return -(q * np.log(q)).sum()

    return (ent(px) + ent(py)) / ent(p.ravel())


def identity_resample(flair_file, dwi_file):
    """FLAIR on the DWI grid by the headers alone (no registration), linear."""
    f, d = nib.load(str(flair_file)), nib.load(str(dwi_file))
    fixed = R.nib_to_sitk(np.asarray(d.dataobj, np.float32), d.affine)
    moving = R.nib_to_sitk(np.asarray(f.dataobj, np.float32), f.affine)
    return R.sitk_to_array(sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def similarity(moved, dwi):
    mask = (dwi > np.percentile(dwi[dwi > 0], 20)) & (moved > 0)  # head voxels seen by both
    return nmi(moved, dwi, mask), float(np.corrcoef(moved[mask], dwi[mask])[0, 1])


@pytest.fixture(scope="module")
def rigid(tmp_path_factory):
    """The node in rigid mode on the demo case (run once for the module)."""
    out = tmp_path_factory.mktemp("rigid")
    res = R.RegisterFlair(flair_file=str(FLAIR), dwi_file=str(DWI), mode="rigid",
                          reportlets_dir=str(out / "rep")).run(cwd=str(out))
    vals = res.outputs.decisions["values"]
    assert (out / "rep" / "register.json").is_file() and vals["seconds"] > 0
    return {**vals, "flair_file": res.outputs.flair_file, "transform_file": res.outputs.transform_file,
            "metric_value": res.outputs.metric_value}


def test_rigid_demo_improves_similarity(rigid):
    dwi = np.asarray(nib.load(str(DWI)).dataobj, np.float32)
    reg_img = nib.load(rigid["flair_file"])
    assert reg_img.shape == dwi.shape and reg_img.get_data_dtype() == np.float32
    assert np.allclose(reg_img.affine, nib.load(str(DWI)).affine, atol=1e-4)
    base_nmi, base_r = similarity(identity_resample(FLAIR, DWI), dwi)
    reg_nmi, reg_r = similarity(np.asarray(reg_img.dataobj), dwi)
    assert reg_nmi > base_nmi and reg_r > base_r, (base_nmi, reg_nmi, base_r, reg_r)
    assert rigid["metric_final"] < rigid["metric_initial"]
    assert rigid["metric_value"] == rigid["metric_final"] and rigid["mode"] == "rigid"
    assert Path(rigid["transform_file"]).suffix == ".tfm"
    tx = sitk.ReadTransform(rigid["transform_file"])
    assert tx.GetNumberOfParameters() == 6


def test_nonrigid_on_demo(tmp_path, rigid):
    # fewer iterations than the node's defaults, to keep the test fast; same stages
    res = R.register_flair(FLAIR, DWI, None, "nonrigid", tmp_path, rigid_iterations=30,
                           affine_iterations=10, bspline_iterations=4)
    img = nib.load(res["flair_file"])
    dwi = np.asarray(nib.load(str(DWI)).dataobj, np.float32)
    assert img.shape == dwi.shape and img.get_data_dtype() == np.float32
    assert res["transform_file"].endswith(".h5")
    tx = sitk.ReadTransform(res["transform_file"])
    assert tx.GetNumberOfParameters() > 12  # affine + B-spline (8x8x8 mesh)
    assert set(res["stages"]) == {"rigid", "affine", "bspline"}
    assert res["metric_final"] < res["metric_initial"]
    nl_nmi, _ = similarity(np.asarray(img.dataobj), dwi)
    base_nmi, _ = similarity(identity_resample(FLAIR, DWI), dwi)
    assert nl_nmi > base_nmi, (base_nmi, nl_nmi)


def test_synthetic_rigid_motion_recovered(tmp_path):
    """DWI moved by a known rigid transform (7 deg, 6 mm) comes back within 1 mm / 1 degree, bitwise repeatably."""
    d = nib.load(str(DWI))
    data = np.asarray(d.dataobj, np.float32)
    fixed = R.nib_to_sitk(data, d.affine)
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in fixed.GetSize()])
    truth = sitk.Euler3DTransform(centre, np.radians(3.0), np.radians(-2.0), np.radians(6.0), (4.0, -3.0, 2.5))
    moved = sitk.Resample(fixed, fixed, truth, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    moving_file = tmp_path / "moved.nii.gz"
    nib.save(nib.Nifti1Image(R.sitk_to_array(moved), d.affine), str(moving_file))
    res = R.register_flair(moving_file, DWI, None, "rigid", tmp_path / "out", seed=1)
    again = R.register_flair(moving_file, DWI, None, "rigid", tmp_path / "again", seed=1)
    # deterministic: same seed and thread count -> bitwise identical transform and image
    assert sitk.ReadTransform(again["transform_file"]).GetParameters() == \
        sitk.ReadTransform(res["transform_file"]).GetParameters()
    assert np.array_equal(np.asarray(nib.load(res["flair_file"]).dataobj),
                          np.asarray(nib.load(again["flair_file"]).dataobj))
    est = sitk.ReadTransform(res["transform_file"])
    # est maps DWI points into the moved image; truth maps them back: truth(est(p)) = p
    brain = np.argwhere(data > np.percentile(data[data > 0], 50))[::50]
    err = [np.linalg.norm(np.subtract(truth.TransformPoint(est.TransformPoint(
        fixed.TransformContinuousIndexToPhysicalPoint([float(v) for v in p]))),
        fixed.TransformContinuousIndexToPhysicalPoint([float(v) for v in p]))) for p in brain]
    assert max(err) < 1.0, max(err)
    m = np.reshape(truth.GetMatrix(), (3, 3)) @ np.reshape(sitk.Euler3DTransform(est).GetMatrix(), (3, 3))
    angle = np.degrees(np.arccos(np.clip((np.trace(m) - 1) / 2, -1, 1)))
    assert angle < 1.0, angle


def test_no_overlap_is_input_error(tmp_path):
    f = nib.load(str(FLAIR))
    far = f.affine.copy()
    far[:3, 3] += (0.0, 0.0, 2000.0)
    moved = tmp_path / "far_flair.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(f.dataobj, np.float32), far), str(moved))
    with pytest.raises(InputError, match="does not overlap the DWI"):
        R.register_flair(moved, DWI, None, "rigid", tmp_path)


def test_bad_mode_and_mask_shape(tmp_path):
    with pytest.raises(ValueError):
        R.register_images(sitk.Image(8, 8, 8, sitk.sitkFloat32), sitk.Image(8, 8, 8, sitk.sitkFloat32), "elastic")
    bad = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), str(bad))
    with pytest.raises(InputError, match="brain mask shape"):
        R.register_flair(FLAIR, DWI, bad, "rigid", tmp_path)
