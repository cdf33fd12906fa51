"""Subject and group HTML reports (jinja2 templates in ``templates/``, self-contained HTML)."""

from bids_app.report.group import build_group_report
from bids_app.report.subject import build_subject_report, collect_subject

__all__ = ["build_subject_report", "build_group_report", "collect_subject"]
