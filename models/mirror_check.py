"""Mirror check: a candidate lesion must be brighter than its mirror partner across the midline.

An acute embolus is one-sided; susceptibility pile-ups (temporal poles, skull base) and bright normal
structures often show on both sides. ``mirror_maps`` finds each brain voxel's partner in the other
hemisphere: the trace (brain only) is reflected left-right and rigidly registered onto itself
(SimpleITK, Euler 3-D, correlation over the brain, one thread: same image, same contrast), so the
reflection follows the real midline of a turned or tilted head. The reflected trace and voxel
indices resampled through that transform give, on the input grid, the partner's trace and where the
partner is.

``mirror_filter`` keeps a 26-connected component when trace p75 in it / the median partner trace over
its paired voxels (partner in the brain and outside the component) >= ``min_ratio``; a component with
under half its voxels paired (at the edge of the field of view, or across the midline) is kept, and so
is one whose partners lie at least half in another lesion (bilateral infarcts, e.g. both thalami: the
dimmer side is not removed for being dimmer than its twin). One row per component: ``size``,
``mirror_ratio`` (``None`` when unpaired or bilateral), ``bilateral``, ``kept``.

Storage order does not matter: the maps are computed in the canonical (RAS) voxel order, by exact
permutations and flips, on a grid of the image's voxel sizes, and brought back the same way.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from models.postprocess import STRUCTURE_26

DETECT_MIRROR_RATIO = 1.3  # detected candidates: stage AD's synthetic choice from {1.1, 1.2, 1.3} (MODEL_CARD.md)
MASK_MIRROR_RATIO = 1.05  # the mask's own components, when no ratio is recommended (stage AG)
MIN_PAIRED = 0.5
REGISTRATION_MM = 3.0  # the registration's grid, whatever the input's voxels (its cost does not grow with them)
MAX_ANGLE_DEG = 30.0  # a head turned or tilted by up to 15 degrees needs twice that to meet its reflection


def _method(mask, shrink, sigmas):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(1)
    reg.SetMetricAsCorrelation()
    reg.SetMetricFixedMask(mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


def _on_registration_grid(fixed, moving, mask):
    """The three images resampled onto a ``REGISTRATION_MM`` isotropic grid over the same box."""
    import SimpleITK as sitk

    extent = [n * s for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
    grid = sitk.Image([max(1, int(np.ceil(e / REGISTRATION_MM))) for e in extent], sitk.sitkFloat32)
    grid.SetSpacing([REGISTRATION_MM] * 3)
    grid.SetDirection(fixed.GetDirection())
    grid.SetOrigin(fixed.TransformContinuousIndexToPhysicalPoint([-0.5 + REGISTRATION_MM / (2 * s)
                                                                  for s in fixed.GetSpacing()]))
    identity = sitk.Transform()
    return (sitk.Resample(fixed, grid, identity, sitk.sitkLinear, 0.0),
            sitk.Resample(moving, grid, identity, sitk.sitkLinear, 0.0),
            sitk.Resample(mask, grid, identity, sitk.sitkNearestNeighbor, 0))


def _register_reflection(fixed, moving, mask):
    """Rigid transform (fixed -> moving points) of the reflected trace onto the trace: correlation over
    the brain (every voxel, no random sampling), centred by image moments, on a 3 mm grid at 1/2 and full
    resolution; the moments start is kept if the optimiser fails, ends worse on that grid, or turns the
    reflection by more than ``MAX_ANGLE_DEG`` about any axis (an overlap too small to mean anything can
    correlate better: seen on a 6 mm-slice scan with a large infarct)."""
    import SimpleITK as sitk

    fixed, moving, mask = _on_registration_grid(fixed, moving, mask)
    try:
        start = sitk.Euler3DTransform(sitk.CenteredTransformInitializer(
            fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS))
    except RuntimeError:  # degenerate image: the plain reflection about the grid centre
        return sitk.Euler3DTransform()
    reg = _method(mask, [2, 1], [1, 0])
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=100,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(sitk.Euler3DTransform(start), inPlace=False)
    try:
        final = sitk.Euler3DTransform(sitk.CompositeTransform(reg.Execute(fixed, moving)).GetNthTransform(0))
    except RuntimeError:  # e.g. the optimiser left the image: keep the start
        return start
    if max(abs(a) for a in (final.GetAngleX(), final.GetAngleY(), final.GetAngleZ())) > np.radians(MAX_ANGLE_DEG):
        return start

    def cost(transform):
        full = _method(mask, [1], [0])
        full.SetInitialTransform(transform, inPlace=False)
        return full.MetricEvaluate(fixed, moving)

    return final if cost(final) <= cost(start) else start


def _mirror_maps_ras(trace: np.ndarray, brain: np.ndarray, index: np.ndarray, zooms):
    import SimpleITK as sitk

    from nodes.register import nib_to_sitk, sitk_to_array

    affine = np.diag([*map(float, zooms), 1.0])
    data = np.where(brain, trace, 0.0).astype(np.float32)
    # registered: the trace capped at the brain's 75th percentile, so that a large bright lesion (on one
    # side by nature) neither pulls the moments start nor dominates the correlation
    capped = np.minimum(data, np.float32(np.percentile(data[brain], 75)))
    fixed = nib_to_sitk(capped, affine)
    moving = nib_to_sitk(capped[::-1].copy(), affine)
    moving_trace = nib_to_sitk(data[::-1].copy(), affine)
    # each voxel's flat index in the original storage order, reflected like the trace (float64: exact)
    moving_index = sitk.GetImageFromArray(np.ascontiguousarray(np.where(brain, index, -1.0)[::-1].transpose(2, 1, 0)))
    moving_index.CopyInformation(moving_trace)
    mask = sitk.Cast(nib_to_sitk(brain.astype(np.float32), affine), sitk.sitkUInt8)
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:  # one thread: metric sums are bitwise repeatable only with a fixed thread count
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        transform = _register_reflection(fixed, moving, mask)
        partner = sitk_to_array(sitk.Resample(moving_trace, fixed, transform, sitk.sitkLinear, 0.0))
        partner_index = sitk_to_array(sitk.Resample(moving_index, fixed, transform, sitk.sitkNearestNeighbor, -1.0,
                                                    sitk.sitkFloat64))
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return partner, np.where(brain, partner_index, -1).astype(np.int64)


def mirror_maps(trace, brain, affine):
    """``(partner_trace, partner_index)`` on the grid of ``trace``: each voxel's mirror partner's trace
    (linear interpolation) and the flat index (C order) of its nearest partner voxel, -1 when that lies
    outside the brain."""
    import nibabel.orientations as nio

    affine = np.asarray(affine, dtype=float)
    ornt = nio.io_orientation(affine)
    ras = nio.axcodes2ornt(("R", "A", "S"))
    to_ras, from_ras = nio.ornt_transform(ornt, ras), nio.ornt_transform(ras, ornt)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    zooms_ras = np.empty(3)
    zooms_ras[to_ras[:, 0].astype(int)] = zooms
    brain = np.asarray(brain) > 0
    if brain.sum() < 100:
        return np.zeros(brain.shape, np.float32), np.full(brain.shape, -1, np.int64)

    def canon(a, ornt):
        return np.ascontiguousarray(nio.apply_orientation(a, ornt))

    index = np.arange(brain.size, dtype=np.float64).reshape(brain.shape)
    partner, partner_index = _mirror_maps_ras(canon(np.asarray(trace, np.float32), to_ras), canon(brain, to_ras),
                                              canon(index, to_ras), zooms_ras)
    return canon(partner, from_ras).astype(np.float32), canon(partner_index, from_ras).astype(np.int64)


def mirror_filter(mask, trace, partner, partner_index, min_ratio: float = MASK_MIRROR_RATIO, q: float = 75.0,
                  lesions=None):
    """Remove the components of ``mask`` not brighter than their mirror partners; ``(mask, rows)``.
    ``lesions`` (default ``mask``): what counts as a lesion on the other side."""
    mask = np.asarray(mask) > 0
    lesions = mask if lesions is None else np.asarray(lesions) > 0
    trace = np.asarray(trace, dtype=np.float64)
    lab, _ = ndimage.label(mask, structure=STRUCTURE_26)
    out = mask.copy()
    rows = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        comp = lab[sl] == i
        pidx = partner_index[sl]
        # paired: the partner lies in the brain and outside this component (a lesion across the
        # midline, or one the registration laid onto itself, is not compared with itself)
        both = comp & (pidx >= 0)
        both[both] = lab.ravel()[pidx[both]] != i
        row = {"size": int(comp.sum()), "mirror_ratio": None, "bilateral": False, "kept": True}
        # a pair of lesions, one on each side (bilateral infarcts): the dimmer one is not removed
        row["bilateral"] = bool(both.any() and lesions.ravel()[pidx[both]].mean() >= MIN_PAIRED)
        if both.sum() >= MIN_PAIRED * comp.sum() and not row["bilateral"]:
            ref = float(np.median(partner[sl][both]))
            row["mirror_ratio"] = float(np.percentile(trace[sl][comp], q) / ref) if ref > 0 else float("inf")
            row["kept"] = row["mirror_ratio"] >= min_ratio
            if not row["kept"]:
                out[sl][comp] = False
        rows.append(row)
    return out.astype(np.uint8), rows
