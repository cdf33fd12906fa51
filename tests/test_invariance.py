"""Invariance and determinism of the participant pipeline, node by node (no nipype engine, no CLI).

The steps of one session (load -> diffusion -> adc_units -> conform -> skullstrip -> normalize ->
segment with the shipped built-in weights) run on the real ISLES'22 sample case. Every comparison is
made in world space: outputs of a re-stored scan are mapped back onto the reference grid first.

- The same scan stored in another voxel order (LAS, RAS, LPS, permuted axes; the sample's grid is
  itself ~12 deg oblique) gives *bit-identical* masks, probabilities, brain masks and ADC, at 2 mm
  (model grid reached by axis permutation) and 4 mm (model grid reached by resampling), and also for
  a head with skull at 1 mm with odd matrix sizes (brain extraction on a coarser working grid).
- The same world content resampled onto an oblique grid (90-deg axis permutation + small rotation)
  gives the same lesion within interpolation tolerance (Dice with a one-voxel tolerance, plain Dice,
  the largest lesion found in place), and close probabilities.
- ADC stored in mm2/s, 1e-3 mm2/s or 1e-6 mm2/s gives the same mask and probabilities.

Whole-run determinism (two CLI runs, ``--nprocs 1`` vs ``2``, resume after SIGKILL) is in
``tests/test_resume.py``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import nibabel.orientations as nio
import numpy as np
import pytest
from scipy import ndimage as ndi

from models.builtin import predictor as bp
from nodes.adc_units import HarmoniseADCUnits
from nodes.conform import ConformADC, resample_to, world_bbox
from nodes.diffusion import ComputeTraceADC
from nodes.load import LoadInputs
from nodes.normalize import NormalizeIntensity
from nodes.segment import SegmentLesions
from nodes.skullstrip import BrainExtraction, synthetic_head
from tests.datasets import sample_case, save

pytestmark = pytest.mark.skipif(not bp.DEFAULT_WEIGHTS.is_file(), reason="built-in weights not present")

OUTPUTS = ("prob", "mask", "brain", "adc", "trace")


@contextmanager
def _chdir(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_chain(dwi_file, adc_file, work: Path) -> dict[str, Path]:
    """The per-session steps of the workflow, in order, each in its own folder (as nipype does)."""
    work = Path(work)

    def step(interface, name):
        cwd = work / name
        cwd.mkdir(parents=True, exist_ok=True)
        with _chdir(cwd):
            return interface.run(cwd=str(cwd)).outputs

    load = step(LoadInputs(dwi_file=str(dwi_file), adc_file=str(adc_file)), "load")
    diff = step(ComputeTraceADC(dwi_file=load.dwi_file, adc_file=load.adc_file), "diffusion")
    units = step(HarmoniseADCUnits(adc_file=diff.adc_file), "adc_units")
    conf = step(ConformADC(dwi_file=diff.trace_file, adc_file=units.adc_file), "conform")
    brain = step(BrainExtraction(trace_file=diff.trace_file, adc_file=conf.adc_file), "skullstrip")
    norm = step(NormalizeIntensity(trace_file=brain.trace_file, adc_file=brain.adc_file,
                                   mask_file=brain.mask_file), "normalize")
    seg = step(SegmentLesions(dwi_norm_file=norm.dwi_norm_file, adc_norm_file=norm.adc_norm_file,
                              trace_file=brain.trace_file, adc_file=brain.adc_file,
                              brain_mask_file=brain.mask_file, device="cpu", num_threads=2, seed=0),
               "segment")
    return {"prob": Path(seg.prob_file), "mask": Path(seg.mask_file), "brain": Path(brain.mask_file),
            "adc": Path(brain.adc_file), "trace": Path(brain.trace_file)}


def _arrays(files: dict) -> dict[str, np.ndarray]:
    return {k: np.asanyarray(nib.load(str(v)).dataobj) for k, v in files.items()}


def reorient(data, affine, codes):
    """``data`` stored in voxel order ``codes``: (array, affine), same world coordinates."""
    ornt = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(codes)))
    return np.ascontiguousarray(nio.apply_orientation(data, ornt)), affine @ nio.inv_ornt_aff(ornt, data.shape)


def back_to(arr, affine_from, affine_to):
    """Voxel order of ``affine_from`` -> voxel order of ``affine_to`` (pure permutation/flip)."""
    ornt = nio.ornt_transform(nio.io_orientation(affine_from), nio.io_orientation(affine_to))
    return np.ascontiguousarray(nio.apply_orientation(arr, ornt))


def dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    s = int(a.sum() + b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def tolerant_dice(a, b, tol_vox: int = 1) -> float:
    """Dice where a voxel agrees when the other mask has a voxel within ``tol_vox`` (26-neighbours)."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    s = int(a.sum() + b.sum())
    if s == 0:
        return 1.0
    st = np.ones((3, 3, 3), bool)
    da = ndi.binary_dilation(a, st, iterations=tol_vox)
    db = ndi.binary_dilation(b, st, iterations=tol_vox)
    return (int((a & db).sum()) + int((b & da).sum())) / s


