"""models/nvauto.py on a fake official NVAUTO folder (15 tiny scripted models).

The recipe parameters are checked on the predictor, and the whole output is compared with an
independent straightforward implementation written here with numpy/scipy (index-scaling
resampling, a direct loop over the windows with the Gaussian weight map, softmax, mean, inverse).
"""

from __future__ import annotations

import hashlib
import math
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from bids_app.errors import UsageError, WeightsError
from models import nvauto as NV
from tests.fake_weights.nvauto import Channel0Net, make_fake_nvauto

# Irrational-like zooms: no 1 mm sample (but the first) falls exactly on a native voxel centre. With
# zooms such as 1.8 (sample 9 -> voxel 5.000...) the nonzero-voxel normalisation becomes ill-posed at
# the brain edge: a round-off weight of 1e-16 on a brain voxel makes a background sample non-zero, and
# it is then normalised to -mean/std instead of staying 0. MONAI (float64 affine algebra) and scipy
# round differently there, so such zooms would test round-off, not the recipe.
ZOOMS = (1.7320508, 2.2360680, 2.6457513)
SHAPE = (30, 28, 20)
GRID_1MM = (51, 61, 51)  # round((n - 1) * zoom) + 1
SMALL_ROI = (40, 40, 40)  # 2x2x2 overlapping windows on the 1 mm grid: fast, exercises the blending
ONE_WINDOW = (64, 64, 64)  # larger than the 1 mm grid: one zero-padded window


