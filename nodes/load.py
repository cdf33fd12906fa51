"""Step 'load': check every input image and write clean float32 copies.

Each image is read with :func:`nodes.base.load_nifti`, singleton axes beyond the third are dropped,
and the data must be finite (NaN or infinite voxels only in the background, connected to the edge of
the field of view, as some tools write them: set to 0 with a warning), non-constant and of the expected
dimensionality; the header must give
positive voxel sizes and an invertible affine. Problems raise :class:`InputError` naming the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import obliquity
from nipype.interfaces.base import File, traits

from bids_app.errors import InputError
from nodes.base import (
    DecisionInputSpec,
    DecisionInterface,
    DecisionOutputSpec,
    load_nifti,
    new_image,
    save_nifti_atomic,
)

OBLIQUE_DEG = 0.5  # larger angle between a voxel axis and the nearest world axis: "oblique"


def squeeze_extra_axes(data: np.ndarray) -> np.ndarray:
    """Drop singleton axes beyond the third (e.g. ``(x, y, z, 1)`` -> ``(x, y, z)``)."""
    keep = [ax for ax in range(data.ndim) if ax < 3 or data.shape[ax] != 1]
    return data.reshape([data.shape[ax] for ax in keep])


def read_bvals(path) -> np.ndarray:
    """The b-values of a BIDS ``.bval`` file (one row of numbers)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "b-value file not found")
    try:
        vals = np.loadtxt(path, dtype=float, ndmin=1).ravel()
    except ValueError as exc:
        raise InputError(path, f"not a b-value file ({exc})") from None
    if vals.size == 0 or not np.all(np.isfinite(vals)) or np.any(vals < 0):
        raise InputError(path, "b-values must be a non-empty row of finite, non-negative numbers")
    return vals


def raw_geometry(path) -> tuple[np.ndarray, int, int] | None:
    """``(pixdim[1:4], qform_code, sform_code)`` as stored in the file, before nibabel repairs the header
    (it sets zero voxel sizes to 1 while loading); ``None`` when the header cannot be read this way."""
    try:
        with nib.openers.ImageOpener(str(path)) as handle:
            header = nib.Nifti1Header.from_fileobj(handle, check=False)
        return (np.asarray(header["pixdim"][1:4], dtype=float), int(header["qform_code"]),
                int(header["sform_code"]))
    except Exception:  # NIfTI-2, unusual openers: nibabel's own checks stand
        return None


def nonfinite_background(data: np.ndarray) -> tuple[int, int]:
    """``(non-finite voxels, those not connected to the edge of the field of view)``: NaN backgrounds
    (some tools write NaN where there is no signal) reach the edge; NaN inside the head does not."""
    from scipy import ndimage

    bad = ~np.isfinite(data)
    total = int(np.count_nonzero(bad))
    if not total or data.ndim < 3:  # a 2-D image is refused anyway: count every such voxel as inside
        return total, total
    spatial = bad.reshape(bad.shape[:3] + (-1,)).any(axis=3)
    labels = ndimage.label(spatial, np.ones((3, 3, 3), bool))[0]
    edge = np.zeros(spatial.shape, bool)
    for axis in range(3):
        edge[(slice(None),) * axis + (0,)] = edge[(slice(None),) * axis + (-1,)] = True
    touching = np.unique(labels[edge & spatial])
    inner = spatial & ~np.isin(labels, touching)
    return total, int(np.count_nonzero(inner))


def clear_nonfinite_background(path, data: np.ndarray) -> tuple[np.ndarray, int]:
    """``(data with background NaN/inf set to 0, voxels set)``; :class:`InputError` for any non-finite
    voxel away from the edge of the field of view."""
    total, inner = nonfinite_background(data)
    if inner:
        raise InputError(path, f"{total} voxels are NaN or infinite ({inner} of them away from the edge of the "
                               "field of view, inside the head)")
    if total:
        data = np.where(np.isfinite(data), data, 0).astype(data.dtype)
    return data, total


def check_image(path, kind: str, data: np.ndarray, img, n_bvals: int | None = None, raw=None) -> np.ndarray:
    """Validate one image (``kind``: 'dwi', 'adc' or 'flair'; its non-finite voxels already handled by
    :func:`clear_nonfinite_background`); return its squeezed data.

    ``n_bvals`` (DWI only): number of b-values when a ``.bval`` file was given.
    """
    data = squeeze_extra_axes(data)
    shape = data.shape
    if data.ndim < 3 or min(shape[:3]) < 2:
        raise InputError(path, f"{kind.upper()} is 2-D (shape {shape}); a 3-D volume is required")
    if kind == "dwi":
        if data.ndim == 4:
            nvol = shape[3]
            if n_bvals is None and nvol > 2:
                raise InputError(
                    path, f"4-D DWI with {nvol} volumes but no .bval file; give the b-values or a 3-D trace"
                )
            if n_bvals is not None and n_bvals != nvol:
                raise InputError(path, f"4-D DWI has {nvol} volumes but the .bval file lists {n_bvals} b-values")
        elif data.ndim > 4:
            raise InputError(path, f"DWI has {data.ndim} dimensions (shape {shape}); expected 3-D or 4-D")
    elif data.ndim != 3:
        raise InputError(path, f"{kind.upper()} must be 3-D, got {data.ndim}-D (shape {shape})")
    if not np.any(data):
        raise InputError(path, "image is empty (all voxels are zero)")
    if float(data.max()) == float(data.min()):
        raise InputError(path, f"image is constant (every voxel is {float(data.min()):g})")
    raw = raw_geometry(path) if raw is None else raw  # (pixdim, qform code, sform code) as stored
    if raw is not None and raw[1] == 0 and raw[2] == 0 and not np.all(np.abs(raw[0]) > 0):
        raise InputError(path, f"voxel sizes {raw[0].tolist()} in the header and no sform/qform: the voxel grid "
                               "is unknown")
    aff = np.asarray(img.affine, dtype=float)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)  # nibabel repairs zero pixdim to 1
    zooms_affine = np.sqrt((aff[:3, :3] ** 2).sum(0)) if np.all(np.isfinite(aff)) else zooms
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0) or np.any(zooms_affine <= 1e-6):
        raise InputError(path, f"voxel sizes must be positive (header {zooms.tolist()}, affine {np.round(zooms_affine, 4).tolist()})")
    if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
        raise InputError(path, "the image affine (sform/qform) is not invertible")
    return data


