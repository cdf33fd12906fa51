"""Tests of nodes/adc_units.py: unit detection, invariance to the stored unit, refusals."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.errors import InputError
from nodes.adc_units import HarmoniseADCUnits, brain_median, harmonise_adc

ROOT = Path(__file__).resolve().parents[1]
ADC = ROOT / "bids_app/data/demo/isles22-sample/sub-strokecase0009/ses-0001/dwi/sub-strokecase0009_ses-0001_adc.nii.gz"


@pytest.fixture(scope="module")
def sample():
    img = nib.load(str(ADC))
    return img, np.asanyarray(img.dataobj).astype(np.float64)


def run_node(tmp_path, data, affine, name, dtype=np.float64, mask=None):
    path = tmp_path / name
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    nib.save(img, str(path))
    inputs = {"adc_file": str(path), "reportlets_dir": str(tmp_path)}
    if mask is not None:
        mpath = tmp_path / f"mask_{name}"
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(mpath))
        inputs["mask_file"] = str(mpath)
    work = tmp_path / f"work_{name[:-7]}"
    work.mkdir()
    out = HarmoniseADCUnits(**inputs).run(cwd=str(work)).outputs
    return out, np.asanyarray(nib.load(out.adc_file).dataobj)


@pytest.mark.parametrize("factor,unit,scale", [(1.0, "1e-3 mm2/s", 1.0), (1e-3, "mm2/s", 1000.0),
                                               (1e3, "1e-6 mm2/s", 1e-3)])
def test_units_detected_and_bitwise_invariant(tmp_path, sample, factor, unit, scale):
    img, adc = sample
    ref, _ = harmonise_adc(adc)
    scaled = adc * factor if factor >= 1 else adc / 1000.0  # exact decimal rescaling in float64
    out, data = run_node(tmp_path, scaled, img.affine, "adc.nii.gz")
    assert out.detected_unit == unit and out.scale == scale
    assert data.dtype == np.float32
    assert np.array_equal(data, ref)  # bitwise, whatever the stored unit
    vals = json.loads((tmp_path / "adc_units.json").read_text())["values"]
    assert vals["detected_unit"] == unit and vals["scale"] == scale
    assert vals["median_before"] == pytest.approx(0.85 * factor, rel=0.2)


@pytest.mark.parametrize("factor", [1e-3, 1e3])
def test_float32_storage_agrees_to_1e6(tmp_path, sample, factor):
    img, adc = sample
    ref, _ = harmonise_adc(adc.astype(np.float32))
    _, data = run_node(tmp_path, (adc * factor).astype(np.float32), img.affine, "adc32.nii.gz", np.float32)
    assert np.allclose(data, ref, rtol=1e-6, atol=1e-9)
    # a downstream threshold (ADC < 0.62e-3 mm2/s inside the brain) gives the same mask
    brain = adc > 0
    assert np.array_equal((data < 0.62) & brain, (ref < 0.62) & brain)


def test_negative_values_clipped_with_warning(tmp_path, sample):
    img, adc = sample
    n_neg = int((adc < 0).sum())
    assert n_neg > 0  # the real sample has a few negative ADC voxels
    out, data = run_node(tmp_path, adc, img.affine, "adc.nii.gz")
    assert data.min() == 0.0
    warnings = [i["text"] for i in out.decisions["items"] if i["level"] == "warning"]
    assert any(f"{n_neg} negative" in w for w in warnings)
    assert out.decisions["values"]["negative_voxels"] == n_neg


def test_with_mask(tmp_path, sample):
    img, adc = sample
    mask = adc != 0
    out, data = run_node(tmp_path, adc * 1000.0, img.affine, "adc.nii.gz", mask=mask)
    assert out.detected_unit == "1e-6 mm2/s"
    assert brain_median(adc, mask) == pytest.approx(np.median(adc[adc > 0]))


def test_median_uses_brain_not_background():
    rng = np.random.default_rng(0)
    adc = np.zeros((40, 40, 40))
    adc[10:30, 10:30, 10:30] = rng.normal(800, 50, (20, 20, 20))  # 1e-6 units
    adc[0:3] = rng.uniform(0, 3000, (3, 40, 40))  # noisy edge slab
    out, info = harmonise_adc(adc)
    assert info["detected_unit"] == "1e-6 mm2/s" and 0.7 < info["median_after"] < 0.9


@pytest.mark.parametrize("median", [0.05, 8.0, 8000.0, 80.0])
def test_undecidable_units(tmp_path, median):
    adc = np.zeros((20, 20, 20))
    adc[5:15, 5:15, 5:15] = median
    adc[10, 10, 10] = median * 1.1
    with pytest.raises(InputError, match="cannot determine ADC units: brain median"):
        harmonise_adc(adc, path=tmp_path / "adc.nii.gz")


def test_no_positive_values():
    with pytest.raises(InputError, match="no positive"):
        harmonise_adc(-np.ones((5, 5, 5)))


def test_non_finite_refused():
    adc = np.full((5, 5, 5), 0.8)
    adc[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="1 voxels are NaN"):
        harmonise_adc(adc)
