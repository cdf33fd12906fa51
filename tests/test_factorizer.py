"""FACTORIZER member: architectures (key tables, counts), checkpoint reading, NMF/HALS, recipe."""

from __future__ import annotations

import io
import itertools
import math
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bids_app.errors import WeightsError
from models.factorizer import checkpoint as C
from models.factorizer import predictor as P
from models.factorizer.resunet import ResUNet
from models.factorizer.swin_factorizer import SwinFactorizer, hals_rank1, sw_dematricize, sw_matricize
from tests.fake_weights.factorizer import SMALL_WIDTHS, make_fake_factorizer, relpath

W = (32, 64, 128, 256, 512)


# ----------------------------------------------------------------------------- expected key tables
def _basic(prefix, c_in, c_out):
    keys = {}
    for conv, ci in (("conv1", c_in), ("conv2", c_out)):
        keys[f"{prefix}.{conv}.weight"] = (c_out, ci, 3, 3, 3)
        keys[f"{prefix}.{conv}.bias"] = (c_out,)
    for norm in ("norm1", "norm2"):
        keys[f"{prefix}.{norm}.weight"] = (c_out,)
        keys[f"{prefix}.{norm}.bias"] = (c_out,)
    if c_in != c_out:
        keys[f"{prefix}.shortcut.weight"] = (c_out, c_in, 1, 1, 1)
    return keys


def _factorizer(prefix, c_in, c_out, pos=None):
    w = c_out
    keys = {}
    if c_in != c_out:
        keys[f"{prefix}.adapter.0.linear.weight"] = (w, c_in, 1)
    if pos:
        keys[f"{prefix}.pos_embed.pos"] = (1, c_in, pos, pos, pos)
    n, m = f"{prefix}.blocks.nmf.fn", f"{prefix}.blocks.mlp.fn"
    keys.update({f"{n}.0.norm.weight": (w,), f"{n}.0.norm.bias": (w,), f"{n}.1.in_proj.linear.weight": (w, w, 1),
                 f"{n}.1.factorize.init.u0": (8, 1), f"{n}.1.factorize.init.v0": (64, 1),
                 f"{n}.1.out_proj.linear.weight": (w, w, 1), f"{n}.1.out_proj.linear.bias": (w,),
                 f"{m}.0.norm.weight": (w,), f"{m}.0.norm.bias": (w,),
                 f"{m}.1.block.0.linear.weight": (2 * w, w, 1), f"{m}.1.block.0.linear.bias": (2 * w,),
                 f"{m}.1.block.3.linear.weight": (w, 2 * w, 1), f"{m}.1.block.3.linear.bias": (w,)})
    return keys


def expected_keys(arch, widths=W):
    """The key table of the fact sheet (written independently of the model code)."""
    swin = arch == "swin-factorizer"
    keys = {"stem.weight": (widths[0], 3, 3, 3, 3)}
    for i, w in enumerate(widths):
        if i == 0:
            p = "encoder.blocks.0.blocks.0"
        else:
            keys[f"encoder.blocks.{i}.blocks.0.weight"] = (w, widths[i - 1], 2, 2, 2)
            p = f"encoder.blocks.{i}.blocks.1"
        keys.update(_factorizer(p, w, w, 4 if i == 4 else None) if swin else _basic(p, w, w))
    for j in range(4):
        w_in, w_out = widths[4 - j], widths[3 - j]
        keys[f"decoder.blocks.{j}.upsample.weight"] = (w_in, w_out, 2, 2, 2)
        keys[f"decoder.blocks.{j}.upsample.bias"] = (w_out,)
        p = f"decoder.blocks.{j}.blocks.0"
        keys.update(_factorizer(p, 2 * w_out, w_out) if swin else _basic(p, 2 * w_out, w_out))
    for k in range(3):
        keys[f"heads.{k}.weight"] = (1, widths[k], 1, 1, 1)
        keys[f"heads.{k}.bias"] = (1,)
    return keys


