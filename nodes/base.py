"""Shared pieces of every step: safe image I/O, atomic writes and the decision-recording interface.

Every node of the workflow is a :class:`DecisionInterface`: a nipype ``SimpleInterface`` whose
``_run_step`` fills ``self._results`` and records what it decided with :meth:`decide`. The
decisions are returned as the ``decisions`` output and, when ``reportlets_dir`` is set, written to
``<reportlets_dir>/<step>.json`` so that the subject report can show them even when a later step
crashed.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from bids_app.errors import InputError


# ----------------------------------------------------------------------------- atomic writes
def _read_umask() -> int:
    mask = os.umask(0)  # read once, at import (single-threaded then): os.umask can only be read by setting it
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _atomic_target(path) -> tuple[Path, Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    return path, Path(tmp)


def atomic_write_bytes(data: bytes, path) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    path, tmp = _atomic_target(path)
    try:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # as open() would (mkstemp makes 0600); 0644 under the usual 022
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(text: str, path) -> Path:
    return atomic_write_bytes(text.encode("utf-8"), path)


def write_json_atomic(obj, path) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def save_nifti_atomic(img: nib.Nifti1Image, path) -> Path:
    """Save a NIfTI image (``.nii`` or ``.nii.gz``) under a temporary name, then rename it.

    The gzip header carries no time stamp, so the same image always gives the same bytes.
    """
    path = Path(path)
    raw = img.to_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.compress(raw, compresslevel=6, mtime=0)
    return atomic_write_bytes(raw, path)


# ----------------------------------------------------------------------------- safe loading
def check_readable(path) -> Path:
    """Raise :class:`InputError` naming ``path`` if it cannot be read as a file."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise InputError(
            path,
            "broken symbolic link (a DataLad/git-annex file whose content was not fetched? "
            "run `datalad get` on it first)",
        )
    if not path.exists():
        raise InputError(path, "file not found")
    if not path.is_file():
        raise InputError(path, "not a regular file")
    if not os.access(path, os.R_OK):
        raise InputError(path, "permission denied")
    return path


def load_nifti(path, dtype=np.float32) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load a NIfTI image and its data, turning every low-level failure into one clear line."""
    path = check_readable(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many kinds for non-NIfTI files
        raise InputError(path, f"not a readable NIfTI image ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(path, f"not a NIfTI image (read as {type(img).__name__})")
    try:
        data = np.asanyarray(img.dataobj).astype(dtype, copy=False)
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        raise InputError(path, f"truncated or corrupt image data ({exc})") from None
    return img, data


def new_image(data: np.ndarray, like: nib.spatialimages.SpatialImage, dtype=None) -> nib.Nifti1Image:
    """A NIfTI image with ``data`` on the grid (affine, qform/sform codes) of ``like``."""
    dtype = dtype or data.dtype
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(dtype)
    out = nib.Nifti1Image(np.asarray(data, dtype=dtype), like.affine, hdr)
    sform_code = int(like.header["sform_code"]) if "sform_code" in like.header else 1
    qform_code = int(like.header["qform_code"]) if "qform_code" in like.header else 1
    out.set_sform(like.affine, code=sform_code or 1)
    out.set_qform(like.affine, code=qform_code or 1)
    try:
        out.header.set_xyzt_units(*like.header.get_xyzt_units())
    except Exception:  # pragma: no cover - odd headers
        out.header.set_xyzt_units("mm", "sec")
    return out


# ----------------------------------------------------------------------------- interfaces
class DecisionInputSpec(BaseInterfaceInputSpec):
    reportlets_dir = traits.Str(
        desc="folder where this step writes <step>.json with its decisions", nohash=True
    )


class DecisionOutputSpec(TraitedSpec):
    decisions = traits.Dict(desc="what this step decided: {'step', 'title', 'items', 'values'}")


class DecisionInterface(SimpleInterface):
    """A step that records the decisions it takes for the report.

    Subclasses set ``step`` (file-name safe) and ``title``, implement ``_run_step(runtime)`` and call
    ``self.decide(text, level="info"|"warning")`` and ``self.record(key, value)``.
    """

    step = "step"
    title = "Step"

    def decide(self, text: str, level: str = "info") -> None:
        self._items.append({"level": level, "text": str(text)})

    def record(self, key: str, value) -> None:
        self._values[key] = value

    def _run_interface(self, runtime):
        self._items: list[dict] = []
        self._values: dict = {}
        runtime = self._run_step(runtime)
        decisions = {"step": self.step, "title": self.title, "items": self._items, "values": self._values}
        self._results["decisions"] = decisions
        if isdefined(self.inputs.reportlets_dir) and self.inputs.reportlets_dir:
            write_json_atomic(decisions, Path(self.inputs.reportlets_dir) / f"{self.step}.json")
        return runtime

    def _run_step(self, runtime):  # pragma: no cover - abstract
        raise NotImplementedError
