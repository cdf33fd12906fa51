"""One run configuration object, built from the command line and saved with the outputs."""

from __future__ import annotations

import dataclasses
import os
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path

from bids_app.errors import UsageError


def parse_memory_gb(text: str | float | None) -> float | None:
    """'8G', '8GB', '8000MB', '1.5T' -> gigabytes (float); a bare number is megabytes, as fMRIPrep's
    ``--mem``/``--mem_mb`` read it ('16000' -> 15.6)."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), flags=re.I)
    if not match:
        raise UsageError(f"--mem: cannot read memory size {text!r} (use e.g. 8GB or 8000MB)")
    value, unit = float(match.group(1)), match.group(2).upper() or "M"
    return value * {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}[unit]


def new_run_id() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}_{uuid.uuid4().hex[:8]}"


@dataclasses.dataclass
class RunConfig:
    bids_dir: Path
    output_dir: Path
    analysis_level: str
    work_dir: Path
    participant_labels: list[str] | None = None
    session_labels: list[str] | None = None
    bids_filter: dict | None = None
    skip_bids_validation: bool = False
    nprocs: int = 1
    omp_nthreads: int = 1
    mem_gb: float | None = None
    device: str = "auto"
    models: list[str] | None = None
    weights_dir: Path | None = None
    weights_manifest: Path | None = None
    builtin_weights: Path | None = None  # None: the shipped models/builtin/weights/builtin_v1.pt
    skull_strip: str = "otsu"
    tta: bool = False
    threshold: float = 0.5
    min_lesion_ml: float | None = None  # None: the model's recommendation
    contrast_check: str = "auto"  # auto: the model's recommendation; on; off
    grow_lesions: str = "auto"  # auto: the model's recommendation; on; off
    detect_lesions: str = "auto"  # auto: the model's recommendation; on; off
    mirror_check: str = "off"  # on: drop components not brighter than their mirror images
    stop_on_first_crash: bool = False
    reports_only: bool = False
    random_seed: int = 0
    verbose: int = 0
    run_id: str = dataclasses.field(default_factory=new_run_id)
    command_line: str = ""

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}


def default_nprocs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)