@pytest.mark.parametrize("cls,arch,n_tensors,n_params,n_buffer_values", [
    (ResUNet, "resunet", 95, 28_877_667, 0),
    (SwinFactorizer, "swin-factorizer", 141, 5_624_547, 648),
])
def test_real_size_key_table_and_counts(cls, arch, n_tensors, n_params, n_buffer_values):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        net = cls()
    sd = net.state_dict()
    got = {k: tuple(v.shape) for k, v in sd.items()}
    assert got == expected_keys(arch)
    assert len(sd) == n_tensors
    assert sum(p.numel() for p in net.parameters()) == n_params
    assert sum(b.numel() for b in net.buffers()) == n_buffer_values
    # strict loading accepts exactly these names (with 'net.' in the checkpoint) and refuses others
    sd_net = {f"net.{k}": torch.zeros(v) for k, v in got.items()} if arch == "swin-factorizer" else None
    if sd_net is not None:
        loaded, a, widths = C.build_network(C.net_state_dict({"state_dict": sd_net}))
        assert a == arch and widths == W and isinstance(loaded, cls)


@pytest.mark.parametrize("cls", [ResUNet, SwinFactorizer])
def test_real_size_head_shapes(cls):
    with torch.device("meta"):
        net = cls().eval()
        out = net(torch.empty(1, 3, 64, 64, 64))
    assert [tuple(o.shape) for o in out] == [(1, 1, 64, 64, 64), (1, 1, 32, 32, 32), (1, 1, 16, 16, 16)]


def test_small_forward_head_shapes():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64, 64)
    with torch.inference_mode():
        out = SwinFactorizer(SMALL_WIDTHS).eval()(x)
    assert [tuple(o.shape) for o in out] == [(1, 1, 64, 64, 64), (1, 1, 32, 32, 32), (1, 1, 16, 16, 16)]
    assert all(torch.isfinite(o).all() for o in out)
    with pytest.raises(ValueError, match="64"):
        SwinFactorizer(SMALL_WIDTHS)(torch.zeros(1, 3, 32, 32, 32))


# ----------------------------------------------------------------------------- NMF / matricization
def _np_hals(x, u0, v0, iters=5, eps=1e-8):
    u, v = u0.astype(np.float64), v0.astype(np.float64)
    for _ in range(iters):
        u = np.maximum((x @ v + eps) / (v.T @ v + eps), 0)
        v = np.maximum((x.T @ u + eps) / (u.T @ u + eps), 0)
    return u @ v.T


def test_hals_rank1_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.random((6, 8, 64)).astype(np.float32) * (rng.random((6, 8, 64)) > 0.4)
    u0, v0 = rng.random((8, 1)).astype(np.float32), rng.random((64, 1)).astype(np.float32)
    got = hals_rank1(torch.from_numpy(x), torch.from_numpy(u0), torch.from_numpy(v0)).numpy()
    want = np.stack([_np_hals(m.astype(np.float64), u0, v0) for m in x])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    zero = hals_rank1(torch.zeros(1, 8, 64), torch.from_numpy(u0), torch.from_numpy(v0))
    assert torch.isfinite(zero).all()


def test_sw_matricize_matches_rolled_windows():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 16, 8, 12, 4)).astype(np.float32)
    m = sw_matricize(torch.from_numpy(x)).numpy()          # (4*2*2, G, 8, 64)
    assert m.shape == (16, 2 * 3 * 1, 8, 64)
    for s, b, h, (g0, g1, g2) in itertools.product(range(4), range(2), range(2), itertools.product(range(2), range(3), range(1))):
        xs = np.roll(x, (s, s, s), axis=(2, 3, 4))
        win = xs[b, h * 8:(h + 1) * 8, g0 * 4:g0 * 4 + 4, g1 * 4:g1 * 4 + 4, g2 * 4:g2 * 4 + 4].reshape(8, 64)
        np.testing.assert_array_equal(m[(s * 2 + b) * 2 + h, (g0 * 3 + g1) * 1 + g2], win)
    back = sw_dematricize(torch.from_numpy(m), x.shape).numpy()
    np.testing.assert_allclose(back, x, atol=1e-6)


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    sds = make_fake_factorizer(root)
    return root, sds


