"""SEALS member (models/seals): safe loading, Generic_UNet layout, the nnU-Net v1 recipe.

The last tests compare the predictor with an independent, straightforward implementation of the
same recipe written here (numpy resampling, functional network from the state dict, direct window
loop, analytic Gaussian) on the same fake official folder.
"""

from __future__ import annotations

import itertools
import json
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from bids_app.errors import WeightsError
from models.seals import SEALS_FILES, build_seals, fold_files, seals_checksums
from models.seals import predictor as P
from models.seals.checkpoint import load_model_checkpoint, load_state_dict_strict
from models.seals.network import build_network, count_parameters, expected_tensor_count
from models.seals.plans import plan_from_dict, restricted_loads
from models.weights import sha256_file
from tests.fake_weights.seals import ROOT, fake_plans, make_fake_seals

torch.set_num_threads(2)

SIDE_EFFECTS: list = []


def _side_effect(*args):  # would run if an unpickler executed foreign code
    SIDE_EFFECTS.append(args)
    return args


class _Evil:
    def __reduce__(self):
        return (_side_effect, ("pwned",))


@pytest.fixture(scope="module")
def fake_small(tmp_path_factory):
    """5 folds, base 2, 2 poolings, anisotropic patch, non-trivial transpose, mixed norm masks."""
    root = tmp_path_factory.mktemp("seals_small")
    info = make_fake_seals(root, base_features=2, num_pool=2, patch=(16, 12, 20), transpose_forward=(2, 0, 1),
                           use_mask_for_norm=(True, False), module_prefix=True, seed=3)
    return root, info


# ----------------------------------------------------------------------------- network layout
def test_generic_unet_keys_shapes_and_parameter_count():
    plans = fake_plans(base_features=32, num_pool=5, patch=(128, 128, 128))
    plan = plan_from_dict(plans)
    net = build_network(plan)
    sd = net.state_dict()
    assert len(sd) == 18 * 5 + 8 == expected_tensor_count(plan) == 98
    assert count_parameters(net) == 31_195_648
    assert sd["conv_blocks_context.0.blocks.0.conv.weight"].shape == (32, 2, 3, 3, 3)
    assert sd["conv_blocks_context.0.blocks.1.conv.weight"].shape == (32, 32, 3, 3, 3)
    assert sd["conv_blocks_context.4.blocks.0.conv.weight"].shape == (320, 256, 3, 3, 3)
    assert sd["conv_blocks_context.5.0.blocks.0.conv.weight"].shape == (320, 320, 3, 3, 3)
    assert sd["conv_blocks_context.5.1.blocks.0.instnorm.bias"].shape == (320,)
    assert sd["tu.0.weight"].shape == (320, 320, 2, 2, 2) and "tu.0.bias" not in sd
    assert sd["tu.4.weight"].shape == (64, 32, 2, 2, 2)
    assert sd["conv_blocks_localization.0.0.blocks.0.conv.weight"].shape == (320, 640, 3, 3, 3)
    assert sd["conv_blocks_localization.4.1.blocks.0.conv.weight"].shape == (32, 32, 3, 3, 3)
    assert sd["seg_outputs.0.weight"].shape == (2, 320, 1, 1, 1)
    assert sd["seg_outputs.4.weight"].shape == (2, 32, 1, 1, 1) and "seg_outputs.4.bias" not in sd
    assert not any("running" in k for k in sd)
    # units: strided-conv down-sampling, InstanceNorm affine eps 1e-5, LeakyReLU 0.01
    assert net.conv_blocks_context[0].blocks[0].conv.stride == (1, 1, 1)
    assert net.conv_blocks_context[1].blocks[0].conv.stride == (2, 2, 2)
    assert net.conv_blocks_context[1].blocks[1].conv.stride == (1, 1, 1)
    assert net.conv_blocks_context[5][0].blocks[0].conv.stride == (2, 2, 2)
    unit = net.conv_blocks_context[0].blocks[0]
    assert unit.instnorm.eps == 1e-5 and unit.instnorm.affine and not unit.instnorm.track_running_stats
    assert unit.lrelu.negative_slope == 0.01
    # the fake plan used in tests: 3 poolings -> 62 tensors
    assert len(build_network(plan_from_dict(fake_plans())).state_dict()) == 18 * 3 + 8


