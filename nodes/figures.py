"""Report figures: red lesion contours over DWI and ADC in axial mosaics (PNG, matplotlib Agg).

Images are reoriented to RAS (``as_closest_canonical``) for display only, so every figure reads the
same way whatever the storage order: axial slices seen from above, patient's right on the right
(marked R/L), anterior at the top. The slices shown are those with the most lesion voxels (up to
:data:`MAX_SLICES`, sorted inferior to superior), or evenly spaced slices through the brain when the
mask is empty.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import File, traits

from bids_app.errors import InputError
from nodes.base import DecisionInputSpec, DecisionInterface, DecisionOutputSpec, atomic_write_bytes, load_nifti

MAX_SLICES = 8


def get_pyplot():
    """``matplotlib.pyplot`` on the Agg backend, with a writable ``MPLCONFIGDIR`` (HOME may be read-only)."""
    if not os.environ.get("MPLCONFIGDIR"):
        cfg = Path(tempfile.gettempdir()) / f"deepisles-mpl-{os.getuid()}"
        cfg.mkdir(mode=0o700, exist_ok=True)
        os.environ["MPLCONFIGDIR"] = str(cfg)
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path=None, dpi=100) -> bytes:
    """PNG bytes of ``fig`` without time-stamp/software metadata (same input, same bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None}, facecolor=fig.get_facecolor())
    data = buf.getvalue()
    if path is not None:
        atomic_write_bytes(data, path)
    return data


def _canonical(path, what):
    img, _ = load_nifti(path)
    img = nib.as_closest_canonical(nib.funcs.squeeze_image(img))
    data = np.asanyarray(img.dataobj).astype(np.float32)
    if data.ndim == 4:
        data = data[..., -1]
    if data.ndim != 3:
        raise InputError(path, f"{what} must be 3-D, got shape {data.shape}")
    return img, np.nan_to_num(data)


