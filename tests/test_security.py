"""Security: model weights are checked before they are deserialised and never unpickle objects;
every value that comes from the input (file names, notes, sidecars, crash text) is escaped in the
HTML reports."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_app.errors import WeightsError
from bids_app.group import run_group
from bids_app.report.subject import build_subject_report
from models import registry
from models.builtin import predictor as bp
from models.weights import sha256_file
from nodes import segment as seg
from nodes.load import LoadInputs
from tests.datasets import sample_case, save

ROOT = Path(__file__).resolve().parents[1]
needs_weights = pytest.mark.skipif(not bp.DEFAULT_WEIGHTS.is_file(), reason="built-in weights not present")


@pytest.fixture
def torch_loads(monkeypatch):
    """Every call of ``torch.load`` (path, kwargs); the real loader still runs."""
    calls = []
    real = torch.load

    def recording(f, *args, **kwargs):
        calls.append((str(f), dict(kwargs)))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    return calls


def _copy_weights(tmp_path) -> Path:
    dst = tmp_path / "w" / "builtin_v1.pt"
    dst.parent.mkdir()
    shutil.copy(bp.DEFAULT_WEIGHTS, dst)
    shutil.copy(bp.DEFAULT_WEIGHTS.with_suffix(".json"), dst.with_suffix(".json"))
    return dst


def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle of the tensors: still a loadable file
    path.write_bytes(bytes(data))


@needs_weights
def test_shipped_weights_load_with_weights_only(torch_loads):
    predictor = bp.BuiltinPredictor()
    assert torch_loads == [(str(bp.DEFAULT_WEIGHTS), {"map_location": "cpu", "weights_only": True})]
    sidecar = json.loads(bp.DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert predictor.weights_sha256 == sidecar["sha256"]


@needs_weights
def test_tampered_weights_are_refused_before_torch_load(tmp_path, torch_loads):
    weights = _copy_weights(tmp_path)
    _tamper(weights)
    with pytest.raises(bp.WeightsIntegrityError, match="does not match"):
        bp.BuiltinPredictor(weights=weights)
    with pytest.raises(WeightsError):  # through the registry, as the workflow builds it: exit 66
        registry.build_predictor("builtin", None, "cpu", weights=str(weights))
    seg.clear_predictor_cache()
    with pytest.raises(Exception, match="does not match"):  # through the nipype node
        seg.get_predictor("builtin", None, "cpu", False, str(weights))
    assert torch_loads == [], "torch.load was called on a file that failed its checksum"


@needs_weights
@pytest.mark.parametrize("sidecar", ["missing", "no-sha", "wrong-sha"])
def test_weights_without_a_valid_checksum_are_refused(sidecar, tmp_path, torch_loads):
    weights = _copy_weights(tmp_path)
    side = weights.with_suffix(".json")
    if sidecar == "missing":
        side.unlink()
    elif sidecar == "no-sha":
        side.write_text(json.dumps({"hparams": {}}))
    else:
        side.write_text(json.dumps({"sha256": "0" * 64}))
    with pytest.raises(bp.WeightsIntegrityError):
        bp.BuiltinPredictor(weights=weights)
    assert torch_loads == []


class _Boom:
    """Unpickling this object would create a file: the proof that code ran."""

    marker = None

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_object_in_weights_is_refused(tmp_path, torch_loads):
    """A weights file carrying a pickled object, with a *matching* checksum (sidecar forged too):
    ``weights_only=True`` refuses it, nothing is executed, and the error is a clear WeightsError."""
    marker = tmp_path / "PWNED"
    boom = _Boom()
    boom.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"model.0.conv.weight": torch.zeros(1), "payload": boom}, path)
    path.with_suffix(".json").write_text(json.dumps({"sha256": sha256_file(path)}))
    with pytest.raises(bp.WeightsIntegrityError, match="refused to load"):
        bp.BuiltinPredictor(weights=path)
    with pytest.raises(WeightsError, match="refused to load"):
        registry.build_predictor("builtin", None, "cpu", weights=str(path))
    assert not marker.exists(), "a pickled object was executed while loading weights"
    assert torch_loads and all(kw.get("weights_only") is True for _, kw in torch_loads)


def test_every_runtime_torch_load_uses_weights_only():
    """Static check of the application code: each ``torch.load`` passes ``weights_only`` and never a
    literal False, unless it hands its own restricted ``pickle_module`` (the official checkpoints'
    loader); training code, which reloads its own checkpoints, is not part of a run."""
    found = []
    for folder in ("bids_app", "nodes", "models"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "train.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch"):
                    kws = {k.arg: k.value for k in node.keywords}
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    found.append(where)
                    assert "weights_only" in kws, f"{where}: torch.load without weights_only"
                    value = kws["weights_only"]
                    if "pickle_module" in kws:  # a restricted unpickler of our own does the refusing
                        continue
                    assert not (isinstance(value, ast.Constant) and value.value is not True), \
                        f"{where}: torch.load with weights_only={ast.unparse(value)}"
    assert found  # the check saw the loaders


# ----------------------------------------------------------------------------- report escaping
SCRIPT = "<script>alert('x')</script>"
FILE_PAYLOAD = "<script>alert(1)<"  # no '/' so that it can be a file name
SVG = "<svg onload=alert(1)>"
# raw markup from the payloads, or a quote closing the attribute the figure name is put in
RAW = ("<script", "<svg", "<img src=x", 'zz9"')


def _hostile_subject(tmp_path) -> tuple[Path, Path, dict]:
    """A subject whose every text slot read by the report carries markup from the 'input'."""
    out, work = tmp_path / "out", tmp_path / "work"
    rdir = work / "reportlets" / "sub-01" / "ses-1"
    rdir.mkdir(parents=True)
    case = sample_case(2)
    inputs = tmp_path / f"in{FILE_PAYLOAD}{SVG}"
    dwi = save(case["dwi"], case["affine"], inputs / f"sub-01_ses-1_{FILE_PAYLOAD}_dwi.nii.gz")
    adc = save(case["adc"], case["affine"], inputs / f"sub-01_ses-1_{SVG}_adc.nii.gz")
    node_dir = tmp_path / "load"
    node_dir.mkdir()
    LoadInputs(dwi_file=str(dwi), adc_file=str(adc), reportlets_dir=str(rdir)).run(cwd=str(node_dir))
    assert FILE_PAYLOAD in (rdir / "load.json").read_text()  # the real node records the file name

    (rdir / "discovery.json").write_text(json.dumps({
        "subject": "01", "session": "1", "layout": SCRIPT, "dwi": str(dwi), "adc": [str(adc), SCRIPT],
        "flair": SVG, "notes": [f"chose {dwi.name}", SCRIPT, {"k": SVG}], "problem": SCRIPT,
        f"extra{SCRIPT}": SVG, "step": "discovery"}))
    (rdir / "hostile.json").write_text(json.dumps({
        "step": SCRIPT, "title": SVG, "items": [{"level": "warning", "text": SCRIPT}, SVG],
        "values": {SCRIPT: SVG, "list": [SCRIPT]}}))
    dwi_out = out / "sub-01" / "ses-1" / "dwi"
    dwi_out.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)),
             str(dwi_out / "sub-01_ses-1_label-lesion_mask.nii.gz"))
    (dwi_out / "sub-01_ses-1_label-lesion_mask.json").write_text(json.dumps({
        "Sources": [f"bids:raw:{dwi.name}"], "Description": SCRIPT, SVG: 1,
        "Models": [{"name": SCRIPT, "weights_sha256": SVG}]}))
    (dwi_out / f"sub-01_ses-1_desc-{FILE_PAYLOAD}_notes.txt").write_text("x")
    (dwi_out / "sub-01_ses-1_desc-lesion_stats.tsv").write_text(
        f"total_volume_ml\tlesion_count\n{SCRIPT}\t{SVG}\n")
    figures = out / "sub-01" / "figures"
    figures.mkdir(parents=True)
    (figures / 'sub-01_ses-1_zz9"><img src=x onerror=alert(1)>.png').write_bytes(b"\x89PNG")
    crash = out / "sub-01" / "log" / "20250101-000000_abcdef12"
    crash.mkdir(parents=True)
    (crash / "crash-20250101-000000-root-load-1.txt").write_text(
        f"Node: sub-01_ses-1_wf.load\nSession: sub-01_ses-1\n\nTraceback (most recent call last):\n"
        f"  File {SCRIPT}\nInputError: {dwi}: {SCRIPT} {SVG}\n")
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": SCRIPT, "BIDSVersion": "1.10.0", "DatasetType": "derivative",
        "SourceDatasets": [{"Name": SCRIPT}]}))
    run_info = {"version": SCRIPT, "run_id": SVG, "command": f"deepisles in out participant "
                f"--participant-label {SCRIPT}", "models": [{"name": SVG, "weights_sha256": SCRIPT}]}
    return out, work, run_info


def _assert_escaped(html: str, where: str) -> None:
    low = html.lower()
    for raw in RAW:
        assert raw not in low, f"{where}: raw {raw!r} from the input in the HTML"


def test_report_escapes_every_input_value(tmp_path):
    out, work, run_info = _hostile_subject(tmp_path)
    report = build_subject_report(out, "01", work_dir=work, run_info=run_info)
    html = report.read_text(encoding="utf-8")
    _assert_escaped(html, report.name)
    # the values are shown (escaped), so the test really went through those slots
    assert "&lt;script&gt;alert(" in html and "&lt;svg onload=alert(1)&gt;" in html
    assert html.count("&lt;script&gt;alert(") >= 8


def test_group_report_escapes_input_values(tmp_path):
    out, work, run_info = _hostile_subject(tmp_path)
    build_subject_report(out, "01", work_dir=work, run_info=run_info)
    try:
        run_group(out)
    except Exception as exc:  # a broken table may be refused, but never rendered unescaped
        pytest.skip(f"group level refused the hostile table: {exc}")
    for page in out.glob("*.html"):
        _assert_escaped(page.read_text(encoding="utf-8"), page.name)