def test_anisotropic_plan_kernels_follow_v1():
    plans = fake_plans(base_features=4, num_pool=2, patch=(8, 32, 32),
                       pool_kernels=[[1, 2, 2], [2, 2, 2]], conv_kernels=[[1, 3, 3], [3, 3, 3], [3, 3, 3]])
    net = build_network(plan_from_dict(plans))
    sd = net.state_dict()
    assert sd["conv_blocks_context.0.blocks.0.conv.weight"].shape == (4, 2, 1, 3, 3)
    assert net.conv_blocks_context[0].blocks[0].conv.padding == (0, 1, 1)
    assert net.conv_blocks_context[1].blocks[0].conv.stride == (1, 2, 2)
    assert sd["tu.1.weight"].shape == (8, 4, 1, 2, 2)
    # v1 quirk: localization stage u uses conv_kernel_sizes[-(u+1)] -> the last one uses kernel 1
    assert sd["conv_blocks_localization.1.0.blocks.0.conv.weight"].shape == (4, 8, 3, 3, 3)
    out = net.eval()(torch.zeros(1, 2, 8, 32, 32))
    assert out.shape == (1, 2, 8, 32, 32)


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("prefix", [True, False])
def test_loads_both_key_styles_and_records_hashes(tmp_path, prefix):
    info = make_fake_seals(tmp_path, module_prefix=prefix, num_pool=2, patch=(16, 16, 16), folds=range(5))
    pred = build_seals(tmp_path, "cpu", {"tta": False, "folds": (0, 3)})
    assert pred.folds == [0, 3] and len(pred.networks) == 2
    for net, k in zip(pred.networks, (0, 3)):
        got = net.state_dict()
        for key, value in info["state_dicts"][k].items():
            assert torch.equal(got[key], value), key
    assert set(pred.weights_sha256) == {SEALS_FILES[0], *fold_files(0), *fold_files(3)}
    rel = fold_files(3)[0]
    assert pred.weights_sha256[rel] == sha256_file(tmp_path / rel)
    sums = seals_checksums(tmp_path)
    assert list(sums) == list(SEALS_FILES) and sums[rel] == pred.weights_sha256[rel]


