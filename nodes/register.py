"""Step 'register': FLAIR onto the DWI grid with SimpleITK (what the FLAIR members need).

- ``rigid``: Euler 3-D, Mattes mutual information (32 bins, random sampling with a fixed seed),
  centred initialisation (the better, by the metric, of the header alignment and a moments
  alignment), three resolutions (shrink 4/2/1), regular-step gradient descent; final linear
  resampling.
- ``nonrigid``: the rigid result, then affine (two resolutions), then a cubic B-spline with an
  8x8x8 control mesh over the DWI domain (L-BFGS-B, 10 iterations, shrink 4 and 2), like the
  official elastix translation -> affine -> B-spline chain of FACTORIZER; a stage that does not
  lower the full-resolution metric is reset (never worse than rigid); final cubic B-spline resampling.

Fixed image = DWI (its grid is the output grid), moving image = FLAIR; the brain mask (DWI grid),
when given, restricts the metric to the brain. Output: float32 FLAIR on the DWI grid with
background 0 (outside the FLAIR field of view), and the transform (``.tfm`` for rigid, ``.h5``
composite affine + B-spline for nonrigid) that maps DWI-space points into FLAIR space (ITK
convention, LPS physical coordinates).

Images are handed to SimpleITK from nibabel's affine (RAS -> LPS), so the output grid is exactly
the DWI grid as every other node sees it, whatever the qform/sform codes.

Determinism: the metric sampling seed is fixed and registration runs on ``num_threads`` threads
(default 1). ITK's Mattes metric sums per-thread partial histograms, so results depend on the
thread count; with a fixed count they are bitwise repeatable (checked by ``tests/test_register.py``).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
from nipype.interfaces.base import File, isdefined, traits

from bids_app.errors import InputError
from nodes.base import DecisionInputSpec, DecisionInterface, DecisionOutputSpec, load_nifti, new_image, save_nifti_atomic

HIST_BINS = 32
SAMPLING = 0.1
MESH_SIZE = (8, 8, 8)
MIN_OVERLAP = 0.05  # fraction of DWI voxels (foreground) inside the FLAIR field of view
_LPS = np.diag([-1.0, -1.0, 1.0])


# ----------------------------------------------------------------------------- nibabel <-> SimpleITK
def nib_to_sitk(data: np.ndarray, affine: np.ndarray):
    """A SimpleITK float32 image of ``data`` (x, y, z) with the geometry of the nibabel ``affine``."""
    import SimpleITK as sitk

    data = np.asarray(data, dtype=np.float32)
    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    m = _LPS @ np.asarray(affine, float)[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    direction = m / spacing
    u, _, vt = np.linalg.svd(direction)  # nearest orthonormal matrix (drops any shear)
    direction = u @ vt
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in direction.ravel()])
    img.SetOrigin([float(v) for v in _LPS @ np.asarray(affine, float)[:3, 3]])
    return img


def sitk_to_array(img) -> np.ndarray:
    import SimpleITK as sitk

    return np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(2, 1, 0))


def _load3d(path) -> tuple:
    img, data = load_nifti(path)
    data = np.squeeze(data) if data.ndim > 3 else data
    if data.ndim != 3:
        raise InputError(path, f"expected a 3-D image, got shape {data.shape}")
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    return img, data.astype(np.float32)


def overlap_fraction(fixed_data: np.ndarray, fixed_affine, moving_shape, moving_affine) -> float:
    """Fraction of the fixed image's foreground voxels (all if none) inside the moving field of view."""
    fg = fixed_data > 0
    idx = np.argwhere(fg) if fg.any() else np.argwhere(np.ones(fixed_data.shape, bool))
    if idx.shape[0] > 200_000:
        idx = idx[:: idx.shape[0] // 200_000 + 1]
    world = np.asarray(fixed_affine, float) @ np.c_[idx, np.ones(len(idx))].T
    vox = np.linalg.inv(np.asarray(moving_affine, float)) @ world
    inside = np.all((vox[:3] >= -0.5) & (vox[:3] <= np.asarray(moving_shape)[:, None] - 0.5), axis=0)
    return float(inside.mean())


# ----------------------------------------------------------------------------- registration
def _method(num_threads: int, seed: int, mask, shrink, sigmas, sampling: float = SAMPLING):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(int(num_threads))
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HIST_BINS)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(float(sampling), int(seed))
    if mask is not None:
        reg.SetMetricFixedMask(mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(sigmas))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


