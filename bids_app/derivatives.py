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
.*.part
*_stats.tsv
*_stats.json
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


def _merged_models(previous: dict | None, models: list[dict]) -> list[dict]:
    """The models of earlier runs into the same output (same name and weights kept once), then ``models``."""
    seen, out = set(), []
    earlier = []
    for gen in (previous or {}).get("GeneratedBy") or []:
        if isinstance(gen, dict) and gen.get("Name") == APP_NAME and isinstance(gen.get("Models"), list):
            earlier += [m for m in gen["Models"] if isinstance(m, dict)]
    for entry in earlier + list(models):
        key = json.dumps(entry, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(entry)
    return out


def _read_json_object(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_dataset_description(output_dir, bids_dir, models: list[dict], container: dict | None = None):
    """Write (or refresh) the derivative dataset_description.json and .bidsignore.

    ``GeneratedBy.Models`` keeps the models of earlier runs into the same output folder (each output
    sidecar names the models that made it); ``container``: BIDS ``GeneratedBy.Container`` (Type, Tag).
    """
    output_dir = Path(output_dir)
    previous = _read_json_object(output_dir / "dataset_description.json")
    generated = {"Name": APP_NAME, "Version": __version__, "Description": "DeepISLES lesion segmentation",
                 "CodeURL": "https://github.com/deepisles-bids/deepisles-bids"}
    merged = _merged_models(previous, models)
    if merged:
        generated["Models"] = merged
    if container:
        generated["Container"] = dict(container)
    raw_uri = Path(bids_dir).resolve().as_uri()
    src = {"URL": raw_uri}
    src_desc = _read_json_object(Path(bids_dir) / "dataset_description.json") or {}
    src.update({k: src_desc[k] for k in ("Name", "DatasetDOI") if k in src_desc})
    description = {
        "Name": "DeepISLES ischemic stroke lesion segmentation",
        "BIDSVersion": "1.11.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [src],
        # the sidecars' Sources / SpatialReference are BIDS URIs "bids:raw:<path>": this names "raw"
        "DatasetLinks": {"raw": raw_uri},
        "HowToAcknowledge": "Cite " + cite("DeepISLES") + " and " + cite("ISLES'22"),
    }
    write_json_atomic(description, output_dir / "dataset_description.json")
    atomic_write_text(BIDSIGNORE, output_dir / ".bidsignore")


def output_conflict(output_dir, entities: dict, dwi_uri: str) -> str | None:
    """Why this session's outputs must not be written, or ``None``: the folder already holds the lesion
    mask of another image under the same names (another run or acquisition of the same session, whose
    outputs would be silently replaced)."""
    sidecar = derivative_path(output_dir, entities, datatype="dwi", label="lesion", suffix="mask",
                              extension=".json")
    earlier = (_read_json_object(sidecar) or {}).get("SpatialReference")
    if not earlier or earlier == dwi_uri:
        return None
    return (f"{sidecar}: holds the lesion mask of {earlier}; this run would replace it with that of {dwi_uri} "
            "(one image per session is processed and the names carry no run or acquisition): write to "
            "another output directory")

