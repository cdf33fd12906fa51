"""Tests of nodes/load.py (LoadInputs) on the real sample case and synthetic invalid inputs."""

import gzip
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.errors import InputError
from nodes.load import LoadInputs, squeeze_extra_axes

ROOT = Path(__file__).resolve().parents[1]
SES = ROOT / "bids_app/data/demo/isles22-sample/sub-strokecase0009/ses-0001"
DWI = SES / "dwi/sub-strokecase0009_ses-0001_dwi.nii.gz"
ADC = SES / "dwi/sub-strokecase0009_ses-0001_adc.nii.gz"
FLAIR = SES / "anat/sub-strokecase0009_ses-0001_FLAIR.nii.gz"
AFF = np.diag([2.0, 2.0, 2.0, 1.0])


def save(path, data, affine=AFF):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), str(path))
    return str(path)


def vol(shape=(12, 10, 8), seed=0):
    return np.random.default_rng(seed).uniform(1, 2, shape).astype(np.float32)


def run(tmp_path, **inputs):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return LoadInputs(**{k: str(v) for k, v in inputs.items()}).run(cwd=str(work)).outputs


def test_sample_case(tmp_path):
    rep = tmp_path / "rep"
    rep.mkdir()
    out = LoadInputs(dwi_file=str(DWI), adc_file=str(ADC), flair_file=str(FLAIR), reportlets_dir=str(rep)).run(
        cwd=str(tmp_path)).outputs
    assert out.is_raw is False
    img = nib.load(out.dwi_file)
    assert img.shape == (112, 112, 73) and img.get_data_dtype() == np.float32
    assert np.allclose(img.affine, nib.load(str(DWI)).affine)
    assert np.allclose(nib.load(out.adc_file).get_fdata(), nib.load(str(ADC)).get_fdata(), atol=1e-6)
    vals = json.loads((rep / "load.json").read_text())["values"]
    assert vals["dwi"]["orientation"] == "LAS" and vals["dwi"]["voxel_size_mm"] == [2.0, 2.0, 2.0]
    assert vals["flair"]["shape"] == [512, 512, 29]
    assert "obliquity_deg" in vals["adc"]


def test_optional_inputs_undefined(tmp_path):
    out = run(tmp_path, dwi_file=save(tmp_path / "d.nii.gz", vol()))
    assert not out.adc_file and not out.flair_file
    assert any(i["level"] == "warning" for i in out.decisions["items"])


def test_squeeze_singleton_axes(tmp_path):
    assert squeeze_extra_axes(np.zeros((4, 5, 6, 1, 1))).shape == (4, 5, 6)
    assert squeeze_extra_axes(np.zeros((4, 1, 6, 1))).shape == (4, 1, 6)
    out = run(tmp_path, dwi_file=save(tmp_path / "d.nii.gz", vol((12, 10, 8, 1))),
              adc_file=save(tmp_path / "a.nii.gz", vol((12, 10, 8, 1, 1))))
    assert nib.load(out.dwi_file).shape == (12, 10, 8)
    assert nib.load(out.adc_file).shape == (12, 10, 8)


def test_4d_two_volumes_kept(tmp_path):
    out = run(tmp_path, dwi_file=save(tmp_path / "d.nii.gz", vol((12, 10, 8, 2))))
    assert nib.load(out.dwi_file).shape == (12, 10, 8, 2) and out.is_raw is False


def test_raw_with_bval(tmp_path):
    bval = tmp_path / "d.bval"
    bval.write_text("0 1000 1000 1000 1000\n")
    out = run(tmp_path, dwi_file=save(tmp_path / "d.nii.gz", vol((12, 10, 8, 5))), bval_file=bval)
    assert out.is_raw is True and nib.load(out.dwi_file).shape == (12, 10, 8, 5)


def test_bval_count_mismatch(tmp_path):
    bval = tmp_path / "d.bval"
    bval.write_text("0 1000 1000\n")
    with pytest.raises(InputError, match="3 b-values"):
        run(tmp_path, dwi_file=save(tmp_path / "d.nii.gz", vol((12, 10, 8, 5))), bval_file=bval)


def test_4d_many_volumes_without_bval(tmp_path):
    with pytest.raises(InputError, match="no .bval"):
        run(tmp_path, dwi_file=save(tmp_path / "d.nii.gz", vol((12, 10, 8, 5))))


@pytest.mark.parametrize("kind,shape,msg", [
    ("dwi", (12, 10), "2-D"),
    ("dwi", (12, 10, 1), "2-D"),
    ("dwi", (12, 10, 8, 2, 2), "5 dimensions"),
    ("adc", (12, 10, 8, 2), "must be 3-D"),
    ("flair", (12, 10, 8, 3), "must be 3-D"),
])
def test_bad_dimensions(tmp_path, kind, shape, msg):
    bad = save(tmp_path / f"{kind}.nii.gz", vol(shape))
    inputs = {"dwi_file": save(tmp_path / "d.nii.gz", vol()), f"{kind}_file": bad}
    with pytest.raises(InputError, match=msg) as err:
        run(tmp_path, **inputs)
    assert err.value.path == bad