def metric_value(fixed, moving, transform, mask=None, seed: int = 42, num_threads: int = 1) -> float:
    """Mattes MI (negative: lower is better) of ``transform`` at full resolution, same sampling."""
    import SimpleITK as sitk

    reg = _method(num_threads, seed, mask, [1], [0])
    reg.SetInitialTransform(sitk.CompositeTransform(transform) if not isinstance(transform, sitk.CompositeTransform)
                            else transform, inPlace=False)
    return float(reg.MetricEvaluate(fixed, moving))


def register_images(fixed, moving, mode: str = "rigid", mask=None, seed: int = 42, num_threads: int = 1,
                    rigid_iterations: int = 200, affine_iterations: int = 100, bspline_iterations: int = 10,
                    mesh_size=MESH_SIZE):
    """Register ``moving`` to ``fixed``; returns (transform, info dict)."""
    import SimpleITK as sitk

    if mode not in ("rigid", "nonrigid"):
        raise ValueError(f"mode must be 'rigid' or 'nonrigid', got {mode!r}")
    info: dict = {"mode": mode, "seed": int(seed), "threads": int(num_threads), "stages": {}}

    # centred initialisation: rotation centre at the DWI centre; header alignment vs moments alignment
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in fixed.GetSize()])
    header = sitk.Euler3DTransform()
    header.SetCenter(centre)
    candidates = {"header": header}
    try:
        candidates["moments"] = sitk.Euler3DTransform(sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS))
    except RuntimeError:  # e.g. an all-zero image: keep the header alignment
        pass
    scores = {}
    for name, tx in candidates.items():
        try:
            scores[name] = metric_value(fixed, moving, tx, mask, seed, num_threads)
        except RuntimeError:
            scores[name] = np.inf
    init_name = min(scores, key=scores.get)
    if not np.isfinite(scores[init_name]):
        raise RuntimeError("no initial alignment puts the FLAIR over the DWI")
    info["init"] = init_name
    info["init_metrics"] = {k: round(v, 6) for k, v in scores.items()}
    info["metric_initial"] = float(scores["header"])

    def run(reg, stage):
        t0 = time.perf_counter()
        reg.Execute(fixed, moving)
        info["stages"][stage] = {"iterations": int(reg.GetOptimizerIteration()),
                                 "metric": float(reg.GetMetricValue()),
                                 "stop": reg.GetOptimizerStopConditionDescription(),
                                 "seconds": round(time.perf_counter() - t0, 2)}

    rigid = sitk.Euler3DTransform(candidates[init_name])
    reg = _method(num_threads, seed, mask, [4, 2, 1], [2, 1, 0])
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=rigid_iterations,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(rigid, inPlace=True)
    run(reg, "rigid")
    if mode == "rigid":
        final = rigid
    else:
        # each stage is kept only if it improves the full-resolution metric of the previous one
        best = metric_value(fixed, moving, rigid, mask, seed, num_threads)
        affine = sitk.AffineTransform(3)
        affine.SetCenter(rigid.GetCenter())
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        reg = _method(num_threads, seed, mask, [2, 1], [1, 0])
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=0.5, minStep=1e-3,
                                                     numberOfIterations=affine_iterations,
                                                     relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetInitialTransform(affine, inPlace=True)
        run(reg, "affine")
        value = metric_value(fixed, moving, affine, mask, seed, num_threads)
        info["stages"]["affine"]["kept"] = bool(value < best)
        if value < best:
            best = value
        else:
            affine.SetMatrix(rigid.GetMatrix())
            affine.SetTranslation(rigid.GetTranslation())
        # B-spline on the coarse levels only (shrink 4, 2): its cost per sample is 64 control points
        bspline = sitk.BSplineTransformInitializer(fixed, [int(m) for m in mesh_size], 3)
        reg = _method(num_threads, seed, mask, [4, 2], [2, 1])
        reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=bspline_iterations,
                                 maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=2 * bspline_iterations,
                                 costFunctionConvergenceFactor=1e7)
        reg.SetMovingInitialTransform(affine)
        reg.SetInitialTransform(bspline, inPlace=True)
        run(reg, "bspline")
        final = sitk.CompositeTransform([affine, bspline])  # applied last-first: B-spline, then affine
        value = metric_value(fixed, moving, final, mask, seed, num_threads)
        info["stages"]["bspline"]["kept"] = bool(value < best)
        if value >= best:
            bspline.SetParameters([0.0] * bspline.GetNumberOfParameters())
            final = sitk.CompositeTransform([affine, bspline])
    info["metric_final"] = metric_value(fixed, moving, final, mask, seed, num_threads)
    return final, info


