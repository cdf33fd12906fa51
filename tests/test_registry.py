"""models/registry.py: member specs, defaults, errors for unknown names and missing weights."""

import pytest

from bids_app.errors import DeepIslesError, UsageError, WeightsError
from models import registry as R


def _touch(root, rels):
    for rel in rels:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_declared_members_and_layout():
    assert R.names()[:4] == ["builtin", "seals", "nvauto", "factorizer"]
    seals, nvauto, fac = R.get("seals"), R.get("NVAUTO"), R.get("factorizer")
    assert len(seals.required_files) == 11 and len(nvauto.required_files) == 15
    assert len(fac.required_files) == 10
    assert any(f.endswith("nnUNetTrainerV2_DDP__nnUNetPlansv2.1/fold_4/model_final_checkpoint.model.pkl")
               for f in seals.required_files)
    assert seals.required_files[0].startswith("SEALS/nnUNet_trained_models/nnUNet/3d_fullres/Task012_")
    assert "NVAUTO/ts/model14.ts" in nvauto.required_files
    assert ("FACTORIZER/logs/isles2022_dwi-adc-flair/fold3/swin-factorizer/version_0/checkpoints/"
            "epoch=1999-step=99999.ckpt") in fac.required_files
    assert fac.needs_flair and not seals.needs_flair and not R.get("builtin").needs_flair
    assert R.get("builtin").required_files == () and not R.get("builtin").official


def test_unknown_member_lists_valid_names():
    with pytest.raises(UsageError, match="valid members: builtin, seals, nvauto, factorizer"):
        R.get("deepmedic")
    with pytest.raises(UsageError, match="unknown ensemble member 'foo'"):
        R.resolve_members(["builtin", "foo"], None)


def test_default_is_builtin_without_weights(tmp_path):
    assert R.available_members(tmp_path) == []
    assert R.available_members(tmp_path / "absent") == []
    assert R.resolve_members(None, tmp_path) == ["builtin"]
    assert R.resolve_members([], tmp_path) == ["builtin"]


def test_available_members_needs_every_file(tmp_path):
    _touch(tmp_path, R.NVAUTO_FILES[:-1])
    assert R.available_members(tmp_path) == []
    _touch(tmp_path, R.NVAUTO_FILES[-1:])
    assert R.available_members(tmp_path) == ["nvauto"]
    # every file of an implemented official member present: it becomes the default
    assert R.resolve_members(None, tmp_path) == ["nvauto"]
    assert R.resolve_members(["nvauto"], tmp_path) == ["nvauto"]


def test_requested_member_with_missing_files(tmp_path):
    _touch(tmp_path, R.SEALS_FILES[:3])
    with pytest.raises(WeightsError) as exc:
        R.resolve_members(["seals"], tmp_path)
    msg = str(exc.value)
    assert "8 of 11" in msg and str(tmp_path) in msg
    assert "model_final_checkpoint.model" in msg and "\n" not in msg


def test_requested_order_dedup_and_commas(tmp_path):
    assert R.resolve_members(["builtin,BUILTIN", "builtin"], tmp_path) == ["builtin"]


def test_default_picks_implemented_official_members(tmp_path):
    spec = R.MemberSpec(name="zz_fake", description="fake", required_files=("ZZ/w.pt",),
                        factory=lambda wd, dev, opt: ("built", wd, dev, opt))
    R.register(spec)
    try:
        assert R.resolve_members(None, tmp_path) == ["builtin"]
        _touch(tmp_path, ["ZZ/w.pt"])
        assert R.resolve_members(None, tmp_path) == ["zz_fake"]
        built = R.build_predictor("zz_fake", tmp_path, "cpu", tta=True)
        assert built == ("built", tmp_path, "cpu", {"tta": True})
        with pytest.raises(ValueError, match="already registered"):
            R.register(spec)
    finally:
        R.unregister("zz_fake")
    assert "zz_fake" not in R.names()


def test_register_validates_spec():
    with pytest.raises(ValueError):
        R.register(R.MemberSpec(name="Bad-Name", description=""))
    with pytest.raises(ValueError, match="inputs"):
        R.register(R.MemberSpec(name="x1", description="", inputs=("t1w",)))
    with pytest.raises(ValueError, match="needs_flair"):
        R.register(R.MemberSpec(name="x2", description="", needs_flair=True))


def test_official_factories_need_their_files(tmp_path):
    for name in ("seals", "nvauto", "factorizer"):
        with pytest.raises(DeepIslesError, match="missing"):
            R.build_predictor(name, tmp_path)


def test_members_for_session():
    assert R.members_for_session(["builtin", "factorizer"], has_flair=False) == (["builtin"], ["factorizer"])
    assert R.members_for_session(["builtin", "factorizer"], has_flair=True) == (["builtin", "factorizer"], [])


def test_provenance_is_cheap_and_serialisable(tmp_path):
    import json

    p = R.provenance("seals", tmp_path)
    assert p["name"] == "seals" and p["weights_files"] == 11 and "doi" in p["citation"]
    json.dumps(p)
    b = R.provenance("builtin", tmp_path)
    assert b["name"] == "builtin" and "weights_dir" not in b
