"""models/weights.py: streamed SHA-256, manifests, checksum-before-load, weights_only loading."""

import hashlib
import json
import pickle

import pytest
import torch

from bids_app.errors import WeightsError
from models import weights as W


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"conv.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "epoch": 3}, path)
    return path


def test_sha256_file_matches_hashlib_and_streams(tmp_path, monkeypatch):
    data = bytes(range(256)) * 9000  # > 2 chunks of 1 MiB
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    monkeypatch.setattr(W, "_CHUNK", 4096)
    assert W.sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_sha256_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        W.sha256_file(tmp_path / "nope.pt")


def test_verify_ok_and_mismatch(ckpt):
    good = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert W.verify(ckpt, good.upper()) == good
    with pytest.raises(WeightsError) as exc:
        W.verify(ckpt, "0" * 64)
    msg = str(exc.value)
    assert msg.startswith(f"{ckpt}: SHA-256 mismatch (expected {'0' * 64}, got {good})")
    with pytest.raises(WeightsError, match="not a SHA-256"):
        W.verify(ckpt, "abc")


def test_manifest_sha256sum_and_json(tmp_path):
    h1, h2 = "a" * 64, "B" * 64
    txt = tmp_path / "SHA256SUMS"
    txt.write_text(f"# comment\n\n{h1}  SEALS/fold_0/model.model\n{h2} *./NVAUTO/ts/model0.ts\n")
    expect = {"SEALS/fold_0/model.model": h1, "NVAUTO/ts/model0.ts": h2.lower()}
    assert W.load_checksum_manifest(txt) == expect
    js = tmp_path / "sums.json"
    js.write_text(json.dumps({"SEALS/fold_0/model.model": h1, "./NVAUTO/ts/model0.ts": h2}))
    assert W.load_checksum_manifest(js) == expect


@pytest.mark.parametrize("text", ["nothex  a.pt\n", "onlyonefield\n", "[1, 2]", "{bad json", ""])
def test_manifest_bad(tmp_path, text):
    path = tmp_path / "m.txt"
    path.write_text(text)
    with pytest.raises(WeightsError):
        W.load_checksum_manifest(path)


def test_verify_manifest_and_require_files(tmp_path, ckpt):
    manifest = {"model.pt": W.sha256_file(ckpt), "other.pt": "c" * 64}
    assert W.verify_manifest(tmp_path, manifest, only=["model.pt"]) == {"model.pt": manifest["model.pt"]}
    with pytest.raises(WeightsError, match="other.pt") as exc:
        W.verify_manifest(tmp_path, manifest)
    assert str(tmp_path) in str(exc.value)
    with pytest.raises(WeightsError, match="1 of 2 file"):
        W.require_files(tmp_path, ["model.pt", "fold_1/x.pt"])


def test_safe_torch_load(ckpt):
    sha = W.sha256_file(ckpt)
    state = W.safe_torch_load(ckpt, expected_sha256=sha)
    assert state["epoch"] == 3 and state["conv.weight"].shape == (2, 3)
    assert W.safe_torch_load(ckpt)["epoch"] == 3


def test_safe_torch_load_checks_before_loading(ckpt, monkeypatch):
    def boom(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("torch.load called before the checksum was checked")

    monkeypatch.setattr(torch, "load", boom)
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        W.safe_torch_load(ckpt, expected_sha256="f" * 64)


class _Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_safe_torch_load_refuses_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, path, pickle_module=pickle)
    with pytest.raises(WeightsError, match="allow_pickle=True"):
        W.safe_torch_load(path)
    plain = tmp_path / "obj.pt"
    torch.save({"cfg": {"a": 1}, "n": _Plain()}, plain)
    with pytest.raises(WeightsError, match="refused"):
        W.safe_torch_load(plain)
    assert isinstance(W.safe_torch_load(plain, allow_pickle=True)["n"], _Plain)


class _Plain:
    pass


def test_safe_torch_load_missing(tmp_path):
    with pytest.raises(WeightsError, match=f"looked in {tmp_path}"):
        W.safe_torch_load(tmp_path / "missing.ckpt")