def test_strict_loading_reports_missing_extra_and_shape(tmp_path):
    plan = plan_from_dict(fake_plans(num_pool=2, patch=(16, 16, 16)))
    good = build_network(plan).state_dict()
    net = build_network(plan)
    missing = {k: v for k, v in good.items() if k != "seg_outputs.0.weight"}
    with pytest.raises(WeightsError, match=r"1 missing key\(s\) \(seg_outputs\.0\.weight\)"):
        load_state_dict_strict(net, missing, "f.model")
    extra = dict(good, **{"module.td.0.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match=r"1 unexpected key\(s\) \(td\.0\.weight\)"):
        load_state_dict_strict(net, extra, "f.model")
    bad = dict(good, **{"tu.0.weight": torch.zeros(16, 8, 3, 3, 3)})
    with pytest.raises(WeightsError, match=r"shape mismatch.*tu\.0\.weight: file \(16, 8, 3, 3, 3\)"):
        load_state_dict_strict(net, bad, "f.model")
    # end to end: a fold whose checkpoint lacks a tensor is refused with the file named
    make_fake_seals(tmp_path, num_pool=2, patch=(16, 16, 16))
    path = tmp_path / fold_files(2)[0]
    ckpt = torch.load(path, weights_only=False)
    ckpt["state_dict"].pop("module.conv_blocks_localization.1.1.blocks.0.instnorm.bias")
    torch.save(ckpt, path)
    with pytest.raises(WeightsError, match=r"fold_2/model_final_checkpoint\.model: weights do not match.*missing"):
        build_seals(tmp_path, "cpu", {})


def test_manifest_is_checked_before_anything_is_deserialised(tmp_path):
    make_fake_seals(tmp_path, num_pool=2, patch=(16, 16, 16))
    sums = seals_checksums(tmp_path)
    manifest = tmp_path / "seals.sha256"
    manifest.write_text("".join(f"{h}  {rel}\n" for rel, h in sums.items()))
    assert build_seals(tmp_path, "cpu", {"manifest": str(manifest), "folds": [1]}).weights_sha256
    # tamper with plans.pkl: refused on the checksum, before unpickling
    plans_path = tmp_path / SEALS_FILES[0]
    plans_path.write_bytes(pickle.dumps({"x": _Evil()}))
    SIDE_EFFECTS.clear()
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        build_seals(tmp_path, "cpu", {"manifest": {k: v for k, v in sums.items()}})
    assert SIDE_EFFECTS == []
    # without a manifest the restricted unpickler refuses the foreign global, nothing is executed
    with pytest.raises(WeightsError, match=r"refused to unpickle global .*_side_effect"):
        build_seals(tmp_path, "cpu", {})
    assert SIDE_EFFECTS == []


def test_restricted_unpickler_numpy_names_of_numpy1_and_2():
    obj = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "s": np.float64(2.5),
           "o": __import__("collections").OrderedDict(x=[1, 2]), "t": (1, {3})}
    raw = pickle.dumps(obj, protocol=2)
    for name in (b"numpy._core.multiarray", b"numpy.core.multiarray"):
        data = raw.replace(b"numpy._core.multiarray", name)
        back = restricted_loads(data)
        assert np.array_equal(back["a"], obj["a"]) and back["s"] == 2.5 and back["o"]["x"] == [1, 2]
    for proto in (4, 5):
        assert np.array_equal(restricted_loads(pickle.dumps(obj, protocol=proto))["a"], obj["a"])
    with pytest.raises(WeightsError, match="refused"):
        restricted_loads(pickle.dumps(_Evil()))
    with pytest.raises(WeightsError, match=r"refused to unpickle global os\.system"):
        restricted_loads(b"cos\nsystem\n(S'true'\ntR.")


def test_model_checkpoint_with_foreign_objects_uses_inert_stubs(tmp_path):
    plan = plan_from_dict(fake_plans(num_pool=2, patch=(16, 16, 16)))
    sd = build_network(plan).state_dict()
    buf = tmp_path / "x.model"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}, "extra": _Evil(),
                "plot_stuff": ([np.float64(1.0)],)}, buf)
    SIDE_EFFECTS.clear()
    ckpt = load_model_checkpoint(buf.read_bytes(), "x.model")
    assert SIDE_EFFECTS == [] and ckpt["epoch"] == 3
    net = build_network(plan)
    load_state_dict_strict(net, ckpt["state_dict"], "x.model")
    with pytest.raises(WeightsError, match="not an nnU-Net v1 checkpoint"):
        torch.save({"weights": 1}, buf)
        load_model_checkpoint(buf.read_bytes(), "x.model")


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(WeightsError, match="11 of 11 file"):
        seals_checksums(tmp_path)
    with pytest.raises(WeightsError, match="missing"):
        build_seals(tmp_path, "cpu", {})


# ----------------------------------------------------------------------------- recipe pieces
def test_grid_size_is_proper_integers_for_large_fov():
    assert P.grid_size_1mm((112, 112, 73), (2.0, 2.0, 2.0)) == (224, 224, 146)
    assert P.grid_size_1mm((300, 150, 60), (1.0, 2.0, 5.0)) == (300, 300, 300)  # uint8 would give 44
    assert np.array([300]).astype(np.uint8)[0] == 44
    assert P.grid_size_1mm((200, 10, 10), (np.float32(0.9), 1.5, 1.0)) == (180, 15, 10)
    assert P.grid_size_1mm((7,), (1.3,)) == (9,)  # floor, as the official code


def test_resampling_is_itk_linear_index_scaling():
    rng = np.random.default_rng(1)
    a = rng.random((5, 6, 7)).astype(np.float32)  # (z, y, x)
    out = P.resample_zyx(a, (2.0, 1.5, 3.0), (14, 9, 15), (1.0, 1.0, 1.0))
    ref = _ref_resample_xyz(a.transpose(2, 1, 0), (2.0, 1.5, 3.0), (14, 9, 15), (1.0, 1.0, 1.0))
    assert out.dtype == np.float32 and out.shape == (15, 9, 14)
    np.testing.assert_allclose(out, ref.transpose(2, 1, 0), atol=1e-6)
    assert out[:, :, 13].max() == 0  # x index 13 -> source 6.5 >= 7 - 0.5: outside -> background 0


