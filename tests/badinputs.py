"""Builders of defective (and awkward-but-valid) inputs, one subject per case, for the bad-input matrix.

Every case of :data:`PARTICIPANT_CASES` writes the subject ``sub-<case.name>`` (session ``ses-1``)
into a dataset; :func:`make_matrix_dataset` puts them all, with good control subjects, into ONE
dataset so that ONE participant run checks them all (bad subjects fail in discovery or in the first
nodes, before any inference). :data:`CLI_CASES` stop before any workflow and are run one by one.

Images come from :func:`datasets.sample_case` (the real ISLES'22 case at 4 mm). Subjects that must
go through inference use :func:`crop` (a 32 x 36 x 24 block around the lesion) so that the model
grid stays small.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
from scipy import ndimage

from datasets import sample_case, save, simulate_raw, write_bval_bvec, write_description

SES = "1"
CROP = (slice(20, 52), slice(8, 44), slice(8, 32))  # around the lesion of the sample (4 mm voxels)
HTML_PAYLOAD = "<script>alert('deepisles')</script>"


# ----------------------------------------------------------------------------- helpers
def paths(root, sub: str, datatype: str = "dwi") -> tuple[Path, str]:
    """``(folder, stem)`` of subject ``sub`` (session ``ses-1``), folder created."""
    folder = Path(root) / f"sub-{sub}" / f"ses-{SES}" / datatype
    folder.mkdir(parents=True, exist_ok=True)
    return folder, f"sub-{sub}_ses-{SES}"


def crop(arr: np.ndarray, affine: np.ndarray, region=CROP) -> tuple[np.ndarray, np.ndarray]:
    """``arr[region]`` with the affine of the cropped grid (spatial axes only)."""
    start = np.array([s.start for s in region[:3]] + [1.0])
    aff = affine.copy()
    aff[:, 3] = affine @ start
    return np.ascontiguousarray(arr[tuple(region)]), aff


def cropped_case() -> dict:
    """dwi, adc, affine of the cropped sample (and the full sample as full_*)."""
    case = sample_case()
    dwi, aff = crop(case["dwi"], case["affine"])
    adc, _ = crop(case["adc"], case["affine"])
    return {"dwi": dwi, "adc": adc, "affine": aff, "full_dwi": case["dwi"], "full_adc": case["adc"],
            "full_affine": case["affine"]}


def write_pair(root, sub, dwi, adc, affine, adc_affine=None, dtype=np.float32) -> tuple[Path, Path]:
    """An ISLES'22-style pair ``*_dwi.nii.gz`` + ``*_adc.nii.gz``; returns their paths."""
    folder, stem = paths(root, sub)
    d = save(dwi, affine, folder / f"{stem}_dwi.nii.gz", dtype)
    a = save(adc, affine if adc_affine is None else adc_affine, folder / f"{stem}_adc.nii.gz", dtype)
    return d, a


def good_pair(root, sub, full: bool = False) -> tuple[Path, Path]:
    c = cropped_case()
    if full:
        return write_pair(root, sub, c["full_dwi"], c["full_adc"], c["full_affine"])
    return write_pair(root, sub, c["dwi"], c["adc"], c["affine"])


def write_raw(root, sub, bvals=None, bvecs=None, b_values=(1000, 2000), cropped=True):
    """A raw 4-D DWI + .bval/.bvec (defaults: the simulated ones); returns (dwi, bval, bvec)."""
    data, sim_bvals, sim_bvecs, affine, _ = simulate_raw(b_values)
    if cropped:
        data, affine = crop(data, affine, CROP + (slice(None),))
    folder, stem = paths(root, sub)
    dwi = save(data, affine, folder / f"{stem}_dwi.nii.gz")
    bval, bvec = write_bval_bvec(folder / f"{stem}_dwi",
                                 sim_bvals if bvals is None else bvals,
                                 sim_bvecs if bvecs is None else bvecs)
    return dwi, bval, bvec