def test_fake_folder_loads_strictly_with_checksums(fake_dir):
    root, sds = fake_dir
    assert set(sds) == set(P.FACTORIZER_FILES)
    nets, names, shas, archs = P.load_models(root)
    assert names == list(P.FACTORIZER_FILES)
    for net, rel in zip(nets, names):
        assert isinstance(net, SwinFactorizer if "swin" in rel else ResUNet)
        assert archs[rel] == ("swin-factorizer" if "swin" in rel else "resunet", SMALL_WIDTHS)
        got = net.state_dict()
        assert set(got) == set(sds[rel])
        assert all(torch.equal(got[k], sds[rel][k]) for k in got)
        assert {k: tuple(v.shape) for k, v in got.items()} == expected_keys(archs[rel][0], SMALL_WIDTHS)
    assert shas == P.factorizer_checksums(root)
    pred = P.build_factorizer(root, "cpu", {"manifest": dict(shas)})
    assert pred.weights_sha256 == shas and pred.dropout_at_inference


def test_manifest_mismatch_refuses_before_unpickling(fake_dir, monkeypatch):
    root, _ = fake_dir
    shas = P.factorizer_checksums(root)
    bad = dict(shas)
    bad[P.FACTORIZER_FILES[3]] = "0" * 64
    calls = []
    monkeypatch.setattr(C, "load_bytes", lambda *a, **k: calls.append(a) or {})
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        P.load_models(root, P.FACTORIZER_FILES[3:4], bad)
    assert calls == []
    with pytest.raises(WeightsError, match="no entry"):
        P.load_models(root, P.FACTORIZER_FILES, {P.FACTORIZER_FILES[0]: shas[P.FACTORIZER_FILES[0]]})


def test_checkpoint_hyper_parameters_become_stubs(fake_dir):
    root, _ = fake_dir
    ckpt, sha = C.read_checkpoint(root / relpath(0, "swin-factorizer"))
    hp = ckpt["hyper_parameters"]
    assert isinstance(hp, C.Stub) and hp._stub_module == "pytorch_lightning.utilities.parsing"
    net_cls = hp["network"][0]
    assert issubclass(net_cls, C.Stub) and net_cls._stub_name == "SegmentationFactorizer"
    assert issubclass(hp["optimizer"][0], C.Stub)               # torch.optim.AdamW -> stub
    assert issubclass(hp["loss"][0], C.Stub)                    # monai -> stub
    assert ckpt["epoch"] == 1999 and len(sha) == 64


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("payload", [_Evil(), {"state_dict": {}, "x": _Evil()}])
def test_restricted_unpickler_refuses_os_system(tmp_path, payload):
    path = tmp_path / "evil.ckpt"
    torch.save(payload, path)
    with pytest.raises(C.UnsafeCheckpointError, match="os.system|posix.system"):
        C.read_checkpoint(path)
    raw = pickle.dumps(payload)
    with pytest.raises(pickle.UnpicklingError):
        C.RestrictedUnpickler(io.BytesIO(raw)).load()
    for mod, name in (("builtins", "eval"), ("builtins", "getattr"), ("subprocess", "Popen"),
                      ("torch.storage", "_load_from_bytes")):
        with pytest.raises(C.UnsafeCheckpointError):
            C.RestrictedUnpickler(io.BytesIO(b"")).find_class(mod, name)


