"""Shared helpers of the reports: jinja2 environment, label handling, crash-file parsing, citations."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jinja2

from bids_app.citations import CITATIONS  # noqa: F401  (re-exported for the templates)

_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failure|Warning))(:.*)?$")


def strip_prefix(label: str, prefix: str) -> str:
    """``'sub-01'`` or ``'01'`` -> ``'01'`` (removeprefix, never lstrip)."""
    return str(label).removeprefix(f"{prefix}-")


def environment() -> jinja2.Environment:
    """The jinja2 environment of the report templates (autoescape always on)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
        autoescape=True,
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt_value
    return env


def fmt_value(value, digits=3) -> str:
    """Numbers to short text; ``None`` to ``n/a``; containers to compact JSON."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}".rstrip("0").rstrip(".") if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str, sort_keys=True)
    return str(value)


def read_json(path):
    """JSON content of ``path``, or ``None`` when missing/unreadable (the report shows what exists)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def parse_crash_file(path) -> dict:
    """Node name, last exception line, session guess and full text of a nipype text crash file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        text = f"(crash file unreadable: {exc})"
    node = None
    m = re.search(r"^Node: (.+)$", text, flags=re.M)
    if m:
        node = m.group(1).strip()
    else:  # crash-<time>-<user>-<node>-<uuid>.txt
        m = re.match(r"crash-\d{8}-\d{6}-[^-]+-(.+)-[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", path.name)
        node = m.group(1) if m else path.stem
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    error = next((ln for ln in reversed(lines) if _EXC_LINE.match(ln) and "NodeExecutionError" not in ln), None)
    error = error or (lines[-1] if lines else "(empty crash file)")
    explicit = re.search(r"^Session: sub-[A-Za-z0-9]+(?:_ses-([A-Za-z0-9]+))?\s*$", text, flags=re.M)
    ses = explicit or re.search(r"(?:^|[._-])ses[-_]([A-Za-z0-9]+?)(?:_wf|[._-]|$)", node or "")
    return {
        "file": path.name,
        "run_id": path.parent.name,
        "node": node,
        "step": (node or "").rsplit(".", 1)[-1],
        "error": error,
        "session": ses.group(1) if ses else None,
        "text": text,
    }


RUN_SESSIONS = "sessions.json"  # sub-<s>/log/<run id>/: the sessions a participant run processed


def find_crashes(output_dir, subject: str) -> list[dict]:
    """All ``sub-<s>/log/*/crash-*.txt`` of a subject, parsed, oldest run first."""
    log = Path(output_dir) / f"sub-{subject}" / "log"
    return [parse_crash_file(p) for p in sorted(log.glob("*/crash-*.txt"))]


def latest_runs(output_dir, subject: str) -> dict:
    """``{session label or None: id of the newest participant run that processed it}``, from the
    ``sessions.json`` each run leaves in ``sub-<s>/log/<run id>/`` (run ids sort by time)."""
    out = {}
    for path in sorted((Path(output_dir) / f"sub-{subject}" / "log").glob(f"*/{RUN_SESSIONS}")):
        record = read_json(path)
        if isinstance(record, dict):
            for label in record.get("sessions") or []:
                out[label] = path.parent.name
    return out


def current_crashes(output_dir, subject: str) -> tuple[list[dict], list[dict]]:
    """``(current, superseded)`` crash files: a crash is superseded when a later participant run
    processed its session again (that run's own crash files, if any, are the current ones)."""
    crashes = find_crashes(output_dir, subject)
    latest = latest_runs(output_dir, subject)
    newest = max(latest.values()) if latest else None
    current, superseded = [], []
    for crash in crashes:
        ses = crash["session"]
        rid = latest.get(ses, newest if ses is None else None)
        (current if rid is None or crash["run_id"] >= rid else superseded).append(crash)
    return current, superseded
