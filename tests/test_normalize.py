"""Tests of nodes/normalize.py on the real sample and small synthetic cases."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.errors import InputError
from models.builtin.transforms import ADC_CLIP, DWI_CLIP, normalize_channels
from nodes.normalize import NormalizeIntensity, normalize

ROOT = Path(__file__).resolve().parents[1]
DWI_DIR = ROOT / "bids_app/data/demo/isles22-sample/sub-strokecase0009/ses-0001/dwi"
DWI = DWI_DIR / "sub-strokecase0009_ses-0001_dwi.nii.gz"
ADC = DWI_DIR / "sub-strokecase0009_ses-0001_adc.nii.gz"


def test_sample_case(tmp_path):
    img = nib.load(str(DWI))
    trace = img.get_fdata(dtype=np.float32)
    adc = nib.load(str(ADC)).get_fdata(dtype=np.float32)
    mask = (trace != 0).astype(np.uint8)
    mpath = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask, img.affine), str(mpath))
    work = tmp_path / "w"
    work.mkdir()
    out = NormalizeIntensity(trace_file=str(DWI), adc_file=str(ADC), mask_file=str(mpath),
                             reportlets_dir=str(tmp_path)).run(cwd=str(work)).outputs
    dwi_n = nib.load(out.dwi_norm_file).get_fdata(dtype=np.float32)
    adc_n = nib.load(out.adc_norm_file).get_fdata(dtype=np.float32)
    want_d, want_a = normalize_channels(trace, adc, mask)
    assert np.array_equal(dwi_n, want_d) and np.array_equal(adc_n, want_a)
    assert out.dwi_scale == pytest.approx(np.median(trace[(mask > 0) & (trace > 0)]), rel=1e-6)
    assert out.decisions["values"]["dwi_scale"] == pytest.approx(out.dwi_scale, rel=1e-5)
    assert np.median(dwi_n[mask > 0]) == pytest.approx(1.0, abs=0.01)
    assert dwi_n.min() >= 0 and dwi_n.max() <= DWI_CLIP and adc_n.max() <= ADC_CLIP
    assert np.allclose(nib.load(out.dwi_norm_file).affine, img.affine)


def test_scale_invariance_and_outside_zero():
    rng = np.random.default_rng(0)
    trace = rng.uniform(100, 300, (20, 20, 20)).astype(np.float32)
    adc = rng.uniform(0.5, 5.0, (20, 20, 20)).astype(np.float32)
    mask = np.zeros((20, 20, 20), bool)
    mask[5:15, 5:15, 5:15] = True
    d1, a1, i1 = normalize(trace, adc, mask)
    d2, _, i2 = normalize(trace * 7.0, adc, mask)
    assert np.allclose(d1, d2, rtol=1e-5) and i2["dwi_scale"] == pytest.approx(7 * i1["dwi_scale"], rel=1e-5)
    assert not d1[~mask].any() and not a1[~mask].any()
    assert a1.max() == ADC_CLIP and i1["adc_clipped_fraction"] > 0


def test_empty_mask_refused(tmp_path):
    aff = np.eye(4)
    paths = {}
    for name, data in (("t", np.ones((5, 5, 5))), ("a", np.ones((5, 5, 5))), ("m", np.zeros((5, 5, 5)))):
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(data.astype(np.float32), aff), paths[name])
    with pytest.raises(InputError, match="brain mask is empty"):
        NormalizeIntensity(trace_file=paths["t"], adc_file=paths["a"], mask_file=paths["m"]).run(cwd=str(tmp_path))
