"""Small synthetic BIDS datasets built from the real ISLES'22 sample case, for tests.

Every builder writes a valid ``dataset_description.json`` and returns the dataset root. Images are
the sample downsampled by ``step`` (default 2: 56 x 56 x 37 voxels of 4 mm) so that a dataset
builds in well under a second. :func:`sample_case` gives the arrays themselves.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

SAMPLE = Path(__file__).parents[1] / "bids_app/data/demo/isles22-sample"
_CASE = "sub-strokecase0009/ses-0001"
_STEM = "sub-strokecase0009_ses-0001"

# six non-collinear directions whose outer products sum to 2*I: the geometric mean over them is
# the exp(-b * mean diffusivity) of any tensor
SIX_DIRS = np.array([[1, 1, 0], [1, -1, 0], [1, 0, 1], [1, 0, -1], [0, 1, 1], [0, 1, -1]], float) / np.sqrt(2)
THREE_DIRS = np.eye(3)


def _down(img: nib.Nifti1Image, step: int, inplane: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    sx = inplane or step
    steps = (sx, sx, step)
    data = np.asanyarray(img.dataobj, dtype=np.float32)[:: steps[0], :: steps[1], :: steps[2]]
    affine = img.affine.copy()
    affine[:3, :3] = affine[:3, :3] * np.array(steps)[None, :]
    return np.ascontiguousarray(data), affine


@functools.lru_cache(maxsize=4)
def _case(step: int) -> dict:
    dwi_img = nib.load(SAMPLE / _CASE / "dwi" / f"{_STEM}_dwi.nii.gz")
    dwi, affine = _down(dwi_img, step)
    adc, _ = _down(nib.load(SAMPLE / _CASE / "dwi" / f"{_STEM}_adc.nii.gz"), step)
    flair, flair_affine = _down(nib.load(SAMPLE / _CASE / "anat" / f"{_STEM}_FLAIR.nii.gz"), 1, 4 * step)
    mask, _ = _down(nib.load(SAMPLE / "derivatives" / _CASE / f"{_STEM}_msk.nii.gz"), step)
    return {"dwi": dwi, "adc": adc, "flair": flair, "mask": mask > 0.5, "affine": affine,
            "flair_affine": flair_affine, "brain": (adc > 0) | (dwi > 0)}


def sample_case(step: int = 2) -> dict:
    """Arrays of the sample (float32 copies): dwi (trace, b~800), adc (1e-3 mm2/s), flair, mask
    (expert lesion mask), brain (non-zero voxels), affine (DWI grid), flair_affine."""
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in _case(step).items()}


def write_description(root, name: str = "synthetic test dataset", version: str = "1.10.0") -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    desc = {"Name": name, "BIDSVersion": version, "DatasetType": "raw"}
    (root / "dataset_description.json").write_text(json.dumps(desc, indent=2) + "\n")
    return root


def save(data, affine, path, dtype=np.float32) -> Path:
    """Write ``data`` as NIfTI at ``path`` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _prefix(root: Path, sub: str, ses: str | None, datatype: str) -> tuple[Path, str]:
    sub = sub.removeprefix("sub-")
    folder = root / f"sub-{sub}"
    stem = f"sub-{sub}"
    if ses:
        ses = ses.removeprefix("ses-")
        folder, stem = folder / f"ses-{ses}", f"{stem}_ses-{ses}"
    return folder / datatype, stem


def _sessions(sessions) -> list[str | None]:
    if sessions is True:
        return ["0001"]
    if not sessions:
        return [None]
    return [sessions] if isinstance(sessions, str) else list(sessions)


def _sidecar(path: Path, **meta) -> None:
    name = path.name.replace(".nii.gz", ".json").replace(".nii", ".json")
    (path.parent / name).write_text(json.dumps(meta) + "\n")


def make_isles22(root, subjects=("01",), sessions=True, flair=False, step: int = 2) -> Path:
    """ISLES'22 layout: 3-D trace ``*_dwi.nii.gz`` + ``*_adc.nii.gz`` (1e-3 mm2/s), optional FLAIR."""
    root = write_description(root, "synthetic ISLES'22-style dataset")
    case = _case(step)
    for sub in subjects:
        for ses in _sessions(sessions):
            folder, stem = _prefix(root, sub, ses, "dwi")
            dwi = save(case["dwi"], case["affine"], folder / f"{stem}_dwi.nii.gz")
            _sidecar(dwi, DiffusionBValue=800.0)
            save(case["adc"], case["affine"], folder / f"{stem}_adc.nii.gz")
            if flair:
                afolder, _ = _prefix(root, sub, ses, "anat")
                save(case["flair"], case["flair_affine"], afolder / f"{stem}_FLAIR.nii.gz")
    return root


def make_bids_trace(root, subjects=("01",), sessions=True, flair=True, adc_scale=1e3, step: int = 2) -> Path:
    """BIDS 1.11 layout: ``*_trace.nii.gz`` + ``*_ADC.nii.gz`` (ADC = sample * ``adc_scale``, i.e. in
    1e-6 mm2/s by default), optional FLAIR."""
    root = write_description(root, "synthetic BIDS 1.11 trace/ADC dataset", "1.11.0")
    case = _case(step)
    for sub in subjects:
        for ses in _sessions(sessions):
            folder, stem = _prefix(root, sub, ses, "dwi")
            save(case["dwi"], case["affine"], folder / f"{stem}_trace.nii.gz")
            save(case["adc"] * adc_scale, case["affine"], folder / f"{stem}_ADC.nii.gz")
            if flair:
                afolder, _ = _prefix(root, sub, ses, "anat")
                save(case["flair"], case["flair_affine"], afolder / f"{stem}_FLAIR.nii.gz")
    return root


