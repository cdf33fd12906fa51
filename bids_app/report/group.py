"""Group HTML report: the table of lesion biomarkers and a sorted plot of lesion volumes (inline PNG)."""

from __future__ import annotations

import base64
import csv
from pathlib import Path

from bids_app.report.common import CITATIONS, environment
from nodes.base import atomic_write_text

GROUP_TSV = "group_lesions.tsv"
GROUP_HTML = "group_lesions.html"
NUMERIC = ("total_volume_ml", "lesion_count", "largest_lesion_ml", "mean_adc_lesion")


def read_group_tsv(path) -> list[dict]:
    """Rows of a group TSV as dicts of strings."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def volume_plot_png(rows) -> bytes | None:
    """Lesion volumes sorted (horizontal bars with labels; dots when there are many), PNG bytes."""
    from nodes.figures import get_pyplot, save_png

    pts = [(_num(r.get("total_volume_ml")), r) for r in rows]
    pts = sorted(((v, r) for v, r in pts if v is not None), key=lambda p: p[0])
    if not pts:
        return None
    plt = get_pyplot()
    labels = [r["participant_id"] + ("" if r.get("session_id") in (None, "", "n/a") else f" {r['session_id']}")
              for _, r in pts]
    vals = [v for v, _ in pts]
    colors = ["#9a6700" if v == 0 else "#0969da" for v in vals]
    if len(pts) <= 60:
        fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.28 * len(pts)))
        ax.barh(range(len(vals)), vals, color=colors)
        ax.set_yticks(range(len(vals)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_ylim(-0.6, len(vals) - 0.4)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=7)
        ax.set_xlabel("total lesion volume (ml)")
        ax.margins(x=0.12)
    else:
        fig, ax = plt.subplots(figsize=(7.5, 3.2))
        ax.scatter(range(len(vals)), vals, s=8, c=colors)
        ax.set_xlabel("sessions, sorted by lesion volume")
        ax.set_ylabel("total lesion volume (ml)")
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title(f"Lesion volume of {len(vals)} session(s)", fontsize=10)
    fig.tight_layout()
    try:
        return save_png(fig, dpi=100)
    finally:
        plt.close(fig)


def build_group_report(output_dir, rows=None, columns=None, dictionary=None) -> Path:
    """Write ``<output_dir>/group_lesions.html`` from ``rows`` (default: read ``group_lesions.tsv``)."""
    output_dir = Path(output_dir)
    if rows is None:
        rows = read_group_tsv(output_dir / GROUP_TSV)
    rows = [{k: ("n/a" if v is None else str(v)) for k, v in r.items()} for r in rows]
    columns = list(columns or (rows[0].keys() if rows else []))
    png = volume_plot_png(rows)
    counts = {}
    for r in rows:
        counts[r.get("status", "n/a")] = counts.get(r.get("status", "n/a"), 0) + 1
    vols = sorted(v for v in (_num(r.get("total_volume_ml")) for r in rows) if v is not None)
    median = None
    if vols:
        mid = len(vols) // 2
        median = vols[mid] if len(vols) % 2 else (vols[mid - 1] + vols[mid]) / 2
    subjects = sorted({r["participant_id"] for r in rows if r.get("participant_id")})
    reports = {s: f"{s}.html" for s in subjects if (output_dir / f"{s}.html").is_file()}
    html = environment().get_template("group.html").render(
        rows=rows, columns=columns, numeric=NUMERIC, counts=counts, median=median, n_subjects=len(subjects),
        plot=base64.b64encode(png).decode("ascii") if png else None, reports=reports,
        dictionary=dictionary or {}, citations=CITATIONS,
    )
    return atomic_write_text(html, output_dir / GROUP_HTML)
