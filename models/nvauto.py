"""NVAUTO (ISLES'22 rank 2): the 15 official TorchScript models ``NVAUTO/ts/model0..14.ts``.

Recipe (docs: /work/shared/docs/official-weights-formats.md, sections 2-4):

1. channels **[ADC, DWI]** (ADC first!), float32, on the native DWI grid;
2. MONAI ``Spacing`` to 1 mm (bilinear, padding ``border``, ``align_corners=False``, orientation and
   rotation kept). MONAI 1.6 gives the documented grid: size ``round((n-1)*s)+1`` per axis and the
   origin at the centre of the first input voxel (checked by ``tests/test_nvauto.py``);
3. ``NormalizeIntensity(nonzero=True, channel_wise=True)``: z-score over the non-zero voxels of each
   channel, zeros stay 0;
4. ``SlidingWindowInferer(roi 192x192x128, overlap 0.625, mode "gaussian", sigma_scale 0.125)``;
   fp16 autocast on CUDA only (fp32 on CPU);
5. softmax over the 2 logit channels of each model;
6. mean of the 15 probability maps, mapped back to the native DWI grid by the exact inverse of step 2
   (MONAI ``Spacing.inverse``: bilinear, border). Resampling is linear with weights summing to 1,
   so "invert each model, then average" (official order) and "average, then invert once" (done
   here, 15x cheaper) differ only by float rounding;
7. lesion probability = mean p1 (the official argmax is p1 > p0, i.e. p1 > 0.5; this returns p1 and
   ``nodes/segment.py`` thresholds it; only exact ties p1 == 0.5 differ).

FLAIR is never read.

Gaussian blending map: MONAI 1.6 samples the Gaussian around ``(roi-1)/2`` and floors the map at
1e-3, while the official MONAI 0.9 used an erf-integrated kernel (``GaussianFilter``, truncated at
4 sigma) centred on ``roi//2``, normalised to max 1 and floored only at its smallest non-zero value
(~1e-11 in a 192x192x128 corner). The floor is not harmless: where several windows overlap near
their corners, a 1e-3 floor outweighs the true weights (1e-5) by 100x and changes probabilities by
~1e-2 (measured on the fake models). This module therefore passes the MONAI 0.9 map explicitly
(:func:`official_importance_map`, ``SlidingWindowInferer.roi_weight_map``).

Weights safety: every file's SHA-256 is computed before ``torch.jit.load`` sees it, and the bytes
that were hashed are the bytes that are loaded (read once into memory, no time-of-check/time-of-use
gap). With ``options['manifest']`` (``{relpath: hex}`` or the path of a manifest file readable by
:func:`models.weights.load_checksum_manifest`) every file must match before any model is loaded.
Without a manifest the digests are recorded (``weights_sha256``) and only regular files whose real
path lies inside ``weights_dir`` are accepted: TorchScript reached through a link leaving the
official tree, or given as a separate file (``options['weights']``), is refused.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np

from bids_app.errors import DeepIslesError, UsageError, WeightsError
from models.weights import _check_hex, _norm_rel, load_checksum_manifest, require_files

log = logging.getLogger("deepisles.models.nvauto")

NVAUTO_FILES = tuple(f"NVAUTO/ts/model{k}.ts" for k in range(15))
PIXDIM = (1.0, 1.0, 1.0)
ROI_SIZE = (192, 192, 128)
OVERLAP = 0.625
BLEND_MODE = "gaussian"
SIGMA_SCALE = 0.125
SW_BATCH_SIZE = 1

_SHA_CACHE: dict[tuple, str] = {}


# ----------------------------------------------------------------------------- checksums
def _digest_file(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def nvauto_checksums(weights_dir) -> dict[str, str]:
    """``{relpath: sha256}`` of the 15 NVAUTO files (WeightsError if any is missing)."""
    if weights_dir is None:
        raise WeightsError("NVAUTO: no weights folder given")
    paths = require_files(weights_dir, NVAUTO_FILES, what="NVAUTO weights")
    return {rel: _digest_file(p) for rel, p in zip(NVAUTO_FILES, paths)}


def _read_manifest(manifest) -> dict[str, str] | None:
    if manifest is None or manifest == "":
        return None
    if isinstance(manifest, dict):
        return {_norm_rel(k): _check_hex(v, f"NVAUTO manifest entry {k!r}") for k, v in manifest.items()}
    if isinstance(manifest, (str, os.PathLike)):
        return load_checksum_manifest(manifest)
    raise UsageError(f"NVAUTO: options['manifest'] must be a {{relpath: sha256}} dict or a file path, "
                     f"got {type(manifest).__name__}")


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve(strict=True).relative_to(root.resolve(strict=True))
        return True
    except (ValueError, OSError):
        return False


def _check_files(weights_dir: Path, manifest: dict[str, str] | None) -> tuple[list[Path], dict[str, str]]:
    """Every file present, a regular file, inside the tree (no manifest) or matching the manifest."""
    paths = require_files(weights_dir, NVAUTO_FILES, what="NVAUTO weights")
    if manifest is not None:
        absent = [rel for rel in NVAUTO_FILES if rel not in manifest]
        if absent:
            raise WeightsError(f"NVAUTO: the checksum manifest has no entry for {', '.join(absent[:5])}"
                               + (f" and {len(absent) - 5} more" if len(absent) > 5 else ""))
    digests: dict[str, str] = {}
    for rel, path in zip(NVAUTO_FILES, paths):
        if manifest is None and not _inside(path, weights_dir):
            raise WeightsError(f"{path}: resolves to {path.resolve()}, outside the weights folder "
                               f"{weights_dir.resolve()}; TorchScript from outside the official file tree "
                               "is refused (give a checksum manifest to accept it)")
        got = _digest_file(path)
        if manifest is not None and got != manifest[rel]:
            raise WeightsError(f"{path}: SHA-256 mismatch (expected {manifest[rel]}, got {got}); "
                               "no NVAUTO model was loaded")
        digests[rel] = got
    return paths, digests


def load_models(weights_dir, device: str = "cpu", manifest=None) -> tuple[list, dict[str, str]]:
    """Verify, then load the 15 TorchScript models in order 0..14 (eval mode, on ``device``)."""
    import torch

    if weights_dir is None:
        raise WeightsError("NVAUTO: no weights folder given (expected <weights_dir>/NVAUTO/ts/model0..14.ts)")
    weights_dir = Path(weights_dir)
    manifest = _read_manifest(manifest)
    paths, digests = _check_files(weights_dir, manifest)  # all 15 checked before the first load
    models = []
    for rel, path in zip(NVAUTO_FILES, paths):
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digests[rel]:  # changed since it was checked
            raise WeightsError(f"{path}: file changed while the models were loading; no model loaded from it")
        try:
            model = torch.jit.load(io.BytesIO(data), map_location=device)
        except Exception as exc:
            raise WeightsError(f"{path}: not a loadable TorchScript file ({type(exc).__name__}: "
                               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
        model.eval()
        models.append(model)
        del data
    return models, digests


# ----------------------------------------------------------------------------- blending map
def official_importance_map(roi_size, sigma_scale: float = SIGMA_SCALE, truncated: float = 4.0):
    """The Gaussian weight map of MONAI 0.9 (official NVAUTO run), float32 tensor of shape ``roi_size``.

    Per axis: the erf-integrated Gaussian (sigma = sigma_scale * roi) of a unit impulse at ``roi//2``,
    zero beyond ``truncated`` sigma; the separable product divided by its maximum, then floored at its
    smallest non-zero value (no 1e-3 floor).
    """
    import torch
    from scipy.special import erf

    axes = []
    for p in roi_size:
        sigma = float(sigma_scale) * int(p)
        tail = int(max(sigma * truncated, 0.5) + 0.5)
        k = np.arange(int(p), dtype=np.float64) - int(p) // 2
        t = 1.0 / (np.sqrt(2.0) * sigma)
        w = 0.5 * (erf(t * (k + 0.5)) - erf(t * (k - 0.5)))
        w[np.abs(k) > tail] = 0.0
        axes.append(w / w.max())
    m = (axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]).astype(np.float32)
    m = np.maximum(m, m[m > 0].min())
    return torch.from_numpy(m)


# ----------------------------------------------------------------------------- predictor
class NvautoPredictor:
    """The NVAUTO ensemble; ``predict(trace_img, adc_img)`` -> float32 lesion probability (DWI grid)."""

    inputs = ("trace", "adc")
    member = "nvauto"

    def __init__(self, models, weights_sha256=None, device: str = "cpu", roi_size=ROI_SIZE,
                 overlap: float = OVERLAP, mode: str = BLEND_MODE, sigma_scale: float = SIGMA_SCALE,
                 sw_batch_size: int = SW_BATCH_SIZE, pixdim=PIXDIM, amp: bool | None = None):
        from monai.inferers import SlidingWindowInferer
        from monai.transforms import NormalizeIntensity, Spacing

        if not models:
            raise DeepIslesError("NVAUTO: no model given")
        self.models = list(models)
        self.weights_sha256 = weights_sha256
        self.device = str(device)
        self.amp = self.device.startswith("cuda") if amp is None else bool(amp and self.device.startswith("cuda"))
        self.pixdim = tuple(float(p) for p in pixdim)
        self.spacing = Spacing(pixdim=self.pixdim, mode="bilinear", padding_mode="border", align_corners=False)
        self.normalize = NormalizeIntensity(nonzero=True, channel_wise=True)
        self.inferer = SlidingWindowInferer(roi_size=tuple(int(r) for r in roi_size), sw_batch_size=int(sw_batch_size),
                                            overlap=float(overlap), mode=mode, sigma_scale=float(sigma_scale),
                                            padding_mode="constant", cval=0.0)
        if mode == "gaussian":  # the MONAI 0.9 map of the official run (see the module docstring)
            self.inferer.roi_weight_map = official_importance_map(self.inferer.roi_size, sigma_scale)
        self.last_info: dict = {}

    # -- steps, public for tests and benchmarks
    def preprocess(self, trace_img, adc_img):
        """``MetaTensor`` (2, X, Y, Z): [ADC, DWI] at 1 mm, z-scored over non-zero voxels."""
        import torch
        from monai.data import MetaTensor

        dwi = np.asarray(trace_img.dataobj, dtype=np.float32)
        adc = np.asarray(adc_img.dataobj, dtype=np.float32)
        dwi, adc = np.squeeze(dwi), np.squeeze(adc)
        if dwi.ndim != 3 or adc.shape != dwi.shape:
            raise DeepIslesError(f"NVAUTO: DWI {dwi.shape} and ADC {adc.shape} must be 3-D images of one grid")
        if not np.allclose(adc_img.affine, trace_img.affine, atol=1e-3):
            raise DeepIslesError("NVAUTO: ADC is not on the DWI grid (affines differ)")
        x = np.nan_to_num(np.stack([adc, dwi]), nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
        img = MetaTensor(torch.from_numpy(x), affine=torch.as_tensor(np.asarray(trace_img.affine, np.float64)))
        spaced = self.spacing(img)
        return self.normalize(spaced.float())

    def model_probabilities(self, model, image):
        """Softmax (2, X, Y, Z) of one model on the preprocessed 1 mm image (float32)."""
        import torch

        x = image.as_tensor().unsqueeze(0).to(self.device)
        with torch.no_grad():
            if self.amp:
                with torch.autocast("cuda", dtype=torch.float16):
                    logits = self.inferer(x, model)
            else:
                logits = self.inferer(x, model)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        if hasattr(logits, "as_tensor"):
            logits = logits.as_tensor()
        return torch.softmax(logits.float(), dim=1)[0]

    def to_native(self, probs, image):
        """Map a (C, X, Y, Z) map on the 1 mm grid of ``image`` back to the native grid (exact inverse)."""
        import copy

        from monai.data import MetaTensor

        mt = MetaTensor(probs.detach().float().cpu(), affine=image.affine.clone(),
                        applied_operations=copy.deepcopy(image.applied_operations))
        return self.spacing.inverse(mt)

    def predict(self, trace_img, adc_img) -> np.ndarray:
        import time

        t0 = time.perf_counter()
        image = self.preprocess(trace_img, adc_img)
        total = None
        for model in self.models:
            p = self.model_probabilities(model, image).cpu()
            total = p if total is None else total + p
        mean = total / len(self.models)
        native = self.to_native(mean, image)
        prob = np.ascontiguousarray(native.as_tensor()[1].numpy(), dtype=np.float32)
        self.last_info = {"grid_1mm": tuple(int(s) for s in image.shape[1:]), "models": len(self.models),
                          "amp_fp16": self.amp, "seconds": round(time.perf_counter() - t0, 3)}
        expected = tuple(np.squeeze(np.asarray(trace_img.dataobj)).shape)
        if prob.shape != expected:  # pragma: no cover - MONAI inverse always restores the shape
            raise DeepIslesError(f"NVAUTO: inverse resampling gave {prob.shape}, expected {expected}")
        return np.clip(prob, 0.0, 1.0)


def build_nvauto(weights_dir, device: str = "cpu", options: dict | None = None) -> NvautoPredictor:
    """Registry factory: verify and load the 15 models once, return the predictor.

    ``options``: ``manifest`` ({relpath: hex} or manifest file), ``sw_batch_size`` (default 1),
    ``roi_size`` / ``overlap`` (tests only; default the official 192x192x128 / 0.625), ``tta``
    (ignored: NVAUTO has no test-time augmentation).
    """
    options = dict(options or {})
    if options.get("weights"):
        raise UsageError("NVAUTO loads only NVAUTO/ts/model0..14.ts from the weights folder; "
                         "a separate weights file is refused")
    if options.get("tta"):
        log.warning("NVAUTO has no test-time augmentation; tta ignored")
    models, digests = load_models(weights_dir, device, options.get("manifest"))
    return NvautoPredictor(models, digests, device,
                           roi_size=options.get("roi_size", ROI_SIZE),
                           overlap=options.get("overlap", OVERLAP),
                           sw_batch_size=options.get("sw_batch_size", SW_BATCH_SIZE))