def make_rec_trace(root, subjects=("01",), sessions=True, flair=False, adc_scale=1e3, step: int = 2,
                   trace_label: str = "TRACE") -> Path:
    """dcm2niix-style names, as in OpenNeuro ds004889 (SOOP): ``*_rec-TRACE_dwi.nii.gz`` and
    ``*_rec-ADC_dwi.nii.gz`` (ADC in 1e-6 mm2/s by default), both 4-D with one volume as SOOP stores them."""
    root = write_description(root, "synthetic rec-TRACE/rec-ADC dataset", "1.8.0")
    case = _case(step)
    for sub in subjects:
        for ses in _sessions(sessions):
            folder, stem = _prefix(root, sub, ses, "dwi")
            dwi = save(case["dwi"][..., None], case["affine"], folder / f"{stem}_rec-{trace_label}_dwi.nii.gz")
            _sidecar(dwi, ImageType=["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"])
            save(case["adc"][..., None] * adc_scale, case["affine"], folder / f"{stem}_rec-ADC_dwi.nii.gz")
            if flair:
                afolder, _ = _prefix(root, sub, ses, "anat")
                save(case["flair"], case["flair_affine"], afolder / f"{stem}_FLAIR.nii.gz")
    return root


def simulate_raw(b_values=(1000, 2000), step: int = 2, seed: int = 0, skull: bool = True):
    """A raw 4-D DWI from the sample: returns ``(data4d, bvals, bvecs 3xN, affine, adc_true)``.

    ADC ``adc_true`` (1e-3 mm2/s) is the sample's, clipped to [0.05, 4]; S0 = trace * exp(b ADC),
    scaled to a median of 1000 in the brain. One b=0, six directions at b=1000, three at other
    b-values; Rician-like noise in the background and a bright ring of "skull" around the brain.
    """
    out = _simulate(tuple(float(b) for b in b_values), step, seed, skull)
    return tuple(v.copy() if isinstance(v, np.ndarray) else v for v in out)


@functools.lru_cache(maxsize=8)
def _simulate(b_values, step, seed, skull):
    case = _case(step)
    rng = np.random.default_rng(seed)
    brain = case["brain"]
    adc = np.where(brain, np.clip(case["adc"], 0.05, 4.0), 0.0).astype(np.float64)
    s0 = np.where(brain, np.maximum(case["dwi"], 1.0) * np.exp(0.8 * adc), 0.0)
    s0 *= 1000.0 / np.median(s0[brain])
    s0 = np.clip(s0, 0, 10000)
    bvals, dirs = [0.0], [np.zeros(3)]
    for b in b_values:
        vecs = SIX_DIRS if b == 1000 else THREE_DIRS
        bvals += [float(b)] * len(vecs)
        dirs += list(vecs)
    bvals = np.array(bvals)
    bvecs = np.array(dirs).T
    data = s0[..., None] * np.exp(-bvals[None, None, None, :] * adc[..., None] * 1e-3)
    if skull:
        outer = ndimage.binary_dilation(brain, iterations=3) & ~ndimage.binary_dilation(brain, iterations=1)
        data[outer] = 1500.0 * np.exp(-bvals * 0.2e-3)  # fat/bone marrow: bright, low diffusion
    sigma = 20.0
    noise = rng.normal(0, sigma, data.shape) + 1j * rng.normal(0, sigma, data.shape)
    data = np.abs(data + noise).astype(np.float32)
    return data, bvals, bvecs, case["affine"], adc.astype(np.float32)


def make_raw_dwi(root, subjects=("01",), sessions=True, b_values=(1000, 2000), flair=False,
                 step: int = 2) -> Path:
    """OpenNeuro-style raw layout: 4-D ``*_dwi.nii.gz`` + ``.bval`` + ``.bvec`` (see :func:`simulate_raw`)."""
    root = write_description(root, "synthetic raw DWI dataset")
    data, bvals, bvecs, affine, _ = simulate_raw(b_values, step)
    for sub in subjects:
        for ses in _sessions(sessions):
            folder, stem = _prefix(root, sub, ses, "dwi")
            dwi = save(data, affine, folder / f"{stem}_dwi.nii.gz")
            _sidecar(dwi, PhaseEncodingDirection="j-", TotalReadoutTime=0.05)
            write_bval_bvec(folder / f"{stem}_dwi", bvals, bvecs)
            if flair:
                afolder, _ = _prefix(root, sub, ses, "anat")
                save(_case(step)["flair"], _case(step)["flair_affine"], afolder / f"{stem}_FLAIR.nii.gz")
    return root


def write_bval_bvec(stem, bvals, bvecs) -> tuple[Path, Path]:
    """Write ``<stem>.bval`` (one line) and ``<stem>.bvec`` (as given: 3 x N or N x 3)."""
    stem = Path(stem)
    bval, bvec = stem.with_name(stem.name + ".bval"), stem.with_name(stem.name + ".bvec")
    bval.write_text(" ".join(f"{b:g}" for b in np.ravel(bvals)) + "\n")
    bvec.write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in np.atleast_2d(bvecs)) + "\n")
    return bval, bvec


def tissue_arrays(shape, background_prob: float):
    """Arrays for the post-processing tests: probability ``background_prob`` everywhere, trace 100 and ADC
    0.8 (normal tissue), the brain all but a one-voxel border; ``put(slices, prob, trace, adc)`` paints a
    region. Returns ``(prob, trace, adc, brain, put)``."""
    prob = np.full(shape, background_prob, np.float32)
    trace = np.full(shape, 100.0)
    adc = np.full(shape, 0.8)
    brain = np.zeros(shape, bool)
    brain[1:-1, 1:-1, 1:-1] = True

    def put(sl, p, t, a):
        prob[sl], trace[sl], adc[sl] = p, t, a

    return prob, trace, adc, brain, put