def rotation(deg_z: float, deg_x: float = 0.0) -> np.ndarray:
    cz, sz = np.cos(np.radians(deg_z)), np.sin(np.radians(deg_z))
    cx, sx = np.cos(np.radians(deg_x)), np.sin(np.radians(deg_x))
    rz = np.array([[cz, -sz, 0, 0], [sz, cz, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    rx = np.array([[1, 0, 0, 0], [0, cx, -sx, 0], [0, sx, cx, 0], [0, 0, 0, 1]])
    return rz @ rx


def resample_world(data, affine, new_zooms) -> tuple[np.ndarray, np.ndarray]:
    """``data`` resampled (linear) onto an axis-aligned grid of ``new_zooms`` mm covering it."""
    corners = np.array([[i, j, k, 1] for i in (0, data.shape[0] - 1) for j in (0, data.shape[1] - 1)
                        for k in (0, data.shape[2] - 1)], float)
    world = (affine @ corners.T).T[:, :3]
    lo, hi = world.min(0), world.max(0)
    zooms = np.asarray(new_zooms, float)
    shape = tuple(int(np.floor((h - l) / z)) + 1 for l, h, z in zip(lo, hi, zooms))
    new_aff = np.diag(list(zooms) + [1.0])
    new_aff[:3, 3] = lo
    vox2vox = np.linalg.inv(affine) @ new_aff
    out = ndimage.affine_transform(data.astype(np.float64), vox2vox[:3, :3], offset=vox2vox[:3, 3],
                                   output_shape=shape, order=1, mode="constant", cval=0.0)
    return out.astype(np.float32), new_aff


def raw_header_image(data: np.ndarray, affine, path) -> Path:
    """Save an image of any dimensionality (nibabel accepts up to 7-D)."""
    path = Path(path)
    img = nib.Nifti1Image(np.asarray(data, np.float32), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


# ----------------------------------------------------------------------------- case builders
# each builder: (root, sub) -> None; failing cases name the file to blame in Case.blame
def b_good_full(root, sub):
    good_pair(root, sub, full=True)


def b_good_crop(root, sub):
    good_pair(root, sub)


def b_missing_adc(root, sub):
    folder, stem = paths(root, sub)
    c = cropped_case()
    save(c["dwi"], c["affine"], folder / f"{stem}_dwi.nii.gz")


def b_adc_only(root, sub):
    folder, stem = paths(root, sub)
    c = cropped_case()
    save(c["adc"], c["affine"], folder / f"{stem}_adc.nii.gz")


def b_truncated(root, sub):
    dwi, _ = good_pair(root, sub)
    raw = dwi.read_bytes()
    dwi.write_bytes(raw[: len(raw) // 2])  # header intact, data cut: a download stopped half-way


def b_not_nifti(root, sub):
    dwi, _ = good_pair(root, sub)
    dwi.write_text("this is a DICOM export log, not an image\n" * 20)


def b_empty_file(root, sub):
    dwi, _ = good_pair(root, sub)
    dwi.write_bytes(b"")


def b_zero_pixdim(root, sub):
    """Voxel sizes 0 and no sform/qform: nibabel would load it as a 1 mm grid."""
    dwi, _ = good_pair(root, sub)
    img = nib.load(str(dwi))
    img = nib.Nifti1Image(np.asarray(img.dataobj), None)
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    raw = bytearray(img.to_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])), check=False)
    header["pixdim"][1:4] = 0
    raw[:348] = header.binaryblock
    dwi.write_bytes(gzip.compress(bytes(raw), mtime=0))


def b_corrupt_flair(root, sub):
    """A FLAIR no selected model reads (the built-in model uses DWI + ADC): left aside, not a failure."""
    good_pair(root, sub)
    folder, stem = paths(root, sub, "anat")
    (folder / f"{stem}_FLAIR.nii.gz").write_bytes(gzip.compress(b"not an image", mtime=0))


def b_gzip_of_garbage(root, sub):
    dwi, _ = good_pair(root, sub)
    dwi.write_bytes(gzip.compress(os.urandom(4096), mtime=0))


def b_nan_adc(root, sub):
    c = cropped_case()
    adc = c["adc"].copy()
    adc[10, 10, 10] = np.nan
    adc[11, 11, 11] = np.inf
    write_pair(root, sub, c["dwi"], adc, c["affine"])


def b_zero_dwi(root, sub):
    c = cropped_case()
    write_pair(root, sub, np.zeros_like(c["dwi"]), c["adc"], c["affine"])


def b_constant_adc(root, sub):
    c = cropped_case()
    write_pair(root, sub, c["dwi"], np.full_like(c["adc"], 0.8), c["affine"])


def b_dwi_2d(root, sub):
    c = cropped_case()
    folder, stem = paths(root, sub)
    raw_header_image(c["dwi"][:, :, 12], c["affine"], folder / f"{stem}_dwi.nii.gz")
    save(c["adc"], c["affine"], folder / f"{stem}_adc.nii.gz")


def b_dwi_5d(root, sub):
    c = cropped_case()
    folder, stem = paths(root, sub)
    data = np.stack([np.stack([c["dwi"]] * 2, -1)] * 2, -1)  # x y z 2 2
    raw_header_image(data, c["affine"], folder / f"{stem}_dwi.nii.gz")
    save(c["adc"], c["affine"], folder / f"{stem}_adc.nii.gz")


def b_adc_4d(root, sub):
    c = cropped_case()
    write_pair(root, sub, c["dwi"], np.stack([c["adc"]] * 3, -1), c["affine"])


def b_singular_affine(root, sub):
    """sform with a zero-length third axis (qform unset): the header nibabel reads, as written."""
    c = cropped_case()
    aff = c["affine"].copy()
    aff[:3, 2] = 0.0
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr.set_data_shape(c["dwi"].shape)
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = aff[0], aff[1], aff[2]
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    hdr["pixdim"][1:4] = [4.0, 4.0, 4.0]
    folder, stem = paths(root, sub)
    nib.save(nib.Nifti1Image(c["dwi"], None, header=hdr), str(folder / f"{stem}_dwi.nii.gz"))
    save(c["adc"], c["affine"], folder / f"{stem}_adc.nii.gz")


def b_grids_differ(root, sub):
    """DWI cropped to the lesion block, ADC over the whole head (other shape and origin)."""
    c = cropped_case()
    folder, stem = paths(root, sub)
    save(c["dwi"], c["affine"], folder / f"{stem}_dwi.nii.gz")
    save(c["full_adc"], c["full_affine"], folder / f"{stem}_adc.nii.gz")


def b_no_overlap(root, sub):
    c = cropped_case()
    far = c["affine"].copy()
    far[:3, 3] += [0.0, 0.0, 1000.0]  # 1 m above the DWI
    write_pair(root, sub, c["dwi"], c["adc"], c["affine"], adc_affine=far)


def b_oblique(root, sub):
    c = cropped_case()
    aff = rotation(25.0, 15.0) @ c["affine"]
    write_pair(root, sub, c["dwi"], c["adc"], aff)


def b_anisotropic(root, sub):
    c = cropped_case()
    zooms = (0.9, 0.9, 6.0)
    dwi, aff = resample_world(c["dwi"], c["affine"], zooms)
    adc, _ = resample_world(c["adc"], c["affine"], zooms)
    write_pair(root, sub, dwi, adc, aff)


LARGE_FOV_SHAPE = (66, 66, 12)  # 264 x 264 x 48 mm at 4 mm


def b_large_fov(root, sub):
    """Crop (12 slices) padded with zeros to 264 mm in-plane: more than the model's 96x112 patch."""
    case = sample_case()
    region = (slice(20, 52), slice(8, 44), slice(14, 26))
    dwi, aff = crop(case["dwi"], case["affine"], region)
    adc, _ = crop(case["adc"], case["affine"], region)
    pad = [((66 - s) // 2, 66 - s - (66 - s) // 2) for s in dwi.shape[:2]] + [(0, 0)]
    aff2 = aff.copy()
    aff2[:, 3] = aff @ np.array([-pad[0][0], -pad[1][0], 0, 1.0])
    write_pair(root, sub, np.pad(dwi, pad), np.pad(adc, pad), aff2)


def b_bval_short(root, sub):
    _, bvals, bvecs, _, _ = simulate_raw()
    write_raw(root, sub, bvals=bvals[:-1], bvecs=bvecs[:, :-1])


def b_bvec_short(root, sub):
    _, bvals, bvecs, _, _ = simulate_raw()
    write_raw(root, sub, bvecs=bvecs[:, :-1])


def b_no_b1000(root, sub):
    _, bvals, bvecs, _, _ = simulate_raw()
    bvals = np.where(bvals > 0, 3000.0, 0.0)  # b=0 and b=3000 only
    write_raw(root, sub, bvals=bvals)


def b_no_b0(root, sub):
    _, bvals, bvecs, _, _ = simulate_raw()
    write_raw(root, sub, bvals=np.where(bvals > 0, bvals, 1000.0))


def b_bvec_nx3(root, sub):
    _, _, bvecs, _, _ = simulate_raw()
    write_raw(root, sub, bvecs=bvecs.T)  # N x 3: common export, accepted


def b_bval_html(root, sub):
    _, bval, _ = write_raw(root, sub)
    bval.write_text(HTML_PAYLOAD + " 1000 1000\n")


def b_4d_no_bval(root, sub):
    data, _, _, affine, _ = simulate_raw()
    folder, stem = paths(root, sub)
    save(data, affine, folder / f"{stem}_dwi.nii.gz")


def b_broken_symlink(root, sub):
    """A DataLad dataset not fetched: the DWI is a symlink into .git/annex that has no content."""
    dwi, _ = good_pair(root, sub)
    dwi.unlink()
    key = "MD5E-s123456--0123456789abcdef0123456789abcdef.nii.gz"
    target = Path(os.path.relpath(Path(root) / ".git" / "annex" / "objects" / "Xx" / "Yy" / key / key,
                                  dwi.parent))
    dwi.symlink_to(target)


def b_sidecar_bad_json(root, sub):
    dwi, adc = good_pair(root, sub)
    dwi.with_name(dwi.name.replace(".nii.gz", ".json")).write_bytes(b'{"EchoTime": 0.09, \xff\xfe broken')
    adc.with_name(adc.name.replace(".nii.gz", ".json")).write_bytes(b"\x89PNG not json at all")


def b_sidecar_html(root, sub):
    dwi, adc = good_pair(root, sub)
    meta = {"Manufacturer": HTML_PAYLOAD, "InstitutionName": '<img src=x onerror="alert(1)">',
            "DiffusionBValue": 1000}
    dwi.with_name(dwi.name.replace(".nii.gz", ".json")).write_text(json.dumps(meta))


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    name: str  # subject label (alphanumeric)
    build: Callable
    exit_code: int  # BIDS exit code of a run holding only this subject (0: succeeds)
    message: str = ""  # fragment of the one-line error (failures) or of a report warning (successes)
    blame: str = ""  # end of the name of the file the error must name
    what: str = ""  # description for the table

    def describe(self) -> str:
        return f"{self.what or self.name} -> {self.exit_code} -> {self.message!r}"


PARTICIPANT_CASES = [
    # --- failures (66: input missing or unusable), before any inference
    Case("missingadc", b_missing_adc, 66, "missing ADC", "_dwi.nii.gz", "DWI without ADC"),
    Case("adconly", b_adc_only, 66, "missing DWI", "_adc.nii.gz", "ADC without DWI"),
    Case("truncated", b_truncated, 66, "truncated or corrupt image data", "_dwi.nii.gz",
         "truncated .nii.gz (download cut half-way)"),
    Case("notnifti", b_not_nifti, 66, "not a readable NIfTI image", "_dwi.nii.gz", "text file named .nii.gz"),
    Case("emptyfile", b_empty_file, 66, "not a readable NIfTI image", "_dwi.nii.gz", "0-byte .nii.gz"),
    Case("gzipgarbage", b_gzip_of_garbage, 66, "not a readable NIfTI image", "_dwi.nii.gz",
         "gzip of random bytes"),
    Case("nanadc", b_nan_adc, 66, "2 voxels are NaN or infinite", "_adc.nii.gz", "NaN and Inf voxels in the ADC"),
    Case("zerodwi", b_zero_dwi, 66, "image is empty (all voxels are zero)", "_dwi.nii.gz", "all-zero DWI"),
    Case("constadc", b_constant_adc, 66, "image is constant", "_adc.nii.gz", "constant ADC"),
    Case("dwi2d", b_dwi_2d, 66, "is 2-D", "_dwi.nii.gz", "2-D DWI"),
    Case("dwi5d", b_dwi_5d, 66, "5 dimensions", "_dwi.nii.gz", "5-D DWI"),
    Case("adc4d", b_adc_4d, 66, "ADC must be 3-D, got 4-D", "_adc.nii.gz", "4-D ADC (3 volumes)"),
    Case("singular", b_singular_affine, 66, "voxel sizes must be positive", "_dwi.nii.gz",
         "affine with a zero-length axis"),
    Case("zeropixdim", b_zero_pixdim, 66, "in the header and no sform/qform", "_dwi.nii.gz",
         "voxel sizes 0 and no sform/qform"),
    Case("nooverlap", b_no_overlap, 66, "does not overlap the DWI", "_adc.nii.gz",
         "ADC and DWI fields of view 1 m apart"),
    Case("bvalshort", b_bval_short, 66, "the .bval file lists 9 b-values", "_dwi.nii.gz",
         ".bval one value short"),
    Case("bvecshort", b_bvec_short, 66, "b-vectors have shape 3 x 9, expected 3 x 10", "_dwi.bvec",
         ".bvec one column short"),
    Case("nob1000", b_no_b1000, 66, "no diffusion shell between 600 and 1600", "_dwi.bval",
         "no shell near b=1000 (b=0 and 3000 only)"),
    Case("nob0", b_no_b0, 66, "no b=0 volume", "_dwi.bval", "no b=0 volume"),
    Case("bvalhtml", b_bval_html, 66, "not a b-value file", "_dwi.bval", ".bval holding HTML/script text"),
    Case("rawnobval", b_4d_no_bval, 66, "missing b-values", "_dwi.nii.gz", "4-D DWI with 10 volumes, no .bval"),
    Case("brokenlink", b_broken_symlink, 66, "broken symbolic link", "_dwi.nii.gz",
         "DataLad file not fetched (broken symlink)"),
    # --- accepted (0): a mask on the input DWI grid
    Case("gridsdiffer", b_grids_differ, 0, "ADC and DWI grids differ", "", "ADC on another grid: resampled"),
    Case("oblique", b_oblique, 0, "", "", "oblique affines (25 and 15 deg)"),
    Case("aniso", b_anisotropic, 0, "", "", "anisotropic 0.9 x 0.9 x 6 mm"),
    Case("largefov", b_large_fov, 0, "", "", "field of view 264 x 264 mm"),
    Case("bvecnx3", b_bvec_nx3, 0, "Raw DWI with 10 volumes", "", ".bvec stored N x 3"),
    Case("badflair", b_corrupt_flair, 0, "left aside", "", "corrupt FLAIR, not read by the built-in model"),
    Case("badsidecar", b_sidecar_bad_json, 0, "", "", "sidecars not UTF-8 / not JSON"),
    Case("htmlsidecar", b_sidecar_html, 0, "", "", "sidecar values with HTML/script"),
]
GOOD = [Case("goodfull", b_good_full, 0, what="control: whole sample"),
        Case("goodcrop", b_good_crop, 0, what="control: cropped sample")]


def make_matrix_dataset(root, cases=None) -> Path:
    """One dataset with a subject per case (default: every participant case and the controls)."""
    root = write_description(root, "bad-input matrix")
    for case in (PARTICIPANT_CASES + GOOD) if cases is None else cases:
        case.build(root, case.name)
    return root


# ----------------------------------------------------------------------------- weights
def tampered_weights(src_pt, dst_dir) -> Path:
    """A copy of a weights file (+ its JSON sidecar) with one byte flipped: checksum mismatch."""
    src_pt, dst_dir = Path(src_pt), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    data = bytearray(src_pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dst = dst_dir / src_pt.name
    dst.write_bytes(bytes(data))
    side = src_pt.with_suffix(".json")
    dst.with_suffix(".json").write_bytes(side.read_bytes())
    return dst
