"""Tests of nodes/conform.py: matching grids pass through, differing grids are resampled."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.affines import apply_affine, from_matvec

from bids_app.errors import InputError
from nodes.conform import ConformADC, conform_adc, grids_match

ROOT = Path(__file__).resolve().parents[1]
DWI_DIR = ROOT / "bids_app/data/demo/isles22-sample/sub-strokecase0009/ses-0001/dwi"
DWI = DWI_DIR / "sub-strokecase0009_ses-0001_dwi.nii.gz"
ADC = DWI_DIR / "sub-strokecase0009_ses-0001_adc.nii.gz"


@pytest.fixture(scope="module")
def sample():
    d, a = nib.load(str(DWI)), nib.load(str(ADC))
    return d, d.get_fdata(dtype=np.float32), a, a.get_fdata(dtype=np.float32)


def run_node(tmp_path, adc_img):
    path = tmp_path / "adc_in.nii.gz"
    nib.save(adc_img, str(path))
    work = tmp_path / "work"
    work.mkdir()
    out = ConformADC(dwi_file=str(DWI), adc_file=str(path)).run(cwd=str(work)).outputs
    return out, nib.load(out.adc_file)


def test_sample_grids_match(tmp_path, sample):
    dimg, _, aimg, adc = sample
    out, res = run_node(tmp_path, aimg)
    assert out.resampled is False
    assert out.decisions["items"][0]["text"].startswith("grids match")
    assert np.array_equal(res.get_fdata(dtype=np.float32), adc)
    assert np.array_equal(res.affine, dimg.affine)


def test_tiny_affine_difference_and_codes(tmp_path, sample):
    dimg, _, _, adc = sample
    aff = dimg.affine.copy()
    aff[:3, 3] += 1e-7
    aff[0, 0] += 1e-7
    img = nib.Nifti1Image(adc, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=2)
    out, res = run_node(tmp_path, img)
    assert out.resampled is False and np.array_equal(res.affine, dimg.affine)


def test_cropped_shifted_adc_resampled(tmp_path, sample):
    dimg, _, _, adc = sample
    crop = adc[10:100, 5:105, 3:70]
    aff = dimg.affine @ from_matvec(np.eye(3), [10, 5, 3])
    out, res = run_node(tmp_path, nib.Nifti1Image(crop, aff))
    assert out.resampled is True
    assert [i["level"] for i in out.decisions["items"]] == ["warning"]
    vals = out.decisions["values"]
    assert vals["adc_grid"]["shape"] == [90, 100, 67] and vals["dwi_grid"]["shape"] == [112, 112, 73]
    data = res.get_fdata(dtype=np.float32)
    assert res.shape == adc.shape and np.allclose(res.affine, dimg.affine)
    assert np.allclose(data[10:100, 5:105, 3:70], crop, atol=1e-5)  # overlap: the original values
    assert not data[:10].any() and not data[:, :, 70:].any()  # outside the ADC field of view: 0


def smooth(world):
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    return 0.8 + 0.3 * np.sin(x / 40.0) * np.cos(y / 50.0) + 0.002 * z


def test_other_resolution_and_rotation(tmp_path, sample):
    dimg, dwi, _, _ = sample
    rot = nib.eulerangles.euler2mat(0.1, -0.05, 0.03)
    aff = from_matvec(rot @ np.diag([1.5, 1.5, 1.5]), dimg.affine[:3, 3] + [-150, -10, -10])
    shape = (180, 170, 120)
    adc = smooth(apply_affine(aff, np.indices(shape).transpose(1, 2, 3, 0))).astype(np.float32)
    out, res = run_node(tmp_path, nib.Nifti1Image(adc, aff))
    assert out.resampled is True
    want = smooth(apply_affine(dimg.affine, np.indices(dwi.shape).transpose(1, 2, 3, 0)))
    got = res.get_fdata(dtype=np.float32)
    inside = got > 0
    assert inside[dwi > 0].mean() > 0.9
    assert np.abs(got - want)[inside & (dwi > 0)].max() < 0.01


def test_no_overlap(tmp_path, sample):
    dimg, _, aimg, adc = sample
    aff = dimg.affine.copy()
    aff[:3, 3] += [0, 0, 1000.0]
    with pytest.raises(InputError, match="does not overlap") as err:
        run_node(tmp_path, nib.Nifti1Image(adc, aff))
    assert err.value.path.endswith("adc_in.nii.gz")


def test_low_coverage(tmp_path, sample):
    dimg, dwi, _, adc = sample
    slab = adc[:, :, 70:73]
    aff = dimg.affine @ from_matvec(np.eye(3), [0, 0, 70])
    with pytest.raises(InputError, match="covers only"):
        conform_adc(dwi, dimg.affine, slab, aff, "adc.nii.gz")


def test_grids_match_helper():
    a = np.diag([2.0, 2.0, 2.0, 1.0])
    assert grids_match((4, 4, 4), a, (4, 4, 4), a + 5e-4)
    assert not grids_match((4, 4, 4), a, (4, 4, 4), a + 5e-3)
    assert not grids_match((4, 4, 4), a, (4, 4, 5), a)
