"""Derivative dataset description and BIDS URIs of the sidecars."""

import json
from pathlib import Path

from bids_app.config import RunConfig
from bids_app.derivatives import write_dataset_description
from bids_app.workflow import _bids_uri


def _raw(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset_description.json").write_text(json.dumps({"Name": "cohort", "BIDSVersion": "1.9.0"}))
    return raw


def test_description_links_the_raw_dataset_and_keeps_earlier_models(tmp_path):
    raw, out = _raw(tmp_path), tmp_path / "out"
    out.mkdir()
    seals = {"name": "seals", "weights_sha256": "a" * 64}
    builtin = {"name": "builtin", "weights_sha256": "b" * 64}
    write_dataset_description(out, raw, [seals], {"Type": "docker", "Tag": "deepisles:0.1.0-cpu"})
    write_dataset_description(out, raw, [builtin, seals])
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetLinks"] == {"raw": raw.resolve().as_uri()}
    assert desc["SourceDatasets"][0]["Name"] == "cohort"
    generated = desc["GeneratedBy"][0]
    assert generated["Models"] == [seals, builtin]  # the first run's model kept, each once
    assert "Container" not in generated  # the second run was not in a container
    assert "sub-*/log/" in (out / ".bidsignore").read_text()


def test_bids_uri_through_a_symbolic_link(tmp_path):
    raw = _raw(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(raw)
    dwi = raw.resolve() / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"  # discovery resolves the dataset root
    for root in (raw, link):
        config = RunConfig(bids_dir=Path(root).absolute(), output_dir=tmp_path / "out", analysis_level="participant",
                           work_dir=tmp_path / "work")
        assert _bids_uri(config, dwi) == "bids:raw:sub-01/dwi/sub-01_dwi.nii.gz"
    outside = tmp_path / "elsewhere.nii.gz"
    assert _bids_uri(config, outside) == str(outside)