def test_crop_and_normalisation():
    data = np.zeros((2, 10, 12, 14), np.float32)
    data[0, 2:8, 3:9, 4:12] = 5.0
    data[0, 4:6, 5:7, 6:9] = 0.0  # hole inside: filled
    data[1, 1, 6, 6] = 2.0  # other channel extends the box
    bbox, mask = P.nonzero_bbox(data)
    assert bbox == [[1, 8], [3, 9], [4, 12]]
    assert mask[5, 6, 7] and not mask[0, 0, 0]
    crop = data[:, 1:8, 3:9, 4:12]
    m = mask[1:8, 3:9, 4:12]
    crop = crop + np.random.default_rng(0).random(crop.shape).astype(np.float32) * (crop != 0)
    plan = plan_from_dict(fake_plans(use_mask_for_norm=(True, False)))
    out = P.normalize(crop, m, plan)
    inside = out[0][m]
    assert abs(inside.mean()) < 1e-5 and abs(inside.std() - 1) < 1e-4 and (out[0][~m] == 0).all()
    vals = crop[0][m].astype(np.float64)
    np.testing.assert_allclose(out[0][m], (vals - vals.mean()) / (vals.std(ddof=0) + 1e-8), atol=1e-5)
    assert abs(out[1].mean()) < 1e-5 and abs(out[1].std() - 1) < 1e-4  # whole crop
    assert P.nonzero_bbox(np.zeros((2, 3, 3, 3)))[0] is None


def test_window_positions_gaussian_and_padding():
    assert P.compute_steps((64,), (110,)) == [[0, 23, 46]]  # the nnU-Net docstring example
    assert P.compute_steps((32, 32, 32), (100, 32, 48)) == [[0, 14, 27, 41, 54, 68], [0], [0, 16]]
    assert P.compute_steps((128, 128, 128), (150, 190, 140)) == [[0, 22], [0, 62], [0, 12]]
    g = P.gaussian_importance_map((8, 16, 8))  # sigma (1, 2, 1), centre (4, 8, 4)
    assert g.dtype == np.float32 and g.max() == 1.0 and g[4, 8, 4] == 1.0 and g.min() > 0
    assert g[5, 8, 4] == pytest.approx(np.exp(-0.5), rel=1e-6)
    assert g[4, 12, 4] == pytest.approx(np.exp(-16 / 8), rel=1e-6)
    assert g[0, 0, 0] == pytest.approx(np.exp(-8 - 8 - 8), rel=1e-5)
    padded, sl = P.pad_to_patch(np.ones((2, 5, 32, 40), np.float32), (8, 32, 32))
    assert padded.shape == (2, 8, 32, 40) and sl == (slice(1, 6), slice(0, 32), slice(0, 40))
    assert padded[:, 0].sum() == 0 and padded[:, 6:].sum() == 0


def test_mirroring_tta_averages_the_8_flips():
    torch.manual_seed(0)
    net = build_network(plan_from_dict(fake_plans(base_features=2, num_pool=2, patch=(8, 8, 8)))).eval()
    x = torch.randn(1, 2, 8, 8, 8)
    with torch.inference_mode():
        got = P._softmax_tta(net, x, True, False)
        manual = torch.zeros_like(got)
        for flips in itertools.product([False, True], repeat=3):
            axes = [2 + i for i, f in enumerate(flips) if f]
            y = torch.softmax(net(torch.flip(x, axes) if axes else x), 1)
            manual += (torch.flip(y, axes) if axes else y) / 8
        torch.testing.assert_close(got, manual, atol=1e-6, rtol=0)
        # the average over the flip group is flip-equivariant; a single pass is not
        flipped = P._softmax_tta(net, torch.flip(x, (2, 4)), True, False)
        torch.testing.assert_close(flipped, torch.flip(got, (2, 4)), atol=1e-6, rtol=0)
        plain = P._softmax_tta(net, x, False, False)
        torch.testing.assert_close(plain, torch.softmax(net(x), 1))
        assert not torch.allclose(plain, got, atol=1e-4)


# ----------------------------------------------------------------------------- end to end
def _case(shape, zooms, centre, radii, seed=0):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[(np.arange(n) + 0.5) * z for n, z in zip(shape, zooms)], indexing="ij")
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
    brain = r2 < 1
    lesion = r2 < 0.25
    dwi = np.where(brain, 300 + 40 * rng.standard_normal(shape) + 500 * lesion, 0).astype(np.float32)
    adc = np.where(brain, 0.8 + 0.1 * rng.standard_normal(shape) - 0.4 * lesion, 0).astype(np.float32)
    aff = np.diag(list(zooms) + [1.0])
    aff[:3, 3] = [-40.0, 12.0, 7.5]
    return nib.Nifti1Image(dwi, aff), nib.Nifti1Image(adc, aff)


