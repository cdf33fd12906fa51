"""Per-subject HTML report: inputs, decisions of every step, biomarkers, figures, models and errors.

Everything is read from disk (reportlets in the work directory, derivatives and crash files in the
output directory), so the report can be written after a crash or with ``--reports-only`` and shows
whatever exists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from bids_app.report.common import (
    CITATIONS,
    current_crashes,
    environment,
    fmt_value,
    read_json,
    strip_prefix,
)
from nodes.base import atomic_write_text

STEP_ORDER = ["discovery", "load", "diffusion", "adc_units", "conform", "skullstrip", "normalize",
              "segment", "ensemble", "biomarkers", "figures"]
STATUS_OK, STATUS_FAILED, STATUS_EMPTY = "OK", "FAILED", "no lesion found"
STATUS_META = "deepisles-session-status"
_INPUT_KEYS = ("dwi", "adc", "bval", "bvec", "flair")


def _session_labels(output_dir: Path, reportlets: Path | None, subject: str) -> list[str | None]:
    found: set[str | None] = set()
    sub_out = output_dir / f"sub-{subject}"
    for ses in sub_out.glob("ses-*"):
        if ses.is_dir():
            found.add(strip_prefix(ses.name, "ses"))
    if (sub_out / "dwi").is_dir():
        found.add(None)
    if reportlets is not None and reportlets.is_dir():
        for ses in reportlets.glob("ses-*"):
            if ses.is_dir():
                found.add(strip_prefix(ses.name, "ses"))
        if any(reportlets.glob("*.json")):
            found.add(None)
    return sorted(found, key=lambda s: (s is not None, s or ""))


def _reportlets(folder: Path | None) -> tuple[dict | None, list[dict]]:
    if folder is None or not folder.is_dir():
        return None, []
    discovery = read_json(folder / "discovery.json")
    steps = []
    for path in folder.glob("*.json"):
        if path.name == "discovery.json":
            continue
        data = read_json(path)
        if not isinstance(data, dict):
            steps.append({"step": path.stem, "title": path.stem, "unreadable": True, "items": [], "values": {}})
            continue
        items = [i if isinstance(i, dict) else {"level": "info", "text": str(i)} for i in data.get("items") or []]
        values = data.get("values") if isinstance(data.get("values"), dict) else {}
        steps.append({"step": str(data.get("step") or path.stem), "title": str(data.get("title") or path.stem),
                      "items": items, "values": {k: fmt_value(v) for k, v in values.items()}})
    rank = {s: i for i, s in enumerate(STEP_ORDER)}
    steps.sort(key=lambda s: (rank.get(s["step"], len(rank)), s["step"]))
    return discovery, steps


def _discovery_view(discovery) -> dict | None:
    if not isinstance(discovery, dict):
        return None
    files = []
    for key in _INPUT_KEYS:
        value = discovery.get(key)
        if isinstance(value, (list, tuple)):
            files.append((key, [str(v) for v in value]))
        else:
            files.append((key, [str(value)] if value else []))
    notes = discovery.get("notes") or []
    if not isinstance(notes, list):
        notes = [notes]
    extra = {k: fmt_value(v) for k, v in discovery.items()
             if k not in (*_INPUT_KEYS, "notes", "problem", "subject", "session", "layout", "step")}
    return {"layout": discovery.get("layout"), "files": files, "notes": [fmt_value(n) for n in notes],
            "problem": discovery.get("problem"), "extra": extra}


def _figures(output_dir: Path, subject: str, session: str | None) -> list[str]:
    folder = output_dir / f"sub-{subject}" / "figures"
    prefix = f"sub-{subject}_ses-{session}_" if session else f"sub-{subject}_"
    out = []
    for path in sorted(folder.glob("*.png")) + sorted(folder.glob("*.svg")):
        if path.name.startswith(prefix) and (session or "_ses-" not in path.name):
            out.append(f"sub-{subject}/figures/{path.name}")
    return out


def _models(models) -> list[dict]:
    """``[{name, sha}]`` from a list of model records (dicts with name/weights_sha256, or names)."""
    if not isinstance(models, list):
        models = [models] if models else []
    out = []
    for m in models:
        m = m if isinstance(m, dict) else {"name": m}
        out.append({"name": fmt_value(m.get("name")), "sha": fmt_value(m.get("weights_sha256")),
                    "file": fmt_value(m["weights_file"]) if m.get("weights_file") else None})
    return out


def _session_view(output_dir, reportlets_root, subject, session, crashes) -> dict:
    from nodes.biomarkers import read_lesion_stats

    name = f"sub-{subject}" + (f"_ses-{session}" if session else "")
    dwi_dir = output_dir / f"sub-{subject}" / (f"ses-{session}" if session else "") / "dwi"
    folder = None
    if reportlets_root is not None:
        folder = reportlets_root / (f"ses-{session}" if session else "")
    discovery, steps = _reportlets(folder)
    stats, stats_error = None, None
    stats_file = dwi_dir / f"{name}_desc-lesion_stats.tsv"
    if stats_file.is_file():
        try:
            stats = read_lesion_stats(stats_file)
        except (OSError, ValueError) as exc:
            stats_error = f"{stats_file.name}: {exc}"
    mask_file = dwi_dir / f"{name}_label-lesion_mask.nii.gz"
    sidecar = read_json(dwi_dir / f"{name}_label-lesion_mask.json")
    models = _models(sidecar.get("Models") if isinstance(sidecar, dict) else None)
    sidecar_rows = {k: fmt_value(v) for k, v in (sidecar or {}).items() if k != "Models"} \
        if isinstance(sidecar, dict) else {}
    outputs = sorted(p.name for p in dwi_dir.glob(f"{name}_*") if p.is_file()) if dwi_dir.is_dir() else []
    own_crashes = [c for c in crashes if c["session"] == session or (c["session"] is None and session is None)]
    warnings = [{"step": s["title"], "text": i.get("text", "")} for s in steps for i in s["items"]
                if i.get("level") == "warning"]
    disc = _discovery_view(discovery)
    reasons = []
    if disc and disc["problem"]:
        reasons.append(f"Discovery: {disc['problem']}")
    if not mask_file.is_file():
        reasons.append("No lesion mask was written.")
    if own_crashes or (disc and disc["problem"]) or not mask_file.is_file():
        status = STATUS_FAILED
    elif stats is not None and not stats.get("total_volume_ml") and not stats.get("lesion_count"):
        status = STATUS_EMPTY
    else:
        status = STATUS_OK
    return {
        "label": session, "name": name, "status": status, "reasons": reasons,
        "discovery": disc, "steps": steps, "warnings": warnings, "stats": stats, "stats_error": stats_error,
        "stats_file": stats_file.name, "figures": _figures(output_dir, subject, session), "models": models,
        "sidecar": sidecar_rows, "outputs": outputs, "crashes": own_crashes,
    }


def collect_subject(output_dir, subject, work_dir=None) -> dict:
    """Everything the subject report shows, as plain data (also used by the group level)."""
    output_dir = Path(output_dir)
    subject = strip_prefix(subject, "sub")
    reportlets = Path(work_dir) / "reportlets" / f"sub-{subject}" if work_dir else None
    crashes, superseded = current_crashes(output_dir, subject)
    sessions = _session_labels(output_dir, reportlets, subject)
    crash_sessions = {c["session"] for c in crashes}
    if sessions:  # a crashed session may have left nothing else
        crash_sessions.discard(None)
    sessions = sorted(set(sessions) | crash_sessions, key=lambda s: (s is not None, s or ""))
    views = [_session_view(output_dir, reportlets, subject, s, crashes) for s in sessions]
    shown = {id(c) for v in views for c in v["crashes"]}
    orphans = [c for c in crashes if id(c) not in shown]
    if orphans:  # crashes that name no session we know: they affect the whole subject
        for v in views:
            v["status"] = STATUS_FAILED
    return {"subject": subject, "sessions": views, "crashes": crashes, "orphan_crashes": orphans,
            "superseded_crashes": superseded}


def build_subject_report(output_dir, subject, work_dir=None, run_info=None) -> Path:
    """Write ``<output_dir>/sub-<s>.html`` (atomically) and return its path."""
    output_dir = Path(output_dir)
    data = collect_subject(output_dir, subject, work_dir)
    statuses = {(v["label"] or "n/a"): v["status"] for v in data["sessions"]}
    if not data["sessions"]:
        statuses = {"n/a": STATUS_FAILED}
    info = dict(run_info or {})
    models = info.pop("models", None)
    html = environment().get_template("subject.html").render(
        subject=data["subject"], sessions=data["sessions"], crashes=data["crashes"],
        orphan_crashes=data["orphan_crashes"], superseded_crashes=data["superseded_crashes"],
        run_info={k: fmt_value(v) for k, v in info.items()},
        run_models=_models(models),
        citations=CITATIONS, status_meta=STATUS_META, status_json=json.dumps(statuses, sort_keys=True),
        step_order=STEP_ORDER,
    )
    return atomic_write_text(html, output_dir / f"sub-{data['subject']}.html")


def read_report_status(path) -> dict:
    """The per-session status a subject report recorded in its ``<meta>`` tag (``{}`` if none)."""
    import html as _html

    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    m = re.search(rf'<meta name="{STATUS_META}" content="([^"]*)"', text)
    if not m:
        return {}
    try:
        data = json.loads(_html.unescape(m.group(1)))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