def describe(img, data: np.ndarray) -> dict:
    """Shape, voxel sizes, orientation and obliquity of an image, for the report."""
    angles = np.degrees(obliquity(img.affine))
    return {
        "shape": list(data.shape),
        "voxel_size_mm": [round(float(z), 4) for z in img.header.get_zooms()[:3]],
        "orientation": "".join(nib.aff2axcodes(img.affine)),
        "obliquity_deg": round(float(np.max(np.abs(angles))), 3),
        "oblique": bool(np.max(np.abs(angles)) > OBLIQUE_DEG),
    }


class LoadInputsInputSpec(DecisionInputSpec):
    dwi_file = File(mandatory=True, desc="DWI: 3-D trace, 4-D with 1-2 volumes, or raw 4-D with bval_file")
    adc_file = File(desc="ADC map (3-D)")
    flair_file = File(desc="FLAIR (3-D)")
    bval_file = File(desc="b-values of a raw 4-D DWI")


class LoadInputsOutputSpec(DecisionOutputSpec):
    dwi_file = File(desc="clean float32 DWI")
    adc_file = File(desc="clean float32 ADC (Undefined when not given)")
    flair_file = File(desc="clean float32 FLAIR (Undefined when not given)")
    is_raw = traits.Bool(desc="True: raw 4-D DWI with b-values (trace/ADC still to compute)")


def _given(value) -> bool:
    return value is not None and value is not traits.Undefined and str(value) != ""


class LoadInputs(DecisionInterface):
    """Check the input images and write clean float32 copies into the working directory."""

    input_spec = LoadInputsInputSpec
    output_spec = LoadInputsOutputSpec
    step = "load"
    title = "Input images"

    def _run_step(self, runtime):
        bvals = None
        if _given(self.inputs.bval_file):
            bvals = read_bvals(self.inputs.bval_file)
        for kind in ("dwi", "adc", "flair"):
            path = getattr(self.inputs, f"{kind}_file")
            if not _given(path):
                self._results[f"{kind}_file"] = traits.Undefined
                continue
            img, data = load_nifti(path)
            raw_shape = list(img.shape)
            data, cleared = clear_nonfinite_background(path, data)
            if cleared:
                self.decide(f"{kind.upper()}: {cleared} NaN or infinite voxels, all in the background (connected "
                            "to the edge of the field of view), set to 0", "warning")
            raw = raw_geometry(path)
            data = check_image(path, kind, data, img, None if bvals is None or kind != "dwi" else bvals.size, raw)
            info = describe(img, data)
            self.record(kind, info)
            if info["shape"] != raw_shape:
                self.decide(f"{kind.upper()}: dropped singleton axes, shape {raw_shape} -> {info['shape']}")
            if kind == "dwi":
                self._dwi_decision(data, bvals)
            out = Path(runtime.cwd) / f"{kind}.nii.gz"
            save_nifti_atomic(new_image(data, img, np.float32), out)
            self._results[f"{kind}_file"] = str(out)
            self.decide(
                f"{kind.upper()} {os.path.basename(str(path))}: {'x'.join(map(str, info['shape']))} voxels of "
                f"{'x'.join(f'{z:g}' for z in info['voxel_size_mm'])} mm, {info['orientation']}"
            )
            if raw is not None and raw[1] == 0 and raw[2] == 0:
                self.decide(f"{kind.upper()} has no sform/qform (codes 0): its orientation in the world is unknown; "
                            "the voxel axes are taken as RAS with the header's voxel sizes", "warning")
            if info["oblique"]:
                self.decide(f"{kind.upper()} is oblique ({info['obliquity_deg']:.1f} deg); kept on its native grid")
        if not _given(self.inputs.adc_file) and not self._results["is_raw"]:
            self.decide("no ADC given and the DWI is not raw: the ADC cannot be computed", "warning")
        return runtime

    def _dwi_decision(self, data, bvals):
        if data.ndim == 4 and bvals is not None:
            self._results["is_raw"] = True
            self.record("bvals", sorted({int(round(b)) for b in bvals}))
            self.decide(f"raw 4-D DWI with {data.shape[3]} volumes and b-values: trace and ADC will be computed")
            return
        self._results["is_raw"] = False
        if bvals is not None:
            self.decide("b-values given with a 3-D DWI: treated as a trace image, b-values ignored", "warning")
        if data.ndim == 4:
            self.decide(f"4-D DWI with {data.shape[3]} volumes and no b-values: the last volume is the trace")
        else:
            self.decide("3-D DWI: treated as the trace image")