def test_output_on_native_grid_for_fov_over_256mm(tmp_path):
    make_fake_seals(tmp_path, base_features=2, num_pool=2, patch=(16, 16, 16), seed=5)
    pred = build_seals(tmp_path, "cpu", {"folds": [0], "mirroring": False})
    # 150 x 2 mm = 300 mm along x; the head sits beyond 256 mm, which the uint8 bug would cut off
    dwi, adc = _case((150, 8, 6), (2.0, 2.0, 2.5), centre=(285.0, 8.0, 7.5), radii=(9.0, 6.0, 6.0))
    prob = pred.predict(dwi, adc)
    assert prob.shape == (150, 8, 6) and prob.dtype == np.float32
    assert pred.last_info["grid_1mm_xyz"] == (300, 16, 15)
    assert pred.last_info["crop_bbox_zyx"][2][0] >= 270  # x range of the crop (z, y, x order)
    inside = np.asarray(dwi.dataobj) != 0
    assert prob[inside].max() > 0 and prob[:128].max() == 0
    assert 0 <= prob.min() and prob.max() <= 1
    empty = nib.Nifti1Image(np.zeros((6, 6, 6), np.float32), np.eye(4))
    assert not pred.predict(empty, empty).any()


def test_predictor_matches_independent_implementation(fake_small):
    root, info = fake_small
    pred = build_seals(root, "cpu", {})
    assert pred.mirroring and len(pred.networks) == 5
    dwi, adc = _case((12, 10, 7), (2.0, 1.5, 3.0), centre=(12.0, 7.5, 10.5), radii=(8.5, 5.0, 5.5), seed=2)
    got = pred.predict(dwi, adc)
    ref = _reference_seals(dwi, adc, info["plans"], [info["state_dicts"][k] for k in range(5)])
    assert got.shape == ref.shape == (12, 10, 7)
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()
    assert pred.last_info["windows"] == [2] * 5 and ref.max() > 0.05 and np.ptp(ref[ref > 0]) > 1e-3
    json.dumps(pred.weights_sha256)


# ----------------------------------------------------------------------------- reference implementation
def _ref_resample_axis(a, axis, n_out, scale):
    """Linear resampling along one axis, ITK semantics: source index j*scale, inside iff in
    [-0.5, n - 0.5), neighbours clamped to the edge, 0 outside."""
    n_in = a.shape[axis]
    src = np.arange(n_out) * scale
    valid = (src >= -0.5) & (src < n_in - 0.5)
    c = np.clip(src, 0, n_in - 1)
    i0 = np.floor(c).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = c - i0
    shape = [1] * a.ndim
    shape[axis] = n_out
    out = np.take(a, i0, axis) * (1 - w).reshape(shape) + np.take(a, i1, axis) * w.reshape(shape)
    return out * valid.reshape(shape)


def _ref_resample_xyz(a, spacing_in, size_out, spacing_out):
    out = a.astype(np.float64)
    for axis in range(3):
        out = _ref_resample_axis(out, axis, size_out[axis], spacing_out[axis] / spacing_in[axis])
    return out


def _ref_net(sd, x, pools):
    def unit(prefix, x, stride):
        w = sd[prefix + ".conv.weight"]
        pad = [1 if k == 3 else 0 for k in w.shape[2:]]
        x = F.conv3d(x, w, sd[prefix + ".conv.bias"], stride=stride, padding=pad)
        x = F.instance_norm(x, weight=sd[prefix + ".instnorm.weight"], bias=sd[prefix + ".instnorm.bias"], eps=1e-5)
        return F.leaky_relu(x, 0.01)

    n = len(pools)
    skips = []
    for d in range(n):
        x = unit(f"conv_blocks_context.{d}.blocks.0", x, pools[d - 1] if d else 1)
        x = unit(f"conv_blocks_context.{d}.blocks.1", x, 1)
        skips.append(x)
    x = unit(f"conv_blocks_context.{n}.0.blocks.0", x, pools[-1])
    x = unit(f"conv_blocks_context.{n}.1.blocks.0", x, 1)
    for u in range(n):
        x = F.conv_transpose3d(x, sd[f"tu.{u}.weight"], stride=pools[n - 1 - u])
        x = torch.cat([x, skips[n - 1 - u]], 1)
        x = unit(f"conv_blocks_localization.{u}.0.blocks.0", x, 1)
        x = unit(f"conv_blocks_localization.{u}.1.blocks.0", x, 1)
    return F.conv3d(x, sd[f"seg_outputs.{n - 1}.weight"])


