"""BIDS-derivatives naming (pybids ``build_path``), dataset_description.json and .bidsignore."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bids.layout.writing import build_path

from bids_app import APP_NAME, __version__
from bids_app.citations import cite
from bids_app.errors import OutputError
from nodes.base import atomic_write_text, write_json_atomic

PATH_PATTERNS = [
    "sub-{subject}[/ses-{session}]/{datatype<dwi|anat|figures>|dwi}/sub-{subject}[_ses-{session}]"
    "[_space-{space}][_label-{label}][_desc-{desc}]_{suffix}{extension<.nii.gz|.nii|.json|.tsv>}",
]

BIDSIGNORE = """\
*.html
logs/
sub-*/log/
sub-*/figures/
group_lesions.*
evaluation.tsv
"""

def derivative_path(output_dir, entities: dict, **extra) -> Path:
    """Absolute path of a derivative named from ``entities`` (subject, session) and ``extra``."""
    ents = {k: v for k, v in {**entities, **extra}.items() if v not in (None, "")}
    rel = build_path(ents, PATH_PATTERNS, strict=False)
    if rel is None:
        raise ValueError(f"cannot build a BIDS derivative name from {ents}")
    return Path(output_dir) / rel


def ensure_writable_dir(path, what="output directory") -> Path:
    """Create ``path`` if needed and prove it is writable, else raise :class:`OutputError` (73)."""
    path = Path(path).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the {what} ({exc.strerror or exc})") from None
    return path


def write_dataset_description(output_dir, bids_dir, models: list[dict], container: str | None = None):
    """Write (or refresh) the derivative dataset_description.json and .bidsignore."""
    output_dir = Path(output_dir)
    generated = {"Name": APP_NAME, "Version": __version__, "Description": "DeepISLES lesion segmentation",
                 "CodeURL": "https://github.com/deepisles-bids/deepisles-bids"}
    if models:
        generated["Models"] = models
    if container:
        generated["Container"] = {"Type": container}
    src = {"URL": Path(bids_dir).absolute().as_uri()}
    desc_file = Path(bids_dir) / "dataset_description.json"
    try:
        src_desc = json.loads(desc_file.read_text(encoding="utf-8"))
        if isinstance(src_desc, dict):
            src.update({k: src_desc[k] for k in ("Name", "DatasetDOI") if k in src_desc})
    except (OSError, ValueError):
        pass
    description = {
        "Name": "DeepISLES ischemic stroke lesion segmentation",
        "BIDSVersion": "1.11.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [src],
        "HowToAcknowledge": "Cite " + cite("DeepISLES") + " and " + cite("ISLES'22"),
    }
    write_json_atomic(description, output_dir / "dataset_description.json")
    atomic_write_text(BIDSIGNORE, output_dir / ".bidsignore")
