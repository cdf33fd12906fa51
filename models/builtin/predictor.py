"""Inference of the built-in lesion segmentation model.

``BuiltinPredictor().predict(dwi_n_img, adc_n_img)`` takes the two normalised channels (nibabel images
on one grid, as produced by ``transforms.normalize_channels``) and returns a float32 lesion probability
array on that same grid:

1. to the model grid, RAS 2 mm: if the voxels are already ~2 mm (within 10 %) only the axes are
   permuted/flipped to the closest RAS orientation (exact, no interpolation; oblique grids are fine:
   training used random rotations of +-15 deg); otherwise the image is resampled (trilinear,
   ``nibabel.processing.resample_from_to``) onto an axis-aligned RAS 2 mm grid covering it;
2. the brain's bounding box on the model grid (non-zero input) grown by ``BRAIN_MARGIN_VOX`` voxels,
   zero-filled beyond the image, so that the field of view around the brain does not change the
   result (instance norm over each window depends on how much background it holds: the same case
   zero-padded by 10 voxels lost 4 of 7 found lesions before this step);
   MONAI ``SlidingWindowInferer`` on that box (roi = the training patch from the sidecar, else 96x112x96;
   overlap = the sidecar's ``"overlap"``, else 0.25; gaussian blending), ``sigmoid(logit / T)`` with the
   sidecar's calibration temperature ``T`` (``calibrate.py``; 1 when absent), optional left-right flip
   TTA (mean of the probabilities);
3. back to the input grid (exact inverse of the axis permutation, or trilinear resampling).

The weights are verified against the SHA-256 in their JSON sidecar *before* ``torch.load(...,
weights_only=True)``. Same input -> bit-identical output (deterministic algorithms, fixed threads order).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage


from .network import DEFAULT_HPARAMS, build_network
from .weights_file import WeightsIntegrityError, read_verified  # noqa: F401 (re-exported)

HERE = Path(__file__).resolve().parent
DEFAULT_WEIGHTS = HERE / "weights" / "builtin_v1.pt"
ROI = (96, 112, 96)
OVERLAP = 0.25  # sliding-window overlap when the sidecar records none (releases 1-5)
# margin around the brain's box on the model grid: the median brain-to-edge margin of generated training
# volumes (synth.FOV around the warped atlas brain; 11, 11-12, 9.5-11 voxels per axis over 24 volumes)
BRAIN_MARGIN_VOX = 11


@contextlib.contextmanager
def _deterministic():
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def normalize_images(dwi_img, adc_img, brain):
    """Apply ``normalize_channels`` to nibabel images (trace, ADC in 1e-3 mm2/s) -> two nibabel images."""
    import nibabel as nib

    from .transforms import normalize_channels

    d, a = normalize_channels(np.asarray(dwi_img.dataobj), np.asarray(adc_img.dataobj), brain)
    return nib.Nifti1Image(d, dwi_img.affine), nib.Nifti1Image(a, dwi_img.affine)


class _Grid:
    """Forward / inverse mapping between an input grid and the model grid (RAS, 2 mm)."""

    def __init__(self, shape, affine, voxel_mm=2.0):
        import nibabel.orientations as nio

        self.shape = tuple(int(s) for s in shape[:3])
        self.affine = np.asarray(affine, dtype=np.float64)
        zooms = np.sqrt((self.affine[:3, :3] ** 2).sum(0))
        self.voxel_mm = voxel_mm
        self.exact = bool(np.all(np.abs(zooms - voxel_mm) <= 0.1 * voxel_mm))
        if self.exact:
            self.ornt = nio.io_orientation(self.affine)
            self.ras = nio.axcodes2ornt(("R", "A", "S"))
            self.fwd = nio.ornt_transform(self.ornt, self.ras)
            self.inv = nio.ornt_transform(self.ras, self.ornt)
        else:
            corners = np.array([[i, j, k, 1] for i in (0, self.shape[0] - 1) for j in (0, self.shape[1] - 1)
                                for k in (0, self.shape[2] - 1)], dtype=float)
            mm = (self.affine @ corners.T).T[:, :3]
            lo, hi = mm.min(0), mm.max(0)
            self.out_shape = tuple(int(np.ceil((h - l) / voxel_mm)) + 1 for l, h in zip(lo, hi))
            self.out_affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
            self.out_affine[:3, 3] = lo

    def to_model(self, arr):
        import nibabel as nib
        import nibabel.orientations as nio

        if self.exact:
            return np.ascontiguousarray(nio.apply_orientation(arr, self.fwd), dtype=np.float32)
        from nibabel.processing import resample_from_to

        img = nib.Nifti1Image(np.asarray(arr, dtype=np.float32), self.affine)
        out = resample_from_to(img, (self.out_shape, self.out_affine), order=1, mode="constant", cval=0.0)
        return np.asarray(out.dataobj, dtype=np.float32)

    def from_model(self, arr):
        import nibabel as nib
        import nibabel.orientations as nio

        if self.exact:
            return np.ascontiguousarray(nio.apply_orientation(arr, self.inv), dtype=np.float32)
        from nibabel.processing import resample_from_to

        img = nib.Nifti1Image(np.asarray(arr, dtype=np.float32), self.out_affine)
        out = resample_from_to(img, (self.shape, self.affine), order=1, mode="constant", cval=0.0)
        return np.asarray(out.dataobj, dtype=np.float32)


class BuiltinPredictor:
    def __init__(self, weights=None, device="cpu", tta=False, roi=None, overlap=None, _state=None, _hparams=None,
                 brain_margin=BRAIN_MARGIN_VOX):
        self.device = torch.device(device)
        self.brain_margin = brain_margin  # None: the whole model grid (before the brain box; for comparisons)
        self.tta = bool(tta)
        meta = {}
        if _state is not None:
            self.weights = None
            self.hparams = dict(DEFAULT_HPARAMS, **(_hparams or {}))
            self._sha = None
            state = _state
        else:
            self.weights = Path(weights) if weights else DEFAULT_WEIGHTS
            meta, state = read_verified(self.weights)
            self._sha = meta["sha256"]
            self.hparams = dict(DEFAULT_HPARAMS, **meta.get("hparams", {}))
        self.meta = meta  # the sidecar (empty for an in-memory state dict)
        # probability calibration (models/builtin/calibrate.py): sigmoid(logit / T); T=1 when absent
        self.temperature = float((meta.get("calibration") or {}).get("temperature", 1.0))
        if not (0.01 <= self.temperature <= 100.0):
            raise WeightsIntegrityError(f"{self.weights}: calibration temperature {self.temperature} out of range")
        # post-processing recommended with these weights (sidecar "postprocess", written by
        # choose_postprocess.py), used when the app's --contrast-check / --grow-lesions / --detect-lesions
        # are auto
        post = meta.get("postprocess") or {}
        self.recommended_contrast_check = bool(post.get("contrast_check", False))
        self.recommended_grow_low = float(post["grow_low"]) if post.get("grow_lesions") else None
        self.recommended_detect_low = float(post["detect_low"]) if post.get("detect_lesions") else None
        # sliding-window size: the training patch (instance-norm statistics as in training) unless given
        self.roi = tuple(roi) if roi else tuple(meta.get("patch") or ROI)
        # sliding-window overlap: given, else the one recorded with the weights, else 0.25
        recorded = float(meta.get("overlap", OVERLAP))
        if not (0.0 <= recorded < 1.0):
            raise WeightsIntegrityError(f"{self.weights}: sidecar sliding-window overlap {recorded} not in [0, 1)")
        self.overlap = float(overlap) if overlap is not None else recorded
        if not (0.0 <= self.overlap < 1.0):
            raise ValueError(f"sliding-window overlap {self.overlap} not in [0, 1)")
        self.net = build_network(self.hparams)
        self.net.load_state_dict(state)
        self.net.to(self.device).eval()
        from monai.inferers import SlidingWindowInferer

        self.inferer = SlidingWindowInferer(roi_size=self.roi, sw_batch_size=1, overlap=self.overlap,
                                            mode="gaussian", padding_mode="constant", cval=0.0)

    @classmethod
    def from_state_dict(cls, state, hparams=None, **kw):
        return cls(_state=state, _hparams=hparams, **kw)

    @property
    def weights_sha256(self):
        return self._sha

    def _prob_model_grid(self, x: np.ndarray) -> np.ndarray:
        """Probability on the model grid: inference on the brain box (``brain_margin``), 0 outside it."""
        return self._on_brain_box(x, self._prob_array, 0.0)

    def logits_model_grid(self, x: np.ndarray) -> np.ndarray:
        """Logits (no temperature, no TTA) on the model grid, through the same brain box as the app
        (``calibrate.py`` fits the temperature on these); -inf outside the box."""
        return self._on_brain_box(x, self._logit_array, -np.inf)

    def _on_brain_box(self, x: np.ndarray, fn, fill: float) -> np.ndarray:
        """``fn`` on the brain's bounding box (non-zero input) grown by ``brain_margin`` voxels and
        zero-filled beyond the array; ``fill`` elsewhere. ``brain_margin=None``: ``fn`` on all of ``x``."""
        if self.brain_margin is None:
            return fn(x)
        out = np.full(x.shape[1:], fill, dtype=np.float32)
        found = ndimage.find_objects(np.any(x != 0, axis=0).astype(np.int8))
        if not found:
            return out
        m = int(self.brain_margin)
        lo = [sl.start - m for sl in found[0]]
        hi = [sl.stop + m for sl in found[0]]
        box = np.zeros((x.shape[0], *(b - a for a, b in zip(lo, hi))), dtype=np.float32)
        src = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo, hi, x.shape[1:]))
        dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo))
        box[(slice(None),) + dst] = x[(slice(None),) + src]
        out[src] = fn(box)[dst]
        return out

    @torch.no_grad()
    def _logit_tensor(self, x: np.ndarray, flip: bool = False) -> torch.Tensor:
        """Sliding-window logits of ``x`` (2, ...) zero-padded to multiples of ``divisible_by``."""
        div = int(self.hparams.get("divisible_by", 8))
        shape = x.shape[1:]
        padded = [int(np.ceil(s / div) * div) for s in shape]
        xp = np.zeros((2, *padded), dtype=np.float32)
        xp[:, : shape[0], : shape[1], : shape[2]] = x
        t = torch.from_numpy(xp)[None].to(self.device)
        self.inferer.roi_size = tuple(min(r, p) for r, p in zip(self.roi, padded))
        if flip:  # left-right (axis 0 is R-L on the RAS model grid)
            return self.inferer(t.flip(2), self.net).flip(2)
        return self.inferer(t, self.net)

    def _logit_array(self, x: np.ndarray) -> np.ndarray:
        shape = x.shape[1:]
        return self._logit_tensor(x)[0, 0, : shape[0], : shape[1], : shape[2]].float().cpu().numpy()

    @torch.no_grad()
    def _prob_array(self, x: np.ndarray) -> np.ndarray:
        prob = torch.sigmoid(self._logit_tensor(x) / self.temperature)
        if self.tta:
            prob = 0.5 * (prob + torch.sigmoid(self._logit_tensor(x, flip=True) / self.temperature))
        shape = x.shape[1:]
        return prob[0, 0, : shape[0], : shape[1], : shape[2]].float().cpu().numpy()

    def predict(self, dwi_n_img, adc_n_img) -> np.ndarray:
        """Lesion probability (float32, in [0, 1]) on the grid of ``dwi_n_img``."""
        dwi = np.asarray(dwi_n_img.dataobj, dtype=np.float32)
        adc = np.asarray(adc_n_img.dataobj, dtype=np.float32)
        dwi = dwi.reshape(dwi.shape[:3]) if dwi.ndim > 3 else dwi
        adc = adc.reshape(adc.shape[:3]) if adc.ndim > 3 else adc
        if dwi.shape != adc.shape:
            raise ValueError(f"DWI {dwi.shape} and ADC {adc.shape} must share one grid")
        grid = _Grid(dwi.shape, dwi_n_img.affine, float(self.hparams.get("voxel_mm", 2.0)))
        x = np.stack([grid.to_model(dwi), grid.to_model(adc)])
        with _deterministic():
            p = self._prob_model_grid(x)
        out = grid.from_model(p)
        return np.clip(out, 0.0, 1.0).astype(np.float32)