def choose_slices(mask, image=None, n=MAX_SLICES) -> list[int]:
    """Axial indices (last axis) with most lesion voxels, sorted; evenly spaced through the brain if empty."""
    counts = (mask > 0).sum(axis=(0, 1))
    if counts.any():
        order = np.argsort(-counts, kind="stable")[:n]
        return sorted(int(k) for k in order if counts[k] > 0)
    nz = mask.shape[2]
    lo, hi = 0, nz - 1
    if image is not None:
        filled = np.where((np.abs(image) > 0).sum(axis=(0, 1)) > 0.05 * image.shape[0] * image.shape[1])[0]
        if filled.size:
            lo, hi = int(filled[0]), int(filled[-1])
    k = min(n, hi - lo + 1)
    return sorted(set(int(round(v)) for v in np.linspace(lo, hi, k + 2)[1:-1])) or [nz // 2]


def brain_box(image, margin=3):
    """In-plane bounding box (x slice, y slice) of the voxels above 5 % of the 99th percentile."""
    vals = image[image > 0]
    if vals.size == 0:
        return slice(None), slice(None)
    fg = (image > 0.05 * np.percentile(vals, 99)).any(axis=2)
    xs, ys = np.where(fg)
    nx, ny = fg.shape
    return (slice(max(int(xs.min()) - margin, 0), min(int(xs.max()) + margin + 1, nx)),
            slice(max(int(ys.min()) - margin, 0), min(int(ys.max()) + margin + 1, ny)))


def window(data, low=1.0, high=99.5):
    """Display range from percentiles of the non-zero voxels."""
    vals = data[np.isfinite(data) & (data != 0)]
    if vals.size == 0:
        return 0.0, 1.0
    vmin, vmax = np.percentile(vals, [low, high])
    return float(vmin), float(vmax if vmax > vmin else vmin + 1.0)


def lesion_mosaic(rows, mask, slices, aspect=1.0, title=""):
    """A figure with one row per ``(label, data, (vmin, vmax))`` and red mask contours on every panel."""
    plt = get_pyplot()
    ncol = len(slices)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.6 * ncol + 0.4, 1.9 * len(rows) + 0.5),
                             squeeze=False, facecolor="black")
    for r, (label, data, (vmin, vmax)) in enumerate(rows):
        for c, k in enumerate(slices):
            ax = axes[r, c]
            ax.imshow(data[:, :, k].T, cmap="gray", vmin=vmin, vmax=vmax, origin="lower",
                      aspect=aspect, interpolation="nearest")
            m = mask[:, :, k].T
            if m.any() and min(m.shape) > 1:
                ax.contour(m.astype(float), levels=[0.5], colors="red", linewidths=0.9, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if r == 0:
                ax.set_title(f"z={k}", color="white", fontsize=8, pad=2)
            if c == 0:
                ax.set_ylabel(label, color="white", fontsize=9)
                ax.text(0.02, 0.5, "L", color="yellow", fontsize=7, transform=ax.transAxes, va="center")
                ax.text(0.98, 0.5, "R", color="yellow", fontsize=7, transform=ax.transAxes, va="center",
                        ha="right")
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    fig.subplots_adjust(left=0.03, right=0.99, bottom=0.01, top=0.86 if title else 0.93, wspace=0.02,
                        hspace=0.06)
    return fig


class _LesionFiguresInputSpec(DecisionInputSpec):
    trace_file = File(exists=True, mandatory=True, desc="trace DWI (b~1000) on the DWI grid")
    adc_file = File(exists=True, desc="ADC on the DWI grid")
    mask_file = File(exists=True, mandatory=True, desc="binary lesion mask on the DWI grid")
    out_prefix = traits.Str(mandatory=True, desc="file-name prefix, e.g. 'sub-01_ses-1'")


class _LesionFiguresOutputSpec(DecisionOutputSpec):
    figure_files = traits.List(File(exists=True), desc="PNG figures written")


class LesionFigures(DecisionInterface):
    """PNG mosaic of the lesion contours (red) over the trace DWI (top row) and the ADC (bottom row)."""

    input_spec = _LesionFiguresInputSpec
    output_spec = _LesionFiguresOutputSpec
    step = "figures"
    title = "Report figures"

    def _run_step(self, runtime):
        dwi_img, dwi = _canonical(self.inputs.trace_file, "trace DWI")
        _, mask = _canonical(self.inputs.mask_file, "lesion mask")
        if mask.shape != dwi.shape:
            raise InputError(self.inputs.mask_file, f"mask shape {mask.shape} differs from DWI {dwi.shape}")
        mask = mask > 0.5
        rows = [("DWI (trace)", dwi, window(dwi))]
        if self.inputs.adc_file:
            _, adc = _canonical(self.inputs.adc_file, "ADC")
            if adc.shape == dwi.shape:
                rows.append(("ADC", adc, window(adc, 1.0, 99.0)))
            else:
                self.decide(f"ADC shape {adc.shape} differs from the DWI {dwi.shape}: ADC row left out.",
                            "warning")
        slices = choose_slices(mask, dwi)
        bx, by = brain_box(dwi)
        rows = [(label, data[bx, by], win) for label, data, win in rows]
        mask = mask[bx, by]
        zooms = dwi_img.header.get_zooms()[:3]
        n_vox = int(mask.sum())
        if n_vox:
            title = f"Lesion contours (red): {n_vox} voxels; slices with most lesion voxels"
            self.decide(f"Showing {len(slices)} axial slice(s) with the most lesion voxels: {slices}.")
        else:
            title = "No lesion found: evenly spaced slices"
            self.decide(f"Mask empty: showing {len(slices)} evenly spaced axial slices {slices}.", "warning")
        self.decide("Display in RAS orientation (patient's right on the right), windows from the "
                    "1st-99.5th (DWI) and 1st-99th (ADC) percentiles of non-zero voxels.")
        fig = lesion_mosaic(rows, mask, slices, aspect=float(zooms[1]) / float(zooms[0]), title=title)
        out = Path(runtime.cwd) / f"{self.inputs.out_prefix}_desc-lesion_mosaic.png"
        try:
            save_png(fig, out, dpi=100)
        finally:
            get_pyplot().close(fig)
        self.record("slices", slices)
        self.record("figures", [out.name])
        self._results["figure_files"] = [str(out)]
        return runtime