_REFS: dict = {}


def _write_case(folder: Path, dwi, adc, affine) -> tuple[Path, Path]:
    return save(dwi, affine, folder / "dwi.nii.gz"), save(adc, affine, folder / "adc.nii.gz")


def _head_case():
    """A head with skull at 1 mm voxels and odd matrix sizes (the 2 mm sample relabelled, cropped)."""
    c = sample_case(1)
    dwi, adc = c["dwi"][:111, :109, :71], c["adc"][:111, :109, :71]
    affine = c["affine"].copy()
    affine[:3, :3] = affine[:3, :3] / 2.0  # 1 mm voxels: brain extraction works on 2x2x2 blocks
    head = synthetic_head(dwi, (1.0, 1.0, 1.0), seed=3)
    return {"dwi": head, "adc": adc, "affine": affine}


def _case(kind: str) -> dict:
    """The sample at 2 or 4 mm, cropped to its non-zero box plus a margin (fewer model windows)."""
    if kind == "head1mm":
        return _head_case()
    c = sample_case({"2mm": 1, "4mm": 2}[kind])
    nz = np.argwhere((c["dwi"] != 0) | (c["adc"] != 0))
    lo = np.maximum(nz.min(0) - 3, 0)
    hi = np.minimum(nz.max(0) + 4, c["dwi"].shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    shift = np.eye(4)
    shift[:3, 3] = lo
    return {"dwi": c["dwi"][box].copy(), "adc": c["adc"][box].copy(), "affine": c["affine"] @ shift}


def _reference(kind: str, tmp_path_factory) -> dict:
    if kind not in _REFS:
        c = _case(kind)
        folder = tmp_path_factory.mktemp(f"ref-{kind}")
        dwi, adc = _write_case(folder, c["dwi"], c["adc"], c["affine"])
        files = run_chain(dwi, adc, folder / "work")
        _REFS[kind] = {"files": files, "arrays": _arrays(files), "affine": c["affine"], "case": c}
    return _REFS[kind]


@pytest.mark.parametrize("kind,codes", [
    ("2mm", "RAS"), ("2mm", "LPS"), ("2mm", "ASL"),  # model grid by axis permutation (2 mm voxels)
    ("4mm", "PIR"),                                  # model grid by resampling (4 mm voxels)
    ("head1mm", "RAS"), ("head1mm", "PSL"),          # skull present: median_otsu on 2 mm blocks
])
def test_storage_order_gives_identical_outputs(kind, codes, tmp_path, tmp_path_factory):
    """LAS (the sample's order) vs ``codes``: every output identical voxel for voxel in world space."""
    ref = _reference(kind, tmp_path_factory)
    c = ref["case"]
    dwi, affine = reorient(c["dwi"], c["affine"], codes)
    adc, _ = reorient(c["adc"], c["affine"], codes)
    assert "".join(nib.aff2axcodes(affine)) == codes
    for lo_hi_new, lo_hi_ref in zip(world_bbox(dwi.shape, affine), world_bbox(c["dwi"].shape, c["affine"])):
        assert np.allclose(lo_hi_new, lo_hi_ref, atol=1e-6)  # same field of view in world space
    files = run_chain(*_write_case(tmp_path, dwi, adc, affine), tmp_path / "work")
    got = {k: back_to(v, affine, c["affine"]) for k, v in _arrays(files).items()}
    for key in OUTPUTS:
        assert got[key].shape == ref["arrays"][key].shape
        diff = int(np.count_nonzero(got[key] != ref["arrays"][key]))
        assert diff == 0, f"{key}: {diff} voxels differ between LAS and {codes} storage ({kind})"
    if kind == "head1mm":  # the brain was really extracted (not the skull-stripped shortcut)
        assert 0 < ref["arrays"]["brain"].mean() < 0.5


def _rotation(deg_xyz) -> np.ndarray:
    rx, ry, rz = np.radians(deg_xyz)
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return z @ y @ x


def test_oblique_grid_gives_the_same_lesion(tmp_path, tmp_path_factory):
    """Same world content on another grid: axes permuted (exact) and rotated by 6/-4/8 deg about the
    brain centre (the images are resampled trilinearly onto it). Mapped back, lesion and brain agree
    within interpolation tolerance."""
    ref = _reference("2mm", tmp_path_factory)
    c = ref["case"]
    _, perm_affine = reorient(c["dwi"], c["affine"], "PIR")
    shape = reorient(c["dwi"], c["affine"], "PIR")[0].shape
    brain = ref["arrays"]["brain"] > 0
    centre = nib.affines.apply_affine(c["affine"], np.argwhere(brain).mean(0))
    rot = np.eye(4)
    rot[:3, :3] = _rotation((6.0, -4.0, 8.0))
    shift = np.eye(4)
    shift[:3, 3] = centre
    oblique = shift @ rot @ np.linalg.inv(shift) @ perm_affine
    dwi, _ = resample_to(c["dwi"], c["affine"], shape, oblique, order=1)
    adc, _ = resample_to(c["adc"], c["affine"], shape, oblique, order=1)
    files = run_chain(*_write_case(tmp_path, dwi, adc, oblique), tmp_path / "work")
    got = _arrays(files)
    ref_shape = c["dwi"].shape
    mask = resample_to(got["mask"].astype(np.float32), oblique, ref_shape, c["affine"], order=0)[0] > 0.5
    brain_back = resample_to(got["brain"].astype(np.float32), oblique, ref_shape, c["affine"], order=0)[0] > 0.5
    prob = resample_to(got["prob"], oblique, ref_shape, c["affine"], order=1)[0]
    region = brain | brain_back  # lesions are judged inside the brain (either extraction)
    mask &= region
    ref_mask = (ref["arrays"]["mask"] > 0) & region

    assert dice(brain_back, brain) >= 0.95
    # The images themselves were interpolated, so this measures the model's robustness, not an
    # exact invariance; with the shipped weights (many small, unstable false-positive components)
    # we measured plain Dice 0.55, Dice with one-voxel tolerance 0.90 and 285 lesion voxels instead
    # of 196 (smoother inputs; an earlier model: 0.56 / 0.87). Plain Dice >= 0.95 is out of
    # reach for any model here: the reference probability map alone, resampled onto this grid and
    # back without a model, keeps a Dice of only ~0.85. The bounds guard against gross errors
    # (wrong axes, flips, shifts), which give Dice ~0.
    tol = tolerant_dice(mask, ref_mask)
    assert tol >= 0.8, (dice(mask, ref_mask), tol)
    assert dice(mask, ref_mask) >= 0.45
    if ref_mask.any():  # the largest reference lesion is found at its place (a shift or flip misses it)
        lab, _ = ndi.label(ref_mask, np.ones((3, 3, 3), bool))
        largest = lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1
        assert (mask & largest).sum() >= 0.5 * largest.sum(), (int((mask & largest).sum()), int(largest.sum()))
    inner = ndi.binary_erosion(brain, iterations=2)  # away from the resampled brain edge
    err = np.abs(prob[inner] - ref["arrays"]["prob"][inner])
    assert float(np.mean(err)) <= 0.02, float(np.mean(err))


@pytest.mark.parametrize("kind", ["2mm", "4mm"])
def test_rotated_affine_rotates_the_lesion_with_the_head(kind, tmp_path, tmp_path_factory):
    """An oblique affine: voxel axes permuted/flipped (exact 90-degree permutation) and the affine
    rotated by 5 deg (the whole scan rotated in world space). The lesion rotates with the head: the
    outputs, brought back to the original voxel order, stay the same. Exact at 2 mm (the model grid
    is an axis permutation); at 4 mm the predictor resamples onto an axis-aligned 2 mm grid, so the
    rotation is handled by resampling: Dice with one-voxel tolerance >= 0.75 (measured 0.81 on a
    19-voxel mask at 4 mm with the shipped weights; an earlier model gave 0.98 on a larger mask)."""
    ref = _reference(kind, tmp_path_factory)
    c = ref["case"]
    rot = np.eye(4)
    rot[:3, :3] = _rotation((0.0, 3.0, 4.0))
    dwi, perm_affine = reorient(c["dwi"], c["affine"], "PIR")  # exact 90-degree permutation + flips
    adc, _ = reorient(c["adc"], c["affine"], "PIR")
    affine = rot @ perm_affine
    files = run_chain(*_write_case(tmp_path, dwi, adc, affine), tmp_path / "work")
    got = {k: back_to(v, perm_affine, c["affine"]) for k, v in _arrays(files).items()}
    if kind == "2mm":
        for key in OUTPUTS:
            assert np.array_equal(got[key], ref["arrays"][key]), key
    else:
        for key in ("brain", "adc", "trace"):  # before the model: no resampling at all
            assert np.array_equal(got[key], ref["arrays"][key]), key
        brain = ref["arrays"]["brain"] > 0
        assert tolerant_dice((got["mask"] > 0) & brain, (ref["arrays"]["mask"] > 0) & brain) >= 0.75
        err = np.abs(got["prob"][brain] - ref["arrays"]["prob"][brain])
        assert float(np.mean(err)) <= 0.02


@pytest.mark.parametrize("unit,scale", [("mm2/s", 1e-3), ("1e-6 mm2/s", 1e3)])
def test_adc_unit_does_not_change_the_result(unit, scale, tmp_path, tmp_path_factory):
    """The sample's ADC (1e-3 mm2/s) stored in another unit: same mask, same probabilities."""
    ref = _reference("2mm", tmp_path_factory)
    c = ref["case"]
    adc = (c["adc"].astype(np.float64) * scale).astype(np.float32)
    files = run_chain(*_write_case(tmp_path, c["dwi"], adc, c["affine"]), tmp_path / "work")
    got = _arrays(files)
    decided = (tmp_path / "work" / "adc_units")
    assert decided.is_dir()
    assert np.array_equal(got["mask"], ref["arrays"]["mask"])
    assert np.array_equal(got["brain"], ref["arrays"]["brain"])
    assert np.allclose(got["adc"], ref["arrays"]["adc"], rtol=1e-6, atol=1e-7)
    assert np.allclose(got["prob"], ref["arrays"]["prob"], rtol=0, atol=1e-5)


def test_zero_padding_around_the_scan_does_not_change_the_probability():
    """More background around the same brain (a larger field of view) gives bit-identical probabilities:
    the model sees the brain's box plus a fixed margin (``BRAIN_MARGIN_VOX``), not the whole grid."""
    c = sample_case(1)
    d, a = bp.normalize_images(nib.Nifti1Image(c["dwi"], c["affine"]), nib.Nifti1Image(c["adc"], c["affine"]),
                               c["dwi"] > 0)
    ref = bp.BuiltinPredictor()
    whole = bp.BuiltinPredictor(brain_margin=None)  # every window of the whole grid: background matters
    p0 = ref.predict(d, a)
    for pad in ((10, 10), (0, 21), (17, 3)):
        shift = np.eye(4)
        shift[:3, 3] = -pad[0]
        dp, ap = (nib.Nifti1Image(np.pad(np.asarray(i.dataobj), [pad] * 3), i.affine @ shift) for i in (d, a))
        inner = tuple(slice(pad[0], pad[0] + n) for n in p0.shape)
        p = ref.predict(dp, ap)
        assert np.array_equal(p[inner], p0), pad
        assert not np.any(p[np.pad(np.zeros(p0.shape, bool), [pad] * 3, constant_values=True)] >= 0.5)
        if pad == (10, 10):
            assert np.abs(whole.predict(dp, ap)[inner] - whole.predict(d, a)).max() > 0.3
