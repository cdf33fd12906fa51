"""Texture figures of real and synthetic pairs (``models/builtin/texture_stats.py``)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("monai")

from models.builtin import texture_stats as T  # noqa: E402
from models.builtin.synth import SynthGenerator  # noqa: E402
from tests.datasets import SAMPLE  # noqa: E402

CASE = SAMPLE / "sub-strokecase0009/ses-0001/dwi/sub-strokecase0009_ses-0001"


def test_texture_of_known_arrays():
    brain = np.zeros((20, 20, 20), bool)
    brain[2:18, 2:18, 2:18] = True
    flat = np.where(brain, 1.0, 0.0)
    ramp = np.where(brain, np.arange(20)[:, None, None] * 0.1 + np.zeros((20, 20, 20)), 0.0)
    got = T.figures(flat, ramp, brain)
    assert got["trace_gradient"] == 0.0  # constant inside the eroded brain
    assert got["adc_gradient"] == pytest.approx(0.1)  # slope 0.1 per voxel
    assert got["csf_share"] == pytest.approx(float((ramp[brain] > 1.5).mean()), abs=1e-4)
    assert got["adc_p90"] == pytest.approx(1.5)  # eroded brain: 14 rows of 0.3 .. 1.6, 196 voxels each
    assert got["adc_gradient_near_csf"] == pytest.approx(0.1)  # rows whose neighbours exceed 1.2
    assert got["adc_highpass_sd"] == pytest.approx(0.0, abs=1e-9)  # a ramp equals its local mean


def test_real_case_is_more_textured_than_the_plain_generator(capsys):
    real = T.main(["--real", f"{CASE}_dwi.nii.gz", f"{CASE}_adc.nii.gz"])
    assert real == {"adc_gradient": 0.2804, "trace_gradient": 0.1582, "csf_share": 0.2497, "adc_p90": 2.234,
                    "adc_gradient_near_csf": 0.4676, "adc_highpass_sd": 0.0758}  # measured
    assert '"adc_gradient": 0.2804' in capsys.readouterr().out
    syn = T.synthetic(2, 900003000, generator=SynthGenerator("cpu", fov=(56, 64, 56), label_rule="visible"))
    assert syn["adc_gradient"]["p90"] < real["adc_gradient"]


def test_real_adc_units_do_not_matter(tmp_path):
    import nibabel as nib

    img = nib.load(f"{CASE}_adc.nii.gz")
    micro = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32) * 1000, img.affine)  # 1e-6 mm2/s
    nib.save(micro, tmp_path / "adc.nii.gz")
    assert T.real(f"{CASE}_dwi.nii.gz", tmp_path / "adc.nii.gz") == T.real(f"{CASE}_dwi.nii.gz", f"{CASE}_adc.nii.gz")


def test_real_needs_two_mm_voxels(tmp_path):
    import nibabel as nib

    img = nib.load(f"{CASE}_dwi.nii.gz")
    coarse = nib.Nifti1Image(np.asarray(img.dataobj), img.affine @ np.diag([2.0, 2.0, 2.0, 1.0]))
    nib.save(coarse, tmp_path / "d.nii.gz")
    with pytest.raises(SystemExit, match="per 2 mm voxel"):
        T.real(tmp_path / "d.nii.gz", f"{CASE}_adc.nii.gz")


def test_synthetic_options_reach_the_generator(monkeypatch):
    import models.builtin.synth as S

    made, real = [], S.SynthGenerator

    def gen(device, **kw):
        made.append(kw)
        return real(device, fov=(40, 48, 40), **kw)

    monkeypatch.setattr(S, "SynthGenerator", gen)
    out = T.main(["--synthetic", "1", "--sulci", "0.5", "--texture", "0.6"])
    assert made == [{"label_rule": "visible", "sulci": 0.5, "texture": 0.6}]
    assert set(out) == set(T.KEYS)