def test_nan_and_inf_counted(tmp_path):
    data = vol()
    data[0, 0, :3] = np.nan
    data[5, 5, 5] = np.inf  # inside: refused (the NaN row on the edge alone would be background)
    path = save(tmp_path / "a.nii.gz", data)
    with pytest.raises(InputError, match="4 voxels are NaN or infinite") as err:
        run(tmp_path, dwi_file=save(tmp_path / "d.nii.gz", vol()), adc_file=path)
    assert err.value.path == path


def test_nan_background_is_set_to_zero(tmp_path):
    """ADC maps from some tools hold NaN where there is no signal: accepted when every non-finite voxel is
    connected to the edge of the field of view (a warning); one inside the head is refused."""
    data = vol()
    data[:3] = np.nan  # a background slab from the edge
    data[:, :, -1] = np.inf
    out = run(tmp_path, dwi_file=save(tmp_path / "d.nii.gz", vol()), adc_file=save(tmp_path / "a.nii.gz", data))
    adc = np.asarray(nib.load(out.adc_file).dataobj)
    assert np.all(np.isfinite(adc)) and np.all(adc[:3] == 0) and np.array_equal(adc[3:, :, :-1], data[3:, :, :-1])
    assert any("set to 0" in d["text"] for d in out.decisions["items"] if d.get("level") == "warning")
    data[6, 5, 4] = np.nan  # and one inside
    with pytest.raises(InputError, match=r"away from the edge of the field of view"):
        run(tmp_path, dwi_file=save(tmp_path / "d.nii.gz", vol()), adc_file=save(tmp_path / "a.nii.gz", data))


def test_nan_in_a_2d_image_is_a_clear_error(tmp_path):
    data = vol((12, 10))  # a 2-D NIfTI: refused with a clear line, not a crash in the NaN check
    data[0, 0] = np.nan
    with pytest.raises(InputError, match="1 voxels are NaN or infinite"):
        run(tmp_path, dwi_file=save(tmp_path / "d.nii.gz", data))


@pytest.mark.parametrize("value,msg", [(0.0, "all voxels are zero"), (3.0, "constant")])
def test_empty_or_constant(tmp_path, value, msg):
    with pytest.raises(InputError, match=msg):
        run(tmp_path, dwi_file=save(tmp_path / "d.nii.gz", np.full((12, 10, 8), value)))


def test_singular_affine(tmp_path):
    aff = AFF.copy()
    aff[:, 2] = 0
    aff[3, 3] = 1
    img = nib.Nifti1Image(vol(), None)
    img.set_sform(aff, code=1)
    img.set_qform(None, code=0)
    path = tmp_path / "d.nii.gz"
    path.write_bytes(gzip.compress(img.to_bytes()))
    with pytest.raises(InputError, match="affine|voxel sizes"):
        run(tmp_path, dwi_file=path)


def _no_world(data, pixdim):
    """A header without sform/qform whose voxel sizes are ``pixdim`` (as some converters write)."""
    img = nib.Nifti1Image(data, None)
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    raw = bytearray(img.to_bytes())
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])), check=False)
    hdr["pixdim"][1:4] = pixdim
    raw[:348] = hdr.binaryblock
    return gzip.compress(bytes(raw))


def test_zero_voxel_sizes_without_sform_or_qform(tmp_path):
    """nibabel sets zero voxel sizes to 1 while loading: the grid would silently become 1 mm."""
    path = tmp_path / "d.nii.gz"
    path.write_bytes(_no_world(vol(), [0, 0, 0]))
    with pytest.raises(InputError, match=r"d.nii.gz: voxel sizes \[0.0, 0.0, 0.0\] in the header and no sform/qform"):
        run(tmp_path, dwi_file=path)


def test_no_sform_or_qform_is_a_warning(tmp_path):
    path = tmp_path / "d.nii.gz"
    path.write_bytes(_no_world(vol(), [2, 2, 2]))
    out = run(tmp_path, dwi_file=path)
    warnings = [d["text"] for d in out.decisions["items"] if d.get("level") == "warning"]
    assert any("no sform/qform" in w for w in warnings), warnings


def test_not_nifti(tmp_path):
    bad = tmp_path / "d.nii.gz"
    bad.write_text("hello, not an image\n")
    with pytest.raises(InputError, match="NIfTI") as err:
        run(tmp_path, dwi_file=bad)
    assert err.value.path == str(bad)


def test_truncated_gz(tmp_path):
    good = Path(save(tmp_path / "good.nii.gz", vol((40, 40, 30))))
    raw = good.read_bytes()
    bad = tmp_path / "d.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="truncated|corrupt|readable"):
        run(tmp_path, dwi_file=bad)


def test_truncated_uncompressed(tmp_path):
    img = nib.Nifti1Image(vol((40, 40, 30)), AFF)
    bad = tmp_path / "d.nii"
    bad.write_bytes(img.to_bytes()[:20000])
    with pytest.raises(InputError):
        run(tmp_path, dwi_file=bad)


def test_broken_symlink_and_missing(tmp_path):
    link = tmp_path / "d.nii.gz"
    link.symlink_to(tmp_path / "annex" / "missing.nii.gz")
    with pytest.raises(InputError, match="broken symbolic link"):
        run(tmp_path, dwi_file=link)
    with pytest.raises(InputError, match="not found"):
        run(tmp_path, dwi_file=tmp_path / "nope.nii.gz")
