"""Group level: collect the participant outputs into ``group_lesions.tsv`` (+ ``.json``) and a group report.

One row per subject/session with lesion biomarkers (``sub-*/[ses-*/]dwi/*_desc-lesion_stats.tsv``) and
the models of the mask sidecar; sessions that failed (crash files or a FAILED status in the subject
report) and left no biomarkers get a row with ``status = failed`` and ``n/a`` values; sessions whose
latest run failed but an earlier run left biomarkers are ``stale``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from bids_app.errors import NoDataError
from bids_app.report.common import current_crashes, read_json, strip_prefix
from bids_app.report.group import GROUP_TSV, build_group_report
from bids_app.report.subject import STATUS_FAILED, read_report_status
from nodes.base import atomic_write_text, write_json_atomic
from nodes.biomarkers import STATS_DICTIONARY

GROUP_JSON = "group_lesions.json"
COLUMNS = ("participant_id", "session_id", "total_volume_ml", "lesion_count", "largest_lesion_ml",
           "mean_adc_lesion", "models", "status")
DATA_DICTIONARY = {
    "participant_id": {"Description": "Participant label (sub-<label>)."},
    "session_id": {"Description": "Session label (ses-<label>); n/a when the dataset has no sessions."},
    **{k: v for k, v in STATS_DICTIONARY.items() if k in COLUMNS},
    "models": {"Description": "Ensemble members that produced the mask (from the mask sidecar 'Models'), "
               "joined with '+'."},
    "status": {"Description": "Outcome of the participant-level run for this session.",
               "Levels": {"ok": "lesion mask and biomarkers written, lesion found",
                          "no lesion": "biomarkers written, the mask is empty",
                          "failed": "the run failed before writing biomarkers",
                          "stale": "the latest run of this session failed; the values are those an "
                                   "earlier run wrote",
                          "incomplete": "some outputs but no biomarkers and no recorded error: the run was "
                                        "stopped from outside (time limit, kill); run the participant level "
                                        "again"}},
}
_STATS_RE = re.compile(r"^sub-(?P<sub>[A-Za-z0-9]+)(?:_ses-(?P<ses>[A-Za-z0-9]+))?_desc-lesion_stats\.tsv$")


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value).replace("\t", " ").replace("\n", " ") or "n/a"


def _models(sidecar) -> str | None:
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get("Models"), list):
        return None
    names = [str(m.get("name") if isinstance(m, dict) else m) for m in sidecar["Models"]]
    return "+".join(n for n in names if n) or None


def _stats_rows(output_dir: Path) -> list[dict]:
    from nodes.biomarkers import read_lesion_stats

    rows = []
    paths = sorted(output_dir.glob("sub-*/dwi/*_desc-lesion_stats.tsv")) + \
        sorted(output_dir.glob("sub-*/ses-*/dwi/*_desc-lesion_stats.tsv"))
    for path in paths:
        m = _STATS_RE.match(path.name)
        if not m:
            continue
        row = {"participant_id": f"sub-{m['sub']}", "session_id": f"ses-{m['ses']}" if m["ses"] else None}
        try:
            stats = read_lesion_stats(path)
        except (OSError, ValueError):
            stats = None
        if stats is None:
            row.update(status="failed")
        else:
            for key in ("total_volume_ml", "lesion_count", "largest_lesion_ml", "mean_adc_lesion"):
                row[key] = stats.get(key)
            empty = not stats.get("lesion_count") and not stats.get("total_volume_ml")
            row["status"] = "no lesion" if empty else "ok"
        sidecar = read_json(path.with_name(path.name.replace("_desc-lesion_stats.tsv", "_label-lesion_mask.json")))
        row["models"] = _models(sidecar)
        rows.append(row)
    return rows


def _crashed_sessions(output_dir: Path) -> dict[str, set]:
    """``{sub-<s>: session labels (None: no session / the whole subject) with a current crash file}``,
    every subject's crash files parsed once."""
    subjects = {p.name for p in output_dir.glob("sub-*") if p.is_dir()}
    subjects |= {p.stem for p in output_dir.glob("sub-*.html") if p.is_file()}
    return {sub: {c["session"] for c in current_crashes(output_dir, strip_prefix(sub, "sub"))[0]}
            for sub in sorted(subjects)}