def _write_transform(transform, path: Path) -> Path:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteTransform(transform, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def register_flair(flair_file, dwi_file, brain_mask_file=None, mode: str = "nonrigid", out_dir=".",
                   seed: int = 42, num_threads: int = 1, **kwargs) -> dict:
    """Register a FLAIR file to a DWI file; write ``flair_dwi.nii.gz`` and the transform into ``out_dir``.

    Returns a dict with ``flair_file``, ``transform_file``, ``metric_initial``, ``metric_final``,
    ``seconds``, ``overlap``, ``init``, ``stages``, ``threads``. Raises :class:`InputError` when the
    FLAIR does not overlap the DWI (header geometry) or the registration loses all overlap.
    """
    import SimpleITK as sitk

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    fimg, flair = _load3d(flair_file)
    dimg, dwi = _load3d(dwi_file)
    overlap = overlap_fraction(dwi, dimg.affine, flair.shape, fimg.affine)
    if overlap < MIN_OVERLAP:
        raise InputError(flair_file, f"does not overlap the DWI {Path(dwi_file).name} (only {100 * overlap:.1f} % "
                                     "of the DWI brain lies in the FLAIR field of view according to the headers): "
                                     "not the same session or wrong header geometry")
    if not (flair > 0).any():
        raise InputError(flair_file, "FLAIR has no positive voxel; nothing to register")
    fixed, moving = nib_to_sitk(dwi, dimg.affine), nib_to_sitk(flair, fimg.affine)
    mask = None
    if brain_mask_file:
        mimg, mdata = _load3d(brain_mask_file)
        if mdata.shape != dwi.shape:
            raise InputError(brain_mask_file, f"brain mask shape {mdata.shape} differs from the DWI {dwi.shape}")
        if (mdata > 0).sum() >= 100:
            mask = sitk.Cast(nib_to_sitk((mdata > 0).astype(np.float32), dimg.affine), sitk.sitkUInt8)
    threads_before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:  # the metric's threader follows the global default, not only the method's own setting
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(num_threads))
        transform, info = register_images(fixed, moving, mode, mask, seed, num_threads, **kwargs)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputError(flair_file, f"registration to the DWI failed ({first}); does the FLAIR overlap the DWI?") \
            from None
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads_before)
    interp = sitk.sitkBSpline if mode == "nonrigid" else sitk.sitkLinear
    resampled = sitk.Resample(moving, fixed, transform, interp, 0.0, sitk.sitkFloat32)
    data = sitk_to_array(resampled).astype(np.float32)
    flair_out = save_nifti_atomic(new_image(data, dimg, dtype=np.float32), out_dir / "flair_dwi.nii.gz")
    tfm = _write_transform(transform, out_dir / ("flair_to_dwi.tfm" if mode == "rigid" else "flair_to_dwi.h5"))
    info.update(flair_file=str(flair_out), transform_file=str(tfm), overlap=round(overlap, 4),
                masked=mask is not None, seconds=round(time.perf_counter() - t0, 2))
    if mode == "rigid":
        info["rotation_deg"] = round(float(np.degrees(np.arccos(np.clip((np.trace(
            np.reshape(transform.GetMatrix(), (3, 3))) - 1) / 2, -1, 1)))), 3)
        info["translation_mm"] = [round(float(t), 3) for t in transform.GetTranslation()]
    return info


