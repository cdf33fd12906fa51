"""SEALS inference: the official DeepISLES / nnU-Net v1 recipe, without the ``nnunet`` package.

Per case (``SealsPredictor.predict(trace, adc)``, both nibabel images on the native DWI grid):

1. DWI and ADC are resampled linearly (SimpleITK, identity transform, same origin and direction,
   background 0) to a 1 mm isotropic grid of ``floor(n * spacing)`` voxels per axis. Unlike the
   official code the size is computed in Python integers (the official ``uint8`` cast wraps around
   for fields of view >= 256 mm) and the result stays float32 (the official code keeps the input
   pixel type, truncating integer DWIs).
2. Arrays are in SimpleITK order (z, y, x), as nnU-Net sees them; channels [DWI, ADC].
3. Crop to the bounding box of the hole-filled union of non-zero voxels of both channels;
   ``transpose_forward``; per-channel z-score per the plan (``use_mask_for_norm``: mean/std inside
   the hole-filled mask, 0 outside; otherwise over the whole crop; population std, ``+1e-8``).
4. Per fold: zero padding (centred) to at least the patch size; sliding window with step
   0.5 x patch (``ceil((n - p) / (p / 2)) + 1`` evenly spaced, rounded positions); Gaussian
   importance map (sigma = patch / 8, max 1, zeros -> smallest non-zero value); mirroring TTA over
   all 8 flip combinations of the 3 axes, softmax averaged; ``transpose_backward``.
5. Mean softmax of the folds, pasted into the full 1 mm grid (background probability 1 outside the
   crop box), lesion channel resampled linearly back to the native grid by index scaling
   (SimpleITK; voxels beyond the 1 mm grid -> 0). Returned: float32 p(lesion) on the DWI grid.

The official code writes each fold's softmax as float16 and averages the 5 folds after resampling;
here the folds are averaged in float32 before resampling (linear resampling commutes with the mean).
Only the lesion channel is resampled back: with p0 + p1 = 1 on the 1 mm grid, linear resampling
keeps p0 = 1 - p1 inside the grid and (0, 0) outside, so ``argmax = p1 > p0`` is ``p1 > 0.5``.
Mixed precision (fp16 autocast) is used on CUDA only, as with nnU-Net v1 (its ``torch.cuda.amp``
autocast is a no-op on CPU).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from bids_app.errors import DeepIslesError, InputError, WeightsError
from models.seals import FOLDS, PLANS_FILE, SEALS_FILES, fold_files
from models.seals.checkpoint import load_model_checkpoint, load_pickle, load_state_dict_strict, read_checked
from models.seals.network import build_network
from models.seals.plans import SealsPlan, plan_from_dict

log = logging.getLogger("deepisles.models.seals")

TARGET_SPACING = 1.0
#: tolerance of the 1 mm grid size: floor(n * s + tol), so 0.9 mm stored as 0.89999998 still gives
#: 180 voxels for n = 200 (the official code would give 179)
GRID_TOL = 1e-3
MIRROR_AXES = ((), (4,), (3,), (4, 3), (2,), (4, 2), (3, 2), (4, 3, 2))  # nnU-Net v1 order


# ----------------------------------------------------------------------------- geometry / resampling
def grid_size_1mm(shape, spacing, target: float = TARGET_SPACING) -> tuple[int, ...]:
    """Voxels of the 1 mm grid per axis: ``floor(n * s / target)`` in Python ints (no uint8 wrap)."""
    size = tuple(int(np.floor(int(n) * float(s) / target + GRID_TOL)) for n, s in zip(shape, spacing))
    if any(v < 1 for v in size):
        raise InputError("DWI", f"field of view {tuple(np.multiply(shape, spacing))} mm gives an empty "
                                f"1 mm grid {size}")
    return size


def _sitk_image_zyx(arr_zyx: np.ndarray, spacing_xyz):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(arr_zyx, dtype=np.float32))
    img.SetSpacing(tuple(float(s) for s in spacing_xyz))
    return img


def resample_zyx(arr_zyx: np.ndarray, spacing_in_xyz, size_out_xyz, spacing_out_xyz,
                 threads: int | None = None) -> np.ndarray:
    """Linear resampling by index scaling (shared origin 0 and identity direction), background 0.

    ``arr_zyx`` is a SimpleITK-order array; sizes/spacings are in (x, y, z). Returns float32 (z, y, x).
    This is exactly the official SimpleITK call (identity transform, output origin and direction =
    input's), whose result does not depend on the shared origin/direction.
    """
    import SimpleITK as sitk

    img = _sitk_image_zyx(arr_zyx, spacing_in_xyz)
    f = sitk.ResampleImageFilter()
    f.SetOutputOrigin(img.GetOrigin())
    f.SetOutputDirection(img.GetDirection())
    f.SetOutputSpacing(tuple(float(s) for s in spacing_out_xyz))
    f.SetSize([int(v) for v in size_out_xyz])
    f.SetTransform(sitk.Transform(3, sitk.sitkIdentity))
    f.SetInterpolator(sitk.sitkLinear)
    f.SetDefaultPixelValue(0.0)
    f.SetOutputPixelType(sitk.sitkFloat32)
    if threads:
        f.SetNumberOfThreads(int(threads))
    return sitk.GetArrayFromImage(f.Execute(img)).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------- nnU-Net v1 preprocessing
def nonzero_bbox(data: np.ndarray):
    """(bbox, filled mask) of the hole-filled union of non-zero voxels of all channels.

    ``bbox`` is ``[[lo, hi), ...]`` per spatial axis; ``None`` when every voxel is 0.
    """
    mask = np.zeros(data.shape[1:], dtype=bool)
    for channel in data:
        mask |= channel != 0
    mask = ndimage.binary_fill_holes(mask)
    if not mask.any():
        return None, mask
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        bbox.append([int(hit[0]), int(hit[-1]) + 1])
    return bbox, mask


def normalize(data: np.ndarray, mask: np.ndarray, plan: SealsPlan) -> np.ndarray:
    """Per-channel nnU-Net v1 ``nonCT`` z-score (in place on a float32 copy); ``mask`` is the crop mask."""
    out = np.array(data, dtype=np.float32, copy=True)
    for c in range(out.shape[0]):
        scheme = plan.normalization_schemes[c]
        if scheme == "noNorm":
            continue
        if plan.use_mask_for_norm[c]:
            vals = out[c][mask].astype(np.float64)
            mean, std = vals.mean(), vals.std()
            out[c][mask] = ((vals - mean) / (std + 1e-8)).astype(np.float32)
            out[c][~mask] = 0
        else:
            vals = out[c].astype(np.float64)
            out[c] = ((vals - vals.mean()) / (vals.std() + 1e-8)).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- sliding window
def compute_steps(patch_size, image_size, step_size: float = 0.5) -> list[list[int]]:
    """Window start positions per axis (nnU-Net v1 rule). ``image_size >= patch_size`` per axis."""
    if not 0 < step_size <= 1:
        raise ValueError("step_size must be in (0, 1]")
    steps = []
    for n, p in zip(image_size, patch_size):
        if n < p:
            raise ValueError(f"image size {tuple(image_size)} smaller than patch {tuple(patch_size)}")
        num = int(np.ceil((n - p) / (p * step_size))) + 1
        stride = (n - p) / (num - 1) if num > 1 else 0.0
        steps.append([int(np.round(stride * i)) for i in range(num)])
    return steps


def gaussian_importance_map(patch_size, sigma_scale: float = 1.0 / 8) -> np.ndarray:
    """Gaussian (sigma = patch * sigma_scale) centred at ``p // 2``, max 1, no zeros (float32)."""
    delta = np.zeros(tuple(int(p) for p in patch_size))
    delta[tuple(int(p) // 2 for p in patch_size)] = 1
    g = ndimage.gaussian_filter(delta, [p * sigma_scale for p in patch_size], 0, mode="constant", cval=0)
    g = (g / g.max()).astype(np.float32)
    if (g == 0).any():
        g[g == 0] = g[g != 0].min()
    return g


def pad_to_patch(data: np.ndarray, patch_size):
    """Zero-pad (C, ...) to at least ``patch_size``, centred (extra voxel after); returns (padded, slicer)."""
    shape = np.array(data.shape[1:])
    new = np.maximum(shape, np.array(patch_size))
    diff = new - shape
    below, above = diff // 2, diff // 2 + diff % 2
    if not diff.any():
        return data, tuple(slice(0, int(n)) for n in shape)
    padded = np.pad(data, [(0, 0)] + [(int(b), int(a)) for b, a in zip(below, above)], mode="constant")
    return padded, tuple(slice(int(b), int(b + n)) for b, n in zip(below, shape))


def _softmax_tta(net, x: torch.Tensor, mirroring: bool, amp: bool) -> torch.Tensor:
    """Mean softmax over the mirror combinations (all 8, or none), float32, shape of net(x)."""
    combos = MIRROR_AXES if mirroring else ((),)
    acc = None
    for axes in combos:
        xin = torch.flip(x, axes) if axes else x
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=amp):
            logits = net(xin)
        prob = torch.softmax(logits.float(), dim=1)
        if axes:
            prob = torch.flip(prob, axes)
        acc = prob if acc is None else acc.add_(prob)
    return acc / len(combos)


def sliding_window_softmax(net, data: np.ndarray, patch_size, device="cpu", mirroring: bool = True,
                           step_size: float = 0.5, amp: bool = False, gaussian: np.ndarray | None = None,
                           num_classes: int = 2, info: dict | None = None) -> np.ndarray:
    """Softmax (K, *data.shape[1:]) of one network over a preprocessed (C, ...) float32 array."""
    padded, slicer = pad_to_patch(data, patch_size)
    shape = padded.shape[1:]
    steps = compute_steps(patch_size, shape, step_size)
    if gaussian is None:
        gaussian = gaussian_importance_map(patch_size)
    dev = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(padded))[None].to(dev)
    g = torch.from_numpy(gaussian).to(dev)
    agg = torch.zeros((num_classes,) + tuple(shape), dtype=torch.float32, device=dev)
    weight = torch.zeros(tuple(shape), dtype=torch.float32, device=dev)
    p = tuple(int(v) for v in patch_size)
    n = 0
    with torch.inference_mode():
        for sx in steps[0]:
            for sy in steps[1]:
                for sz in steps[2]:
                    win = (slice(sx, sx + p[0]), slice(sy, sy + p[1]), slice(sz, sz + p[2]))
                    xw = x[(slice(None), slice(None)) + win].contiguous()
                    prob = _softmax_tta(net, xw, mirroring, amp)[0]
                    agg[(slice(None),) + win] += prob * g
                    weight[win] += g
                    n += 1
        agg /= weight
    if info is not None:
        info.setdefault("windows", []).append(n)
        info["steps"] = steps
        info["padded_shape"] = tuple(int(v) for v in shape)
    return agg[(slice(None),) + slicer].cpu().numpy()


# ----------------------------------------------------------------------------- predictor
class SealsPredictor:
    """The 5 SEALS folds, built once; ``predict(trace, adc)`` per case (see the module docstring).

    Attributes: ``weights_sha256`` (``{relpath: sha256}`` of the files read), ``folds``,
    ``plans`` (one :class:`SealsPlan` per fold), ``last_info`` (geometry and timing of the last case).
    """

    name = "seals"

    def __init__(self, networks, plans, folds, weights_sha256, device: str = "cpu", mirroring: bool = True,
                 step_size: float = 0.5, mixed_precision: bool = True):
        if not networks:
            raise WeightsError("SEALS: no fold to run")
        self.networks = list(networks)
        self.plans = list(plans)
        self.folds = list(folds)
        self.weights_sha256 = dict(weights_sha256)
        self.device = str(device)
        self.mirroring = bool(mirroring)
        self.step_size = float(step_size)
        self.amp = bool(mixed_precision) and torch.device(self.device).type == "cuda"
        self._gaussians: dict[tuple, np.ndarray] = {}
        self.last_info: dict = {}

    # ---- construction
    @classmethod
    def from_weights_dir(cls, weights_dir=None, device: str = "cpu", folds=None, manifest=None,
                         mirroring: bool = True, step_size: float = 0.5, mixed_precision: bool = True,
                         **ignored):
        """Read, check and load the official SEALS folder.

        ``manifest``: ``{relpath: sha256}`` or a manifest file (``sha256sum`` lines or JSON, paths
        relative to ``weights_dir``); every file is then verified before it is deserialised.
        Without it the digests are only recorded (``weights_sha256``). ``folds``: subset of 0..4.
        Other options (``tta``, ``weights``, ...) are ignored: SEALS always runs its official
        mirroring TTA unless ``mirroring=False``.
        """
        from models.weights import load_checksum_manifest, require_files

        if weights_dir is None:
            from models.registry import default_weights_dir

            weights_dir = default_weights_dir()
        root = Path(weights_dir)
        if ignored:
            log.debug("SEALS: options ignored: %s", ", ".join(sorted(ignored)))
        folds = tuple(FOLDS if folds is None else (int(f) for f in folds))
        if not folds or any(f not in FOLDS for f in folds):
            raise WeightsError(f"SEALS: folds must be a non-empty subset of {FOLDS}, got {folds}")
        if manifest is not None and not isinstance(manifest, dict):
            manifest = load_checksum_manifest(manifest)
        elif isinstance(manifest, dict):
            manifest = {str(k).replace("\\", "/").lstrip("./"): str(v).lower() for k, v in manifest.items()}
        needed = [PLANS_FILE] + [rel for f in folds for rel in fold_files(f)]
        require_files(root, needed, what="SEALS weights")

        sha: dict[str, str] = {}
        data, sha[PLANS_FILE] = read_checked(root, PLANS_FILE, manifest)
        top = load_pickle(data, str(root / PLANS_FILE))
        if not isinstance(top, dict) or int(top.get("num_modalities", -1)) != 2:
            raise WeightsError(f"{root / PLANS_FILE}: expected an nnU-Net v1 plans dict with num_modalities 2 "
                               f"(DWI, ADC), got {top.get('num_modalities') if isinstance(top, dict) else type(top)}")

        nets, plans = [], []
        for fold in folds:
            rel_model, rel_pkl = fold_files(fold)
            data, sha[rel_pkl] = read_checked(root, rel_pkl, manifest)
            info = load_pickle(data, str(root / rel_pkl))
            fold_plans = info.get("plans") if isinstance(info, dict) else None
            if not isinstance(fold_plans, dict):
                log.warning("%s: no 'plans' in the checkpoint pickle; using plans.pkl", rel_pkl)
                fold_plans = top
            plan = plan_from_dict(fold_plans, _stage_of(info), where=str(root / rel_pkl))
            if plan.num_input_channels != 2 or plan.num_classes != 2:
                raise WeightsError(f"{root / rel_pkl}: expected 2 input channels and 2 classes, got "
                                   f"{plan.num_input_channels} and {plan.num_classes}")
            data, sha[rel_model] = read_checked(root, rel_model, manifest)
            ckpt = load_model_checkpoint(data, str(root / rel_model))
            del data
            net = build_network(plan)
            load_state_dict_strict(net, ckpt["state_dict"], str(root / rel_model))
            del ckpt
            nets.append(net.eval().to(device))
            plans.append(plan)
        ordered = {rel: sha[rel] for rel in SEALS_FILES if rel in sha}
        return cls(nets, plans, folds, ordered, device=device, mirroring=mirroring, step_size=step_size,
                   mixed_precision=mixed_precision)

    # ---- inference
    def _gaussian(self, patch) -> np.ndarray:
        key = tuple(patch)
        if key not in self._gaussians:
            self._gaussians[key] = gaussian_importance_map(patch)
        return self._gaussians[key]

    def predict(self, trace_img, adc_img) -> np.ndarray:
        """float32 p(lesion) on the native grid of ``trace_img`` (see the module docstring)."""
        t0 = time.perf_counter()
        dwi, spacing = _image_array(trace_img, "trace DWI")
        adc, _ = _image_array(adc_img, "ADC")
        if adc.shape != dwi.shape:
            raise InputError("ADC", f"shape {adc.shape} differs from the DWI {dwi.shape}; conform it first")
        native_xyz = dwi.shape
        size_xyz = grid_size_1mm(native_xyz, spacing)
        threads = torch.get_num_threads()
        # SimpleITK-order (z, y, x) arrays on the 1 mm grid, channels [DWI, ADC]
        data = np.stack([resample_zyx(a.transpose(2, 1, 0), spacing, size_xyz, (1.0, 1.0, 1.0), threads)
                         for a in (dwi, adc)])
        grid_zyx = data.shape[1:]
        bbox, mask = nonzero_bbox(data)
        info = {"grid_1mm_xyz": size_xyz, "native_xyz": tuple(native_xyz), "spacing": tuple(spacing)}
        self.last_info = info
        if bbox is None:
            log.warning("SEALS: DWI and ADC are all zero; returning an empty probability map")
            return np.zeros(native_xyz, dtype=np.float32)
        crop = tuple(slice(lo, hi) for lo, hi in bbox)
        data = data[(slice(None),) + crop]
        mask = mask[crop]
        info["crop_bbox_zyx"] = [list(b) for b in bbox]
        t1 = time.perf_counter()

        prepared: dict[tuple, np.ndarray] = {}
        total = np.zeros((2,) + data.shape[1:], dtype=np.float32)
        for net, plan in zip(self.networks, self.plans):
            key = plan.preprocessing_key
            if key not in prepared:
                tf = list(plan.transpose_forward)
                x = data.transpose([0] + [i + 1 for i in tf])
                prepared[key] = normalize(x, mask.transpose(tf), plan)
            soft = sliding_window_softmax(net, prepared[key], plan.patch_size, self.device, self.mirroring,
                                          self.step_size, self.amp, self._gaussian(plan.patch_size),
                                          plan.num_classes, info)
            total += soft.transpose([0] + [i + 1 for i in plan.transpose_backward])
        total /= len(self.networks)
        t2 = time.perf_counter()

        p1 = np.zeros(grid_zyx, dtype=np.float32)
        p1[crop] = total[1]
        out = resample_zyx(p1, (1.0, 1.0, 1.0), native_xyz, spacing, threads).transpose(2, 1, 0)
        info["seconds"] = {"preprocess": round(t1 - t0, 3), "networks": round(t2 - t1, 3),
                           "total": round(time.perf_counter() - t0, 3)}
        return np.ascontiguousarray(out, dtype=np.float32)

    __call__ = predict


def _stage_of(info) -> int | None:
    """Stage recorded in a ``.model.pkl`` ``init`` tuple (6th argument of the v1 trainer), if any."""
    init = info.get("init") if isinstance(info, dict) else None
    if isinstance(init, (tuple, list)) and len(init) > 5 and isinstance(init[5], (int, np.integer)) \
            and not isinstance(init[5], bool):
        return int(init[5])
    return None


def _image_array(img, what: str):
    """(float32 (x, y, z) array with non-finite -> 0, voxel sizes) of a nibabel image."""
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    except AttributeError:
        raise DeepIslesError(f"SEALS: {what} must be a nibabel image, got {type(img).__name__}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(what, f"expected a 3-D image, got shape {data.shape}")
    if len(zooms) < 3 or min(zooms) <= 0:
        raise InputError(what, f"invalid voxel sizes {zooms}")
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    return data, zooms
