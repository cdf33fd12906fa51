"""Trace/ADC computation from raw DWI (nodes/diffusion.py)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.errors import InputError
from nodes.diffusion import ComputeTraceADC, DiffusionError, compute_trace_adc, group_shells
from tests.datasets import SIX_DIRS, sample_case, save, simulate_raw, write_bval_bvec


def _tensor_phantom(shape=(6, 5, 4), b_values=(0, 1000), dirs=SIX_DIRS, s0=1000.0):
    """Anisotropic tensors with known mean diffusivity (1e-3 mm2/s) along a gradient."""
    md = np.linspace(0.3, 3.0, int(np.prod(shape))).reshape(shape)
    evals = np.stack([md * 1.6, md * 0.8, md * 0.6], axis=-1)  # mean = md
    bvals, vecs = [], []
    for b in b_values:
        if b == 0:
            bvals.append(0.0), vecs.append(np.zeros(3))
        else:
            bvals += [float(b)] * len(dirs)
            vecs += list(dirs)
    bvals, vecs = np.array(bvals), np.array(vecs)
    # tensor with eigenvectors along x, y, z: g^T D g = sum(evals * g^2)
    adc_dir = (evals[..., None, :] * vecs[None, None, None, :, :] ** 2).sum(-1)  # (..., N)
    data = s0 * np.exp(-bvals * adc_dir * 1e-3)
    return data.astype(np.float32), bvals, vecs.T, md


def test_recovers_known_adc_within_1_percent():
    data, bvals, bvecs, md = _tensor_phantom(b_values=(0, 1000, 2000))
    trace, adc, info = compute_trace_adc(data, bvals, bvecs)
    assert info["b_value"] == pytest.approx(1000)
    assert info["n_directions"] == 6 and info["n_b0"] == 1
    assert np.allclose(adc, md, rtol=0.01)
    assert np.allclose(trace, 1000 * np.exp(-md), rtol=0.01)
    assert trace.dtype == np.float32 and adc.dtype == np.float32 and trace.shape == md.shape


def test_single_b0_and_single_b1000_volume():
    md = np.full((3, 3, 3), 0.8)
    data = np.stack([np.full(md.shape, 500.0), 500.0 * np.exp(-md)], axis=-1)
    trace, adc, info = compute_trace_adc(data, [0, 1000], [[0, 0, 0], [1, 0, 0]])
    assert np.allclose(adc, 0.8, rtol=1e-4)
    assert info["n_directions"] == 1
    assert any("direction" in w for w in info["warnings"])


def test_bvecs_n_by_3_accepted_and_shell_grouping():
    data, bvals, bvecs, md = _tensor_phantom()
    bvals = bvals + np.r_[0, [5, -5, 8, 0, -3, 2]]  # scanner-style jitter around 1000
    _, adc_a, _ = compute_trace_adc(data, bvals, bvecs)
    _, adc_b, info = compute_trace_adc(data, bvals, bvecs.T)
    assert np.allclose(adc_a, adc_b) and info["n_directions"] == 6
    shells = group_shells([0, 995, 1005, 2000, 2010, 5])
    assert [round(s[0]) for s in shells] == [1000, 2005]


def test_nearest_shell_to_1000_chosen():
    data, bvals, bvecs, md = _tensor_phantom(b_values=(0, 800, 1400))
    _, adc, info = compute_trace_adc(data, bvals, bvecs)
    assert info["b_value"] == pytest.approx(800)
    assert np.allclose(adc, md, rtol=0.01)


@pytest.mark.parametrize("bad, source, words", [
    ({"bvals": [0, 1000, 1000]}, "bval", "3 b-values for 7 volumes"),
    ({"bvecs": np.zeros((3, 4))}, "bvec", "3 x 4"),
    ({"bvecs": np.zeros((2, 7))}, "bvec", "2 x 7"),
    ({"bvals": [0, 3000, 3000, 3000, 3000, 3000, 3000]}, "bval", "0, 3000"),
    ({"bvals": [500] + [1000] * 6}, "bval", "no b=0"),
])
def test_errors(bad, source, words):
    data, bvals, bvecs, _ = _tensor_phantom()
    kwargs = {"bvals": bvals, "bvecs": bvecs} | bad
    with pytest.raises(DiffusionError) as err:
        compute_trace_adc(data, **kwargs)
    assert err.value.source == source and words in str(err.value)
    assert "\n" not in str(err.value)


def test_background_is_zero_and_clipped():
    data, bvals, bvecs, _ = _tensor_phantom()
    data[0, 0, 0] = 0  # no signal
    data[1, 0, 0, 0] = -5  # negative S0
    data[2, 0, 0, 1:] = 1e-9  # trace ~ 0: huge ADC -> clipped
    trace, adc, _ = compute_trace_adc(data, bvals, bvecs)
    assert adc[0, 0, 0] == 0 and adc[1, 0, 0] == 0
    assert 0 <= adc.min() and adc.max() <= 10
    assert trace[0, 0, 0] == 0  # exactly: brain extraction reads exact zeros as "already stripped"


def test_three_volumes_bvec_layout_from_the_b_values():
    """With 3 volumes a 3 x 3 table reads both ways; the b=0 row must not be taken as a direction."""
    data, bvals, bvecs, _ = _tensor_phantom(dirs=SIX_DIRS[:2])  # b0 + 2 directions
    for table in (bvecs, bvecs.T):  # 3 x N (BIDS) and N x 3
        _, _, info = compute_trace_adc(data, bvals, table)
        assert not any("null b-vector" in w for w in info["warnings"]), info["warnings"]


def test_simulated_raw_dataset_matches_sample_adc():
    data, bvals, bvecs, _, adc_true = simulate_raw()
    _, adc, info = compute_trace_adc(data, bvals, bvecs)
    brain = sample_case()["brain"]
    assert info["shells"] == [1000.0, 2000.0]
    rel = np.abs(adc[brain] - adc_true[brain]) / adc_true[brain]
    assert np.median(rel) < 0.05


# ----------------------------------------------------------------------------- interface
def _run(tmp_path, **inputs):
    node = ComputeTraceADC(reportlets_dir=str(tmp_path / "reportlets"), **inputs)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return node.run(cwd=str(work)).outputs


def test_interface_raw(tmp_path):
    data, bvals, bvecs, md = _tensor_phantom()
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    dwi = save(data, affine, tmp_path / "sub-01_dwi.nii.gz")
    bval, bvec = write_bval_bvec(tmp_path / "sub-01_dwi", bvals, bvecs.T)  # N x 3 on disk
    out = _run(tmp_path, dwi_file=str(dwi), bval_file=str(bval), bvec_file=str(bvec))
    assert out.b_value == pytest.approx(1000)
    assert Path(out.trace_file).parent == tmp_path / "work"
    adc_img = nib.load(out.adc_file)
    assert adc_img.shape == md.shape and adc_img.get_data_dtype() == np.float32
    assert np.allclose(adc_img.affine, affine)
    assert np.allclose(adc_img.get_fdata(), md, rtol=0.01)
    rep = json.loads((tmp_path / "reportlets" / "diffusion.json").read_text())
    assert rep["step"] == "diffusion" and rep["values"]["n_directions"] == 6
    assert out.decisions["values"]["computed"] is True


def test_interface_pass_through_3d(tmp_path):
    case = sample_case()
    dwi = save(case["dwi"], case["affine"], tmp_path / "dwi.nii.gz")
    adc = save(case["adc"], case["affine"], tmp_path / "adc.nii.gz")
    out = _run(tmp_path, dwi_file=str(dwi), adc_file=str(adc))
    assert out.trace_file == str(dwi) and out.adc_file == str(adc)


def test_interface_4d_two_volumes_without_bval_uses_last(tmp_path):
    vols = np.stack([np.zeros((4, 4, 4)), np.full((4, 4, 4), 7.0)], axis=-1)
    dwi = save(vols, np.eye(4), tmp_path / "dwi.nii.gz")
    out = _run(tmp_path, dwi_file=str(dwi))
    assert np.allclose(nib.load(out.trace_file).get_fdata(), 7.0)
    assert not out.adc_file  # Undefined: no ADC given, none computed
    assert any("last volume" in i["text"] for i in out.decisions["items"])


def test_interface_errors_name_the_file(tmp_path):
    data, bvals, bvecs, _ = _tensor_phantom()
    dwi = save(data, np.eye(4), tmp_path / "dwi.nii.gz")
    bval, bvec = write_bval_bvec(tmp_path / "dwi", bvals[:-1], bvecs[:, :-1])
    with pytest.raises(InputError) as err:
        _run(tmp_path, dwi_file=str(dwi), bval_file=str(bval), bvec_file=str(bvec))
    assert err.value.path == str(bval) and "6 b-values for 7 volumes" in err.value.problem
    bval, bvec = write_bval_bvec(tmp_path / "ok", bvals, np.zeros((4, 7)))
    with pytest.raises(InputError) as err:
        _run(tmp_path, dwi_file=str(dwi), bval_file=str(bval), bvec_file=str(bvec))
    assert err.value.path == str(bvec)
    (tmp_path / "junk.bval").write_text("0 abc\n")
    with pytest.raises(InputError, match="junk.bval"):
        _run(tmp_path, dwi_file=str(dwi), bval_file=str(tmp_path / "junk.bval"))


def _dipy_file(name):
    try:
        import dipy
    except ImportError:
        return None
    path = Path(dipy.__file__).parent / "data" / "files" / name
    return path if path.exists() else None


@pytest.mark.skipif(_dipy_file("small_64D.nii") is None, reason="dipy's small_64D sample not installed")
def test_dipy_real_raw_dwi(tmp_path):
    dwi, bval, bvec = (_dipy_file(f"small_64D.{e}") for e in ("nii", "bval", "bvec"))
    assert np.loadtxt(bvec).shape[1] == 3  # stored N x 3
    out = _run(tmp_path, dwi_file=str(dwi), bval_file=str(bval), bvec_file=str(bvec))
    adc = nib.load(out.adc_file).get_fdata()
    assert out.b_value == pytest.approx(995, abs=10)
    assert out.decisions["values"]["n_directions"] == 64
    inside = adc[adc > 0]
    assert inside.size > 100 and 0.1 < np.median(inside) < 3.5  # plausible tissue ADC (1e-3 mm2/s)