def _failed_rows(output_dir: Path, done: set, crashed: dict[str, set]) -> list[dict]:
    """Sessions that a crash file or a subject report marks as failed and that have no biomarkers."""
    rows = []
    for sub, sessions in crashed.items():
        failed: set = {None if ses is None else f"ses-{ses}" for ses in sessions}
        for ses, status in read_report_status(output_dir / f"{sub}.html").items():
            if status == STATUS_FAILED:
                failed.add(None if ses in ("n/a", "", None) else f"ses-{strip_prefix(ses, 'ses')}")
        has_any = any(p == sub for p, _ in done)
        for ses in sorted(failed, key=lambda s: (s is not None, s or "")):
            if (sub, ses) in done or (ses is None and has_any):
                continue
            rows.append({"participant_id": sub, "session_id": ses, "status": "failed"})
        # outputs without biomarkers and without any recorded error: a run stopped from outside (time
        # limit, pre-emption, kill) while writing this session
        listed = done | {(sub, r["session_id"]) for r in rows if r["participant_id"] == sub}
        for folder in sorted(p.parent for p in (output_dir / sub).glob("**/dwi") if any(p.iterdir())):
            ses = folder.name if folder.name.startswith("ses-") else None
            if (sub, ses) not in listed and not (ses is None and has_any):
                rows.append({"participant_id": sub, "session_id": ses, "status": "incomplete"})
    return rows


def _mark_stale(rows: list[dict], crashed: dict[str, set]) -> None:
    """Rows whose session failed in its latest participant run (current crash files) are ``stale``."""
    for row in rows:
        sessions = crashed.get(row["participant_id"], set())
        ses = strip_prefix(row["session_id"], "ses") if row["session_id"] else None
        if ses in sessions or None in sessions:  # a crash naming no session: the whole subject
            row["status"] = "stale"


def run_group(output_dir) -> dict:
    """Write ``group_lesions.tsv``, ``group_lesions.json`` and ``group_lesions.html``; return a summary.

    Raises :class:`NoDataError` when ``output_dir`` holds no participant output at all.
    """
    output_dir = Path(output_dir)
    rows = _stats_rows(output_dir)
    crashed = _crashed_sessions(output_dir)
    _mark_stale(rows, crashed)
    done = {(r["participant_id"], r["session_id"]) for r in rows}
    rows += _failed_rows(output_dir, done, crashed)
    if not rows:
        raise NoDataError(f"{output_dir}: no participant outputs (sub-*/[ses-*/]dwi/*_desc-lesion_stats.tsv) "
                          "and no failed participant runs; run the participant level first")
    rows.sort(key=lambda r: (r["participant_id"], r["session_id"] or ""))
    table = [{c: _cell(r.get(c)) for c in COLUMNS} for r in rows]
    text = "\t".join(COLUMNS) + "\n" + "".join("\t".join(r[c] for c in COLUMNS) + "\n" for r in table)
    tsv = atomic_write_text(text, output_dir / GROUP_TSV)
    js = write_json_atomic(DATA_DICTIONARY, output_dir / GROUP_JSON)
    html = build_group_report(output_dir, rows=table, columns=COLUMNS, dictionary=DATA_DICTIONARY)
    counts = {}
    for r in table:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {"tsv": str(tsv), "json": str(js), "html": str(html), "n_rows": len(table), "status_counts": counts,
            "rows": table}


def main(argv=None) -> int:  # pragma: no cover - convenience entry point
    import sys

    out = run_group((argv or sys.argv[1:])[0])
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