def test_bad_state_dict_names_refused():
    net = ResUNet(SMALL_WIDTHS)
    sd = {f"net.{k}": v for k, v in net.state_dict().items()}
    sd["net.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="unexpected"):
        C.build_network(C.net_state_dict({"state_dict": sd}))
    with pytest.raises(WeightsError, match="net."):
        C.net_state_dict({"state_dict": {"stem.weight": torch.zeros(1)}})


# ----------------------------------------------------------------------------- recipe
def _reference_logits(sds, rels, image, spacing):
    """Independent straightforward recipe: numpy z-score, torch resize, explicit window loop."""
    chans = []
    for a in image:
        a = a.astype(np.float64)
        nz = a != 0
        out = np.zeros_like(a)
        out[nz] = (a[nz] - a[nz].mean()) / a[nz].std()
        chans.append(out)
    x = torch.tensor(np.stack(chans)[None], dtype=torch.float32)
    native = x.shape[2:]
    if not np.allclose(spacing, 2.0):
        size = [int(round(n * s / 2.0)) for n, s in zip(native, spacing)]
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    shape = x.shape[2:]
    pad = [max(64 - n, 0) for n in shape]
    pads = []
    for p in reversed(pad):
        pads += [p // 2, p - p // 2]
    xp = F.pad(x, pads)
    nets = []
    for rel in rels:
        net = (SwinFactorizer if "swin" in rel else ResUNet)(SMALL_WIDTHS)
        net.load_state_dict(sds[rel])
        nets.append(net.eval())
    starts = []
    for n in xp.shape[2:]:
        k = math.ceil((n - 64) / 32) + 1
        starts.append(sorted({min(i * 32, n - 64) for i in range(k)}))
    acc = torch.zeros(1, 1, *xp.shape[2:])
    cnt = torch.zeros_like(acc)
    with torch.no_grad():
        for a, b, c in itertools.product(*starts):
            win = xp[..., a:a + 64, b:b + 64, c:c + 64]
            logit = sum(net(win)[0] for net in nets) / len(nets)
            acc[..., a:a + 64, b:b + 64, c:c + 64] += logit
            cnt[..., a:a + 64, b:b + 64, c:c + 64] += 1
    out = (acc / cnt)[..., pad[0] // 2:pad[0] // 2 + shape[0], pad[1] // 2:pad[1] // 2 + shape[1],
                      pad[2] // 2:pad[2] // 2 + shape[2]]
    if tuple(out.shape[2:]) != tuple(native):
        out = F.interpolate(out, size=tuple(native), mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def _case(shape, spacing, seed=0):
    rng = np.random.default_rng(seed)
    aff = np.diag([*spacing, 1.0])
    imgs = []
    for k in range(3):
        data = (rng.random(shape) * 100 + 10 * k) * (rng.random(shape) > 0.3)
        imgs.append(nib.Nifti1Image(data.astype(np.float32), aff))
    return imgs


def test_predictor_matches_independent_recipe(fake_dir):
    root, sds = fake_dir
    rels = [relpath(1, "resunet"), relpath(2, "swin-factorizer")]
    nets, names, shas, _ = P.load_models(root, rels)
    pred = P.FactorizerPredictor(nets, names, shas, dropout_at_inference=False)
    imgs = _case((56, 40, 24), (2.4, 2.0, 3.0))        # -> (67, 40, 36) at 2 mm: 2 windows + padding
    logits = pred.predict_logits(*imgs)
    prob = pred.predict(*imgs)
    ref = _reference_logits(sds, rels, np.stack([np.asarray(i.dataobj) for i in imgs]), (2.4, 2.0, 3.0))
    assert logits.shape == prob.shape == (56, 40, 24) and prob.dtype == np.float32
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-ref)), atol=1e-4)
    assert np.array_equal(prob >= 0.5, logits >= 0)


def test_resampling_rule():
    assert P.resampled_size((112, 112, 73), (2.0, 2.0, 2.0)) is None
    assert P.resampled_size((56, 40, 24), (2.4, 2.0, 3.0)) == (67, 40, 36)
    assert P.resampled_size((75, 10, 10), (1.0, 1.0, 1.0))[0] == 38     # 37.5 -> 38 (half to even)
    assert P.resampled_size((73, 10, 10), (1.0, 1.0, 1.0))[0] == 36     # 36.5 -> 36


def test_faithful_dropout_reproducible_with_seed(fake_dir):
    root, _ = fake_dir
    nets, names, shas, _ = P.load_models(root, [relpath(0, "swin-factorizer")])
    imgs = _case((60, 50, 30), (2.0, 2.0, 2.0), seed=3)  # already 2 mm: no resampling, one window
    pred = P.FactorizerPredictor(nets, names, shas, dropout_at_inference=True, seed=42)
    torch.manual_seed(0)
    a = pred.predict_logits(*imgs)
    torch.manual_seed(123)                                # the caller's global RNG does not matter
    b = pred.predict_logits(*imgs)
    np.testing.assert_array_equal(a, b)
    pred.seed = 7
    c = pred.predict_logits(*imgs)
    assert np.abs(c - a).max() > 1e-6                     # dropout is really active
    pred_eval = P.FactorizerPredictor(nets, names, shas, dropout_at_inference=False)
    d = pred_eval.predict_logits(*imgs)
    assert not np.array_equal(d, a)