def _rotation(deg_x=8.0, deg_z=-5.0):
    a, b = np.radians(deg_x), np.radians(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rz @ rx


def oblique_affine(zooms=ZOOMS, origin=(110.0, -80.0, -55.0)):
    aff = np.eye(4)
    aff[:3, :3] = np.diag([-1.0, 1.0, 1.0]) @ _rotation() @ np.diag(zooms)
    aff[:3, 3] = origin
    return aff


def synthetic_case(shape=SHAPE, zooms=ZOOMS, seed=0):
    """Skull-stripped-like DWI/ADC: smooth values inside an ellipsoid, exact zeros outside."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    c = (np.asarray(shape) - 1) / 2.0
    r = np.sqrt(sum(((g - ci) / (0.42 * n)) ** 2 for g, ci, n in zip(grid, c, shape)))
    brain = r <= 1.0
    dwi = ndimage.gaussian_filter(rng.normal(100, 30, shape), 1.5) + 60 * np.exp(-((grid[0] - 10) ** 2) / 20)
    adc = ndimage.gaussian_filter(rng.normal(0.8, 0.2, shape), 1.5) - 0.3 * np.exp(-((grid[1] - 18) ** 2) / 15)
    dwi, adc = np.where(brain, dwi, 0).astype(np.float32), np.where(brain, np.abs(adc), 0).astype(np.float32)
    aff = oblique_affine(zooms)
    return nib.Nifti1Image(dwi, aff), nib.Nifti1Image(adc, aff)


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    make_fake_nvauto(root)
    return root


@pytest.fixture(scope="module")
def small(fake_dir):
    return NV.build_nvauto(fake_dir, "cpu", {"roi_size": ONE_WINDOW})


# ----------------------------------------------------------------------------- weights
def test_fake_folder_checksums_and_load_order(fake_dir, monkeypatch):
    sums = NV.nvauto_checksums(fake_dir)
    assert list(sums) == [f"NVAUTO/ts/model{i}.ts" for i in range(15)]
    for rel, hexd in sums.items():
        assert hexd == hashlib.sha256((fake_dir / rel).read_bytes()).hexdigest()
    assert len(set(sums.values())) == 15  # 15 different random models
    seen = []
    real_load = torch.jit.load

    def recording_load(f, *a, **k):
        seen.append(hashlib.sha256(f.getvalue()).hexdigest())
        return real_load(f, *a, **k)

    monkeypatch.setattr(torch.jit, "load", recording_load)
    pred = NV.build_nvauto(fake_dir, "cpu", {})
    assert seen == list(sums.values())  # loaded once each, in order 0..14, from the hashed bytes
    assert pred.weights_sha256 == sums
    assert len(pred.models) == 15 and all(not m.training for m in pred.models)


def test_sha_mismatch_refused_before_jit_load(fake_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append(a))
    good = NV.nvauto_checksums(fake_dir)
    bad = dict(good)
    bad["NVAUTO/ts/model14.ts"] = "0" * 64  # the last file: nothing may be loaded before the check
    with pytest.raises(WeightsError, match="model14.ts: SHA-256 mismatch"):
        NV.build_nvauto(fake_dir, "cpu", {"manifest": bad})
    assert calls == []
    partial = {k: v for k, v in good.items() if not k.endswith("model3.ts")}
    with pytest.raises(WeightsError, match="no entry for NVAUTO/ts/model3.ts"):
        NV.build_nvauto(fake_dir, "cpu", {"manifest": partial})
    assert calls == []
    # a sha256sum-style manifest file is accepted too
    mf = fake_dir / "nvauto.sha256"
    mf.write_text("".join(f"{h}  ./{rel}\n" for rel, h in good.items()))
    monkeypatch.undo()
    assert NV.build_nvauto(fake_dir, "cpu", {"manifest": str(mf)}).weights_sha256 == good


def test_torchscript_outside_tree_refused(fake_dir, tmp_path, monkeypatch):
    root = tmp_path / "w"
    (root / "NVAUTO/ts").mkdir(parents=True)
    outside = tmp_path / "elsewhere.ts"
    outside.write_bytes((fake_dir / "NVAUTO/ts/model5.ts").read_bytes())
    for i in range(15):
        dst = root / f"NVAUTO/ts/model{i}.ts"
        if i == 5:
            os.symlink(outside, dst)
        else:
            dst.write_bytes((fake_dir / f"NVAUTO/ts/model{i}.ts").read_bytes())
    calls = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(WeightsError, match="outside the official file tree is refused"):
        NV.build_nvauto(root, "cpu", {})
    assert calls == []
    with pytest.raises(UsageError, match="separate weights file is refused"):
        NV.build_nvauto(root, "cpu", {"weights": str(outside)})
    monkeypatch.undo()
    # the same file is accepted when its content is pinned by a manifest
    pred = NV.build_nvauto(root, "cpu", {"manifest": NV.nvauto_checksums(fake_dir)})
    assert len(pred.models) == 15
    (root / "NVAUTO/ts/model9.ts").unlink()
    with pytest.raises(WeightsError, match="model9.ts"):
        NV.build_nvauto(root, "cpu", {})


# ----------------------------------------------------------------------------- recipe parameters
def test_official_recipe_parameters(fake_dir):
    pred = NV.build_nvauto(fake_dir, "cpu", {})
    inf = pred.inferer
    assert tuple(inf.roi_size) == (192, 192, 128)
    assert inf.overlap == pytest.approx(0.625)
    assert str(inf.mode) in ("gaussian", "BlendMode.GAUSSIAN")
    assert inf.sigma_scale == pytest.approx(0.125)
    sp = pred.spacing
    assert np.allclose(sp.pixdim, 1.0)
    assert sp.diagonal is False
    assert str(sp.sp_resample.mode) == "bilinear" and str(sp.sp_resample.padding_mode) == "border"
    assert sp.sp_resample.align_corners is False
    assert pred.normalize.nonzero is True and pred.normalize.channel_wise is True
    w = inf.roi_weight_map  # MONAI 0.9 Gaussian map: centre roi//2, floor at its own minimum
    assert tuple(w.shape) == (192, 192, 128) and float(w.max()) == 1.0
    assert tuple(int(i) for i in np.unravel_index(int(w.argmax()), w.shape)) == (96, 96, 64)
    assert float(w.min()) < 1e-9
    assert pred.amp is False  # CPU: fp32; fp16 autocast only on CUDA
    assert pred.inputs == ("trace", "adc")


@pytest.mark.parametrize("zooms", [ZOOMS, (0.45, 0.45, 5.0)])
def test_spacing_grid_rule(small, zooms):
    shape = (40, 36, 9) if zooms[2] == 5.0 else SHAPE
    trace, adc = synthetic_case(shape, zooms)
    img = small.preprocess(trace, adc)
    expect = tuple(int(round((n - 1) * s)) + 1 for n, s in zip(shape, zooms))
    assert tuple(img.shape) == (2,) + expect
    out_aff = img.affine.numpy()
    in_aff = trace.affine
    assert np.allclose(out_aff[:3, 3], in_aff[:3, 3], atol=1e-6)  # origin = first voxel centre
    assert np.allclose(np.linalg.norm(out_aff[:3, :3], axis=0), 1.0)
    assert np.allclose(out_aff[:3, :3], in_aff[:3, :3] / np.asarray(zooms), atol=1e-6)  # rotation kept


def test_normalisation_nonzero_channelwise(small):
    trace, adc = synthetic_case()
    img = small.preprocess(trace, adc).numpy()
    from monai.data import MetaTensor

    raw = np.stack([np.asarray(adc.dataobj), np.asarray(trace.dataobj)]).astype(np.float32)
    spaced = small.spacing(MetaTensor(torch.from_numpy(raw), affine=torch.as_tensor(trace.affine))).numpy()
    for c in range(2):
        nz = spaced[c] != 0
        assert np.all(img[c][~nz] == 0)  # zeros stay zero
        assert img[c][nz].mean() == pytest.approx(0.0, abs=1e-5)
        assert img[c][nz].std() == pytest.approx(1.0, abs=1e-4)  # population std, per channel
        expect = (spaced[c][nz] - spaced[c][nz].mean()) / spaced[c][nz].std()
        assert np.allclose(img[c][nz], expect, atol=1e-4)
    # channel 0 is the ADC: inside the brain it matches the ADC resampled here with scipy, not the DWI
    m = img.shape[1:]
    coords = np.meshgrid(*[np.arange(k) / z for k, z in zip(m, ZOOMS)], indexing="ij")
    nz = (img[0] != 0) & (img[1] != 0)
    for c, vol in enumerate((adc, trace)):
        own = ndimage.map_coordinates(np.asarray(vol.dataobj, float), coords, order=1, mode="nearest")
        other = ndimage.map_coordinates(np.asarray((trace, adc)[c].dataobj, float), coords, order=1, mode="nearest")
        assert np.corrcoef(img[c][nz], own[nz])[0, 1] > 0.9999
        assert np.corrcoef(img[c][nz], other[nz])[0, 1] < 0.9


def test_channel_order_model_sees_adc(tmp_path):
    make_fake_nvauto(tmp_path, models=[Channel0Net() for _ in range(15)])
    pred = NV.build_nvauto(tmp_path, "cpu", {"roi_size": ONE_WINDOW})
    trace, adc = synthetic_case()
    a, d = np.asarray(adc.dataobj).copy(), np.asarray(trace.dataobj).copy()
    inside = a > 0
    a[:15][inside[:15]] *= 3.0  # ADC bright in the first half of x
    d[15:][inside[15:]] *= 3.0  # DWI bright in the second half
    prob = pred.predict(nib.Nifti1Image(d, trace.affine), nib.Nifti1Image(a, adc.affine))
    first, second = prob[3:13][inside[3:13]].mean(), prob[17:27][inside[17:27]].mean()
    assert first > 0.9 and second < 0.3, (first, second)


def test_softmax_mean_of_15_and_native_grid(small):
    trace, adc = synthetic_case()
    prob = small.predict(trace, adc)
    assert prob.shape == SHAPE and prob.dtype == np.float32
    assert small.last_info["grid_1mm"] == GRID_1MM and small.last_info["models"] == 15
    image = small.preprocess(trace, adc)
    per_model = [small.model_probabilities(m, image) for m in small.models]
    for p in per_model:
        assert torch.allclose(p.sum(0), torch.ones_like(p[0]), atol=1e-5)  # softmax over the 2 channels
    natives = [small.to_native(p, image).numpy()[1] for p in per_model]
    assert np.allclose(prob, np.mean(natives, axis=0), atol=1e-5)  # invert-then-mean == mean-then-invert
    assert np.abs(prob - natives[0]).max() > 0.05  # really an ensemble, not model 0
    assert np.allclose(small.to_native(per_model[0], image).affine.numpy(), trace.affine, atol=1e-5)


def test_inverse_is_exact_index_scaling(small):
    """A field linear in the 1 mm index is recovered exactly at the native voxels: j = i * zoom."""
    trace, adc = synthetic_case()
    image = small.preprocess(trace, adc)
    j = np.indices(image.shape[1:]).astype(np.float32)
    field = torch.from_numpy(np.stack([j[0] + 2 * j[1], 0.5 * j[2]]))
    back = small.to_native(field, image).numpy()
    i = np.indices(SHAPE).astype(float)
    m = image.shape[1:]
    j_of_i = [np.minimum(i[k] * ZOOMS[k], m[k] - 1) for k in range(3)]  # border beyond the last 1 mm voxel
    expect0 = j_of_i[0] + 2 * j_of_i[1]
    expect1 = 0.5 * j_of_i[2]
    assert back.shape == (2,) + SHAPE
    assert np.abs(back[0] - expect0).max() < 2e-3
    assert np.abs(back[1] - expect1).max() < 2e-3


# ----------------------------------------------------------------------------- independent implementation
def _gauss(n, sigma_scale=0.125):
    """Official (MONAI 0.9) per-axis weight: the Gaussian integrated over each voxel, centre n // 2."""
    s = sigma_scale * n
    cdf = [0.5 * (1 + math.erf((k - n // 2 + 0.5) / (s * math.sqrt(2)))) for k in range(-1, n)]
    w = np.diff(cdf)
    return w / w.max()


def _starts(n, roi, overlap):
    step = max(int(roi * (1 - overlap)), 1)
    out, s = [], 0
    while True:
        out.append(min(s, n - roi))
        if s + roi >= n:
            return sorted(set(out))
        s += step


def reference_nvauto(models, dwi, adc, zooms, roi, overlap=0.625):
    """Straightforward numpy/scipy version of the recipe (float64)."""
    n = np.asarray(dwi.shape)
    m = np.round((n - 1) * np.asarray(zooms)).astype(int) + 1
    coords = np.meshgrid(*[np.arange(k) / z for k, z in zip(m, zooms)], indexing="ij")
    chans = []
    for vol in (adc, dwi):  # channel 0 = ADC
        r = ndimage.map_coordinates(vol.astype(np.float64), coords, order=1, mode="nearest")
        nz = r != 0
        r[nz] = (r[nz] - r[nz].mean()) / r[nz].std()
        chans.append(r)
    x = np.stack(chans)
    pads = [(max(r - k, 0) // 2, max(r - k, 0) - max(r - k, 0) // 2) for r, k in zip(roi, m)]
    x = np.pad(x, [(0, 0)] + pads)
    big = x.shape[1:]
    w = _gauss(roi[0])[:, None, None] * _gauss(roi[1])[None, :, None] * _gauss(roi[2])[None, None, :]
    mean_p = 0.0
    for model in models:
        acc, wsum = np.zeros((2,) + big), np.zeros(big)
        for a in _starts(big[0], roi[0], overlap):
            for b in _starts(big[1], roi[1], overlap):
                for c in _starts(big[2], roi[2], overlap):
                    sl = (slice(a, a + roi[0]), slice(b, b + roi[1]), slice(c, c + roi[2]))
                    win = torch.from_numpy(x[(slice(None),) + sl][None].astype(np.float32))
                    with torch.no_grad():
                        out = model(win)[0].double().numpy()
                    acc[(slice(None),) + sl] += out * w
                    wsum[sl] += w
        logits = (acc / wsum)[(slice(None),) + tuple(slice(p[0], p[0] + k) for p, k in zip(pads, m))]
        e = np.exp(logits - logits.max(0))
        mean_p = mean_p + e / e.sum(0) / len(models)
    back = np.meshgrid(*[np.arange(k) * z for k, z in zip(n, zooms)], indexing="ij")
    return ndimage.map_coordinates(mean_p[1], back, order=1, mode="nearest")


@pytest.mark.parametrize("roi", [SMALL_ROI, ONE_WINDOW])
def test_matches_independent_implementation(fake_dir, roi):
    """Agreement within 1e-4 (max abs probability difference).

    Both sides implement the same arithmetic, MONAI in float32 (resampling in float64, then cast)
    and this reference in float64 with the network in float32: differences come from float32
    rounding of the normalised input (~1e-7 relative), the blending sums and the softmax, i.e.
    ~1e-6 in probability; 1e-4 leaves margin for summation-order effects while still catching
    any recipe difference (a 1e-3 weight floor gave 1.6e-2, a half-voxel window shift or a wrong
    channel order give >1e-2).
    """
    full = NV.build_nvauto(fake_dir, "cpu", {"roi_size": roi})
    # 15 models on one window; 5 of them (still an average) on the 8-window case, for speed
    pred = full if roi == ONE_WINDOW else NV.NvautoPredictor(full.models[:5], None, "cpu", roi_size=roi)
    trace, adc = synthetic_case()
    got = pred.predict(trace, adc)
    ref = reference_nvauto(pred.models, np.asarray(trace.dataobj), np.asarray(adc.dataobj), ZOOMS, roi)
    err = np.abs(got - ref).max()
    assert err < 1e-4, err
    assert ref.std() > 0.05  # a non-trivial map


def test_no_flair_needed_and_registry_contract(small):
    trace, adc = synthetic_case()
    with pytest.raises(TypeError):
        small.predict(trace, adc, trace)  # exactly (trace, adc): FLAIR is never read
    assert isinstance(small.weights_sha256, dict) and len(small.weights_sha256) == 15