# ----------------------------------------------------------------------------- interface
class RegisterFlairInputSpec(DecisionInputSpec):
    flair_file = File(exists=True, mandatory=True, desc="FLAIR in its own space")
    dwi_file = File(exists=True, mandatory=True, desc="DWI (trace): the reference grid")
    brain_mask_file = File(exists=True, desc="brain mask on the DWI grid (optional): metric region")
    mode = traits.Enum("nonrigid", "rigid", usedefault=True,
                       desc="'rigid' (Euler) or 'nonrigid' (rigid, affine, B-spline; official FACTORIZER)")
    seed = traits.Int(42, usedefault=True, desc="metric sampling seed")
    num_threads = traits.Int(1, usedefault=True,
                             desc="registration threads (results depend on it; 1 = same on every machine)")


class RegisterFlairOutputSpec(DecisionOutputSpec):
    flair_file = File(desc="FLAIR on the DWI grid, float32, 0 outside its field of view")
    transform_file = File(desc="transform DWI -> FLAIR points (.tfm rigid, .h5 nonrigid)")
    metric_value = traits.Float(desc="final Mattes mutual information (negative; lower is better)")


class RegisterFlair(DecisionInterface):
    """Register the FLAIR to the DWI and resample it onto the DWI grid."""

    input_spec = RegisterFlairInputSpec
    output_spec = RegisterFlairOutputSpec
    step = "register"
    title = "FLAIR to DWI registration"

    def _run_step(self, runtime):
        mask = self.inputs.brain_mask_file if isdefined(self.inputs.brain_mask_file) else None
        res = register_flair(self.inputs.flair_file, self.inputs.dwi_file, mask, self.inputs.mode,
                             Path(runtime.cwd), seed=self.inputs.seed, num_threads=max(1, self.inputs.num_threads))
        self.decide(f"FLAIR registered to the DWI ({res['mode']}: "
                    + ("Euler 3-D" if res["mode"] == "rigid" else "rigid, affine, B-spline 8x8x8")
                    + f"), Mattes MI {res['metric_initial']:.4f} -> {res['metric_final']:.4f}, "
                    f"{res['seconds']:.1f} s, initialisation '{res['init']}', "
                    f"metric {'inside the brain mask' if res['masked'] else 'over the whole DWI'}.")
        if res["overlap"] < 0.5:
            self.decide(f"Only {100 * res['overlap']:.0f} % of the DWI lies in the FLAIR field of view; "
                        "the registered FLAIR is zero elsewhere.", "warning")
        if res["metric_final"] > res["metric_initial"]:
            self.decide("The registration did not improve the mutual information over the header alignment; "
                        "check the FLAIR-DWI overlay.", "warning")
        for key in ("mode", "seed", "threads", "init", "init_metrics", "metric_initial", "metric_final",
                    "stages", "overlap", "masked", "seconds", "rotation_deg", "translation_mm"):
            if key in res:
                self.record(key, res[key])
        self._results.update(flair_file=res["flair_file"], transform_file=res["transform_file"],
                             metric_value=float(res["metric_final"]))
        return runtime
