"""Build the compact tissue atlas used by the synthetic training-data generator.

Run once (needs nilearn; training does not):  ``python -m models.builtin.make_atlas``

Source: nilearn's copy of the MNI ICBM152 2009a nonlinear symmetric template (1 mm, skull-stripped
T1 + GM and WM probability maps).  nilearn ships no CSF map, so CSF is derived as
``clip(brain - GM - WM, 0, 1)`` where ``brain`` is the (lightly smoothed) support of the skull-stripped
T1.  The maps are smoothed (anti-alias) and resampled trilinearly onto an exact 1.5 mm grid, and
stored as uint8 (probability * 255) in a compressed ``.npz`` together with the RAS affine.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "atlas" / "mni152_tissue_1p5mm.npz"
VOXEL_MM = 1.5


def main(out: Path = OUT) -> Path:
    import nibabel as nib
    import nilearn
    from scipy import ndimage

    ddir = Path(os.path.dirname(nilearn.__file__)) / "datasets" / "data"
    name = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
    t1 = nib.load(ddir / name.format("t1"))
    gm = nib.load(ddir / name.format("gm")).get_fdata(dtype=np.float32)
    wm = nib.load(ddir / name.format("wm")).get_fdata(dtype=np.float32)
    t1d = t1.get_fdata(dtype=np.float32)
    aff = t1.affine.copy()
    brain = (t1d > 0).astype(np.float32)
    brain = ndimage.binary_fill_holes(brain > 0).astype(np.float32)
    brain = ndimage.gaussian_filter(brain, 0.5)
    # the nilearn copies store probabilities scaled to 0..255
    gm = np.clip(gm / (255.0 if gm.max() > 1.5 else 1.0), 0, 1)
    wm = np.clip(wm / (255.0 if wm.max() > 1.5 else 1.0), 0, 1)
    s = gm + wm
    over = s > 1
    gm[over] /= s[over]
    wm[over] /= s[over]
    csf = np.clip(brain - gm - wm, 0, 1)
    # trilinear resampling onto an exact 1.5 mm grid (after a mild anti-alias smoothing)
    zoom_in = np.abs(np.diag(aff)[:3])
    sig = 0.5 * VOXEL_MM / zoom_in
    shape_in = np.array(gm.shape)
    shape_out = np.floor((shape_in - 1) * zoom_in / VOXEL_MM).astype(int) + 1
    step = VOXEL_MM / zoom_in
    coords = np.meshgrid(*[np.arange(n) * st for n, st in zip(shape_out, step)], indexing="ij")
    maps = []
    for m in (gm, wm, csf):
        m = ndimage.gaussian_filter(m, sig)
        maps.append(ndimage.map_coordinates(m, coords, order=1))
    tissue = np.clip(np.stack(maps), 0, 1)
    # crop to the bounding box of the brain + 2 voxels
    nz = np.argwhere(tissue.sum(0) > 0.01)
    lo = np.maximum(nz.min(0) - 2, 0)
    hi = np.minimum(nz.max(0) + 3, shape_out)
    tissue = tissue[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    new_aff = aff.copy()
    new_aff[:3, :3] = aff[:3, :3] @ np.diag(step)
    new_aff[:3, 3] = (aff @ np.r_[lo * step, 1.0])[:3]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        tissue=np.round(tissue * 255).astype(np.uint8),
        affine=new_aff.astype(np.float64),
        labels=np.array(["gm", "wm", "csf"]),
    )
    print(f"wrote {out} shape {tissue.shape[1:]} ({out.stat().st_size / 1e6:.2f} MB)")
    return out


if __name__ == "__main__":
    main()
