"""Where things of one session live: node names, reportlets folder, crash-file folder."""

from __future__ import annotations

from pathlib import Path


def session_name(session) -> str:
    """'sub-01_ses-1' (or 'sub-01' without sessions): also the prefix of figure file names."""
    name = f"sub-{session.subject}"
    return f"{name}_ses-{session.session}" if session.session else name


def reportlets_dir(work_dir, session) -> Path:
    path = Path(work_dir) / "reportlets" / f"sub-{session.subject}"
    return path / f"ses-{session.session}" if session.session else path


def crash_dir(config, subject: str) -> Path:
    return Path(config.output_dir) / f"sub-{subject}" / "log" / config.run_id


def bids_uri(bids_dir, path) -> str:
    """``bids:raw:<path in the dataset>`` (``DatasetLinks.raw``), however either path is spelled
    (symbolic links, relative parts); the path itself for a file outside the dataset."""
    file = Path(path).absolute()  # not resolved: a DataLad/git-annex file links into .git/annex
    for root in (Path(bids_dir).absolute(), Path(bids_dir).resolve()):
        try:
            return f"bids:raw:{file.relative_to(root).as_posix()}"
        except ValueError:
            continue
    return str(path)
