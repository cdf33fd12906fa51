"""Logit-mean ensembles of built-in weights (``models/builtin/ensemble.py``, ``network.LogitMean``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("monai")

from models.builtin import ensemble as E  # noqa: E402
from models.builtin.network import LogitMean, build_network  # noqa: E402
from models.builtin.predictor import BuiltinPredictor  # noqa: E402
from models.weights import sha256_file  # noqa: E402

SMALL = {"channels": [8, 16, 24], "strides": [2, 2], "divisible_by": 4}


def _member(folder, seed, hparams=SMALL, label_rule="visible", **extra):
    from models.builtin.network import DEFAULT_HPARAMS

    torch.manual_seed(seed)
    folder.mkdir()
    w = folder / "builtin_v1.pt"
    torch.save(build_network(hparams).state_dict(), w)
    hp = dict(DEFAULT_HPARAMS, **hparams)
    (folder / "builtin_v1.json").write_text(json.dumps({"hparams": hp, "sha256": sha256_file(w), "seed": seed,
                                                        "command": f"train --seed {seed}", "patch": [32] * 3,
                                                        "label_rule": label_rule, **extra}))
    return w


def test_ensemble_logits_are_the_mean_of_its_members(tmp_path):
    members = [_member(tmp_path / f"m{i}", seed=i) for i in range(3)]
    meta = E.join(members, tmp_path / "ens", patch=(32, 32, 32), command="ensemble test")
    w = tmp_path / "ens" / "builtin_v1.pt"
    assert meta["hparams"]["ensemble"] == 3 and meta["patch"] == [32, 32, 32] and meta["label_rule"] == "visible"
    assert [m["sha256"] for m in meta["members"]] == [sha256_file(m) for m in members]
    assert meta["members"][1]["command"] == "train --seed 1" and meta["sha256"] == sha256_file(w)
    ens = BuiltinPredictor(w)
    assert isinstance(ens.net, LogitMean) and len(ens.net.members) == 3 and ens.roi == (32, 32, 32)
    x = np.zeros((2, 40, 44, 36), np.float32)
    x[:, 6:34, 8:36, 5:30] = np.random.default_rng(0).normal(size=(2, 28, 28, 25))
    mean = sum(BuiltinPredictor(m, roi=(32, 32, 32)).logits_model_grid(x) for m in members) / 3
    got = ens.logits_model_grid(x)
    inside = np.isfinite(mean)
    assert np.array_equal(inside, np.isfinite(got)) and inside.any()
    np.testing.assert_allclose(got[inside], mean[inside], rtol=1e-5, atol=1e-5)
    single = BuiltinPredictor(members[0], roi=(32, 32, 32)).logits_model_grid(x)
    assert np.abs(single[inside] - got[inside]).max() > 1e-3  # the members differ: not one member's logits
    # same members, same order -> the same file, bit for bit
    E.join(members, tmp_path / "again", patch=(32, 32, 32), command="ensemble test")
    assert sha256_file(tmp_path / "again" / "builtin_v1.pt") == meta["sha256"]


def test_ensemble_refuses_bad_members(tmp_path):
    a, b = _member(tmp_path / "a", 0), _member(tmp_path / "b", 1)
    other = _member(tmp_path / "c", 2, {"channels": [8, 16], "strides": [2], "divisible_by": 2})
    with pytest.raises(E.EnsembleError, match="hyper-parameters differ"):
        E.join([a, other], tmp_path / "o1")
    with pytest.raises(E.EnsembleError, match="different label rules"):
        E.join([a, _member(tmp_path / "t", 3, label_rule="threshold")], tmp_path / "o0")
    with pytest.raises(E.EnsembleError, match="at least two"):
        E.join([a], tmp_path / "o2")
    E.join([a, b], tmp_path / "ens")
    with pytest.raises(E.EnsembleError, match="is itself an ensemble"):
        E.join([a, tmp_path / "ens" / "builtin_v1.pt"], tmp_path / "o3")
    pickled = tmp_path / "p" / "builtin_v1.pt"
    pickled.parent.mkdir()
    torch.save({"net": torch.nn.Linear(2, 1)}, pickled)  # a pickled module, with a matching sidecar
    pickled.with_suffix(".json").write_text(json.dumps({"sha256": sha256_file(pickled)}))
    with pytest.raises(E.EnsembleError, match="refused to load: not a plain weights file"):
        E.join([a, pickled], tmp_path / "o5")
    b.write_bytes(b.read_bytes() + b"x")  # tampered after its sidecar was written: never unpickled
    with pytest.raises(E.EnsembleError, match="does not match the sidecar"):
        E.join([a, b], tmp_path / "o4")
    (tmp_path / "a" / "builtin_v1.json").unlink()
    with pytest.raises(SystemExit, match="no sidecar"):
        E.main(["--members", str(a), str(b), "--out", str(tmp_path / "o6")])
    assert not (tmp_path / "o4").exists() or not any((tmp_path / "o4").iterdir())


def test_training_refuses_an_ensemble_as_initial_weights(tmp_path):
    import models.builtin.train as T

    a, b = _member(tmp_path / "a", 0, {}), _member(tmp_path / "b", 1, {})
    E.join([a, b], tmp_path / "ens")
    with pytest.raises(SystemExit, match="does not fit this network"):
        T.main(["--out", str(tmp_path / "t"), "--init", str(tmp_path / "ens" / "builtin_v1.pt"), "--steps", "1",
                "--device", "cpu"])


def test_average_is_one_network_with_the_mean_parameters(tmp_path):
    a, b = _member(tmp_path / "a", 0), _member(tmp_path / "b", 1)
    meta = E.join([a, b], tmp_path / "soup", average=True)
    assert "ensemble" not in meta["hparams"] and meta["combination"].startswith("parameter mean")
    soup = torch.load(tmp_path / "soup" / "builtin_v1.pt", weights_only=True)
    sa, sb = (torch.load(p, weights_only=True) for p in (a, b))
    assert list(soup) == list(sa)
    for k in sa:
        torch.testing.assert_close(soup[k], (sa[k] + sb[k]) / 2, rtol=0, atol=1e-7)
    assert not torch.equal(soup[k], sa[k])
    same = E.join([a, a], tmp_path / "same", average=True)  # the mean of one network with itself is itself
    assert same["sha256"] != meta["sha256"]
    assert all(torch.equal(v, sa[k]) for k, v in torch.load(tmp_path / "same" / "builtin_v1.pt",
                                                            weights_only=True).items())
    assert not isinstance(BuiltinPredictor(tmp_path / "soup" / "builtin_v1.pt").net, LogitMean)


def test_window_is_the_members_training_patch(tmp_path):
    a, b = _member(tmp_path / "a", 0), _member(tmp_path / "b", 1)  # both trained on 32^3 patches
    assert E.join([a, b], tmp_path / "soup", average=True)["patch"] == [32, 32, 32]
    assert BuiltinPredictor(tmp_path / "soup" / "builtin_v1.pt").roi == (32, 32, 32)
    assert E.join([a, b], tmp_path / "given", patch=(48, 48, 48))["patch"] == [48, 48, 48]
    c = _member(tmp_path / "c", 2, patch=[40, 40, 40])
    with pytest.raises(E.EnsembleError, match="different patches .*32x32x32, 40x40x40.*give --patch"):
        E.join([a, c], tmp_path / "mixed")
    assert E.join([a, c], tmp_path / "mixed2", patch=(40, 40, 40))["patch"] == [40, 40, 40]
    # no recorded patch: the soup runs with the window the predictor gives each member alone
    d, e = _member(tmp_path / "d", 3, patch=None), _member(tmp_path / "e", 4, patch=None)
    alone = BuiltinPredictor(d).roi
    assert E.join([d, e], tmp_path / "none", average=True)["patch"] == list(alone)
    assert BuiltinPredictor(tmp_path / "none" / "builtin_v1.pt").roi == alone


def test_soup_keeps_the_newest_generator_for_calibration(tmp_path, monkeypatch):
    """A member trained with sulci: the soup records it, and calibrate draws from that generator."""
    import models.builtin.calibrate as C
    import models.builtin.synth as S

    meta = E.join([_member(tmp_path / "a", 0, texture=0.5), _member(tmp_path / "b", 1, sulci=0.7,
                                                                    pileup_low_adc=0.4, cortical=0.2)],
                  tmp_path / "soup", average=True)
    assert meta["sulci"] == 0.7 and meta["texture"] == 0.5 and meta["pileup_low_adc"] == 0.4
    assert meta["cortical"] == 0.2
    made, real = [], S.SynthGenerator

    def gen(device, **kw):
        made.append(kw)
        return real(device, fov=(32, 40, 32), **kw)

    monkeypatch.setattr(S, "SynthGenerator", gen)
    C.calibrate(tmp_path / "soup" / "builtin_v1.pt", n=1)
    assert made == [{"label_rule": "visible", "sulci": 0.7, "texture": 0.5, "pileup_low_adc": 0.4, "cortical": 0.2}]