def _reference_seals(dwi_img, adc_img, plans, state_dicts):
    stage = plans["plans_per_stage"][0]
    patch = [int(v) for v in stage["patch_size"]]
    pools = [list(p) for p in stage["pool_op_kernel_sizes"]]
    tf, tb = list(plans["transpose_forward"]), list(plans["transpose_backward"])
    zooms = [float(z) for z in dwi_img.header.get_zooms()[:3]]
    native = dwi_img.shape
    size = [int(np.floor(n * z)) for n, z in zip(native, zooms)]
    # 1 mm grid, then SimpleITK array order (z, y, x)
    chans = [_ref_resample_xyz(np.asarray(im.dataobj), zooms, size, [1, 1, 1]).transpose(2, 1, 0)
             for im in (dwi_img, adc_img)]
    data = np.stack(chans)
    mask = ndimage.binary_fill_holes((data[0] != 0) | (data[1] != 0))
    idx = np.where(mask)
    box = [(int(i.min()), int(i.max()) + 1) for i in idx]
    sl = tuple(slice(a, b) for a, b in box)
    data, mask = data[(slice(None),) + sl], mask[sl]
    data, mask = data.transpose([0] + [t + 1 for t in tf]), mask.transpose(tf)
    for c in range(2):
        if plans["use_mask_for_norm"][c]:
            v = data[c][mask]
            data[c] = np.where(mask, (data[c] - v.mean()) / (v.std() + 1e-8), 0)
        else:
            data[c] = (data[c] - data[c].mean()) / (data[c].std() + 1e-8)
    # pad (centred) to the patch, windows, analytic Gaussian
    shape = data.shape[1:]
    padded_shape = [max(s, p) for s, p in zip(shape, patch)]
    lo = [(q - s) // 2 for q, s in zip(padded_shape, shape)]
    padded = np.zeros((2, *padded_shape))
    padded[(slice(None),) + tuple(slice(a, a + s) for a, s in zip(lo, shape))] = data
    starts = []
    for q, p in zip(padded_shape, patch):
        k = int(np.ceil((q - p) / (p / 2))) + 1
        starts.append(sorted({int(round((q - p) * i / (k - 1))) if k > 1 else 0 for i in range(k)}))
    axes = [np.exp(-((np.arange(p) - p // 2) ** 2) / (2 * (p / 8) ** 2)) for p in patch]
    gauss = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    total = np.zeros((2, *shape))
    x_all = torch.from_numpy(padded).float()[None]
    for sd in state_dicts:
        acc = np.zeros((2, *padded_shape))
        wsum = np.zeros(padded_shape)
        for a in starts[0]:
            for b in starts[1]:
                for c in starts[2]:
                    win = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
                    x = x_all[(slice(None), slice(None)) + win]
                    prob = torch.zeros(1, 2, *patch)
                    with torch.no_grad():
                        for flips in itertools.product([0, 1], repeat=3):
                            dims = [2 + i for i, f in enumerate(flips) if f]
                            xi = torch.flip(x, dims) if dims else x
                            y = torch.softmax(_ref_net(sd, xi, pools), 1)
                            prob += (torch.flip(y, dims) if dims else y) / 8
                    acc[(slice(None),) + win] += prob[0].double().numpy() * gauss
                    wsum[win] += gauss
        soft = (acc / wsum)[(slice(None),) + tuple(slice(a, a + s) for a, s in zip(lo, shape))]
        total += soft
    total /= len(state_dicts)
    total = total.transpose([0] + [t + 1 for t in tb])
    p1 = np.zeros(chans[0].shape)
    p1[sl] = total[1]
    return _ref_resample_xyz(p1.transpose(2, 1, 0), [1, 1, 1], native, zooms).astype(np.float32)
