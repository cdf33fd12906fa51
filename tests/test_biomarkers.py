"""Lesion biomarkers on the expert mask of the ISLES'22 sample and on synthetic masks."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from nodes.biomarkers import STATS_COLUMNS, LesionStats, lesion_stats, read_lesion_stats

SAMPLE = Path(__file__).resolve().parents[1] / "bids_app/data/demo/isles22-sample"
MASK = SAMPLE / "derivatives/sub-strokecase0009/ses-0001/sub-strokecase0009_ses-0001_msk.nii.gz"
ADC = SAMPLE / "sub-strokecase0009/ses-0001/dwi/sub-strokecase0009_ses-0001_adc.nii.gz"


def _mask():
    return np.asanyarray(nib.load(str(MASK)).dataobj)


def test_expert_mask_numbers():
    mask = _mask()
    assert int((mask > 0).sum()) == 523
    stats = lesion_stats(mask, (2.0, 2.0, 2.0))
    assert stats["voxel_volume_ml"] == pytest.approx(0.008)
    assert stats["total_volume_ml"] == pytest.approx(4.184)
    # 26-connectivity (3x3x3 structure): 18 lesions; the 6-connectivity count of the same mask is 21
    assert stats["lesion_count"] == 18
    assert ndimage.label(mask > 0)[1] == 21
    assert stats["largest_lesion_ml"] == pytest.approx(201 * 0.008)
    assert stats["mean_adc_lesion"] is None


def test_interface_writes_tsv_and_reportlet(tmp_path):
    res = LesionStats(mask_file=str(MASK), adc_file=str(ADC), reportlets_dir=str(tmp_path)).run(cwd=str(tmp_path))
    stats = res.outputs.stats
    assert stats["total_volume_ml"] == pytest.approx(4.184)
    assert 0.3 < stats["mean_adc_lesion"] < 0.9  # restricted diffusion, 1e-3 mm2/s
    lines = Path(res.outputs.stats_file).read_text().splitlines()
    assert lines[0].split("\t") == list(STATS_COLUMNS)
    assert read_lesion_stats(res.outputs.stats_file) == stats
    assert (tmp_path / "biomarkers.json").is_file()
    assert res.outputs.decisions["step"] == "biomarkers"


def test_empty_mask_and_anisotropic_voxels(tmp_path):
    empty = lesion_stats(np.zeros((5, 5, 5), np.uint8), (1, 1, 1), adc=np.ones((5, 5, 5)))
    assert empty == {"total_volume_ml": 0.0, "lesion_count": 0, "largest_lesion_ml": 0.0,
                     "mean_adc_lesion": None, "voxel_volume_ml": 0.001}
    m = np.zeros((10, 10, 10), np.uint8)
    m[1, 1, 1] = m[2, 2, 2] = 1  # diagonal neighbours: one lesion with 26-connectivity
    m[6:8, 6:8, 6:8] = 1
    adc = np.full(m.shape, 2.0)
    adc[m > 0] = 0.5
    s = lesion_stats(m, (0.5, 1.0, 4.0), adc=adc)
    assert s["lesion_count"] == 2
    assert s["total_volume_ml"] == pytest.approx(10 * 0.002)
    assert s["largest_lesion_ml"] == pytest.approx(8 * 0.002)
    assert s["mean_adc_lesion"] == pytest.approx(0.5)
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4))
    nib.save(img, tmp_path / "m.nii.gz")
    res = LesionStats(mask_file=str(tmp_path / "m.nii.gz")).run(cwd=str(tmp_path))
    assert "n/a" in Path(res.outputs.stats_file).read_text()
    assert any(i["level"] == "warning" for i in res.outputs.decisions["items"])
