"""Report figures on the ISLES'22 sample (expert mask as the predicted mask)."""

from pathlib import Path

import nibabel as nib
import numpy as np

from nodes.figures import LesionFigures, choose_slices

SAMPLE = Path(__file__).resolve().parents[1] / "bids_app/data/demo/isles22-sample"
SES = SAMPLE / "sub-strokecase0009/ses-0001/dwi"
DWI = SES / "sub-strokecase0009_ses-0001_dwi.nii.gz"
ADC = SES / "sub-strokecase0009_ses-0001_adc.nii.gz"
MASK = SAMPLE / "derivatives/sub-strokecase0009/ses-0001/sub-strokecase0009_ses-0001_msk.nii.gz"


def test_figures_written_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    kw = dict(trace_file=str(DWI), adc_file=str(ADC), mask_file=str(MASK), out_prefix="sub-01_ses-1")
    ra = LesionFigures(reportlets_dir=str(a), **kw).run(cwd=str(a))
    rb = LesionFigures(**kw).run(cwd=str(b))
    files = ra.outputs.figure_files
    assert [Path(f).name for f in files] == ["sub-01_ses-1_desc-lesion_mosaic.png"]
    data = Path(files[0]).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert data == Path(rb.outputs.figure_files[0]).read_bytes()
    assert (a / "figures.json").is_file()
    slices = ra.outputs.decisions["values"]["slices"]
    assert len(slices) == 8 and slices == sorted(slices)


def test_slice_choice():
    mask = np.zeros((4, 4, 20), bool)
    mask[1, 1, [3, 9, 9, 15]] = True
    mask[:, :, 9] = True
    assert choose_slices(mask, n=2) == [3, 9]
    img = np.zeros((4, 4, 20))
    img[:, :, 5:15] = 1
    even = choose_slices(np.zeros((4, 4, 20), bool), img, n=4)
    assert len(even) == 4 and all(5 <= k <= 14 for k in even)


def test_empty_mask_figure(tmp_path):
    img = nib.load(str(MASK))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), tmp_path / "empty.nii.gz")
    res = LesionFigures(trace_file=str(DWI), mask_file=str(tmp_path / "empty.nii.gz"),
                        out_prefix="sub-02").run(cwd=str(tmp_path))
    assert Path(res.outputs.figure_files[0]).is_file()
    assert any(i["level"] == "warning" for i in res.outputs.decisions["items"])
