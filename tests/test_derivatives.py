"""Derivative dataset description and BIDS URIs of the sidecars."""

import json

from bids_app.derivatives import output_conflict, write_dataset_description


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


def test_outputs_of_another_image_are_not_replaced(tmp_path):
    out = tmp_path / "out"
    ents = {"subject": "01", "session": "1"}
    assert output_conflict(out, ents, "bids:raw:sub-01/ses-1/dwi/sub-01_ses-1_run-1_dwi.nii.gz") is None
    sidecar = out / "sub-01/ses-1/dwi/sub-01_ses-1_label-lesion_mask.json"
    sidecar.parent.mkdir(parents=True)
    sidecar.write_text(json.dumps({"SpatialReference": "bids:raw:sub-01/ses-1/dwi/sub-01_ses-1_run-1_dwi.nii.gz"}))
    assert output_conflict(out, ents, "bids:raw:sub-01/ses-1/dwi/sub-01_ses-1_run-1_dwi.nii.gz") is None  # resume
    why = output_conflict(out, ents, "bids:raw:sub-01/ses-1/dwi/sub-01_ses-1_run-2_dwi.nii.gz")
    assert why.startswith(f"{sidecar}: holds the lesion mask of bids:raw:") and "run-2" in why
