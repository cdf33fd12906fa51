"""FACTORIZER (SWAN, ISLES'22 rank 3) inference: 5 Res-U-Nets + 5 Swin-Factorizers, [DWI, ADC, FLAIR].

Recipe (official ``src/FACTORIZER/predict.py`` + ``factorizer`` ``Inferer``), on the native DWI grid:

1. channels [DWI, ADC, FLAIR] (FLAIR already registered onto the DWI grid), float32, array axes in
   NIfTI voxel order (= the official SimpleITK array transposed to x, y, z);
2. each channel z-scored over its non-zero voxels (population std; zeros stay 0; MONAI
   ``NormalizeIntensity(nonzero=True, channel_wise=True)``) at native resolution;
3. resized to 2 mm with ``F.interpolate(trilinear, align_corners=False)`` to
   ``round(n * spacing / 2)`` voxels per axis (float32, round half to even like ``torch.round``);
   skipped when the spacing is already 2 mm (``torch.allclose`` tolerances);
4. MONAI ``SlidingWindowInferer(roi 64^3, overlap 0.5, mode constant, sw_batch_size 1)`` over the
   ensemble: every window goes through the 10 models (head 0 logits) and the mean is taken;
5. resized back to the native size (trilinear, ``align_corners=False``);
6. the official ensemble multiplies each logit by 0.1 before the mean, which only rescales; the
   decision is ``mean logit >= 0``. Here ``probability = sigmoid(mean logit)`` (without the 0.1), so
   that ``prob >= 0.5`` <=> ``mean logit >= 0`` (the official decision).

Dropout at inference (the official quirk): the official code never calls ``eval()``, so the
Swin-Factorizer dropouts (p = 0.1: adapters, positional embedding, nmf and mlp sub-blocks) are
active at inference, and the Res-U-Nets are unaffected (GroupNorm has no running statistics,
their dropouts have p = 0). **Default: faithful** (``options['dropout_at_inference']`` True): the
Swin-Factorizers run in train mode, with dropout masks drawn from a private ``torch.Generator``
seeded with ``options['seed']`` (default 42) at the start of every ``predict`` call: the result is
reproducible for a given seed on the CPU (independent of the thread count and of the caller's
global RNG), but not bit-identical to the official GPU run (different RNG stream) -- compare with a
tolerance. ``options['dropout_at_inference'] = False`` puts every model in eval mode (deterministic
and slightly smoother; not what the official pipeline computes).

Checksums: each checkpoint's SHA-256 is computed on the bytes that are then deserialised; with
``options['manifest']`` (a ``{relpath: sha256}`` dict or a manifest file readable by
:func:`models.weights.load_checksum_manifest`) a mismatch or a missing entry stops the build;
without it the digests are only recorded (``weights_sha256``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from bids_app.errors import DeepIslesError, InputError, WeightsError

log = logging.getLogger("deepisles.models.factorizer")

ROOT = "FACTORIZER/logs/isles2022_dwi-adc-flair"
CKPT = "version_0/checkpoints/epoch=1999-step=99999.ckpt"
#: the 10 checkpoints, in the official ensemble order (5 Res-U-Nets, then 5 Swin-Factorizers)
FACTORIZER_FILES = tuple(f"{ROOT}/fold{k}/resunet/{CKPT}" for k in range(5)) + tuple(
    f"{ROOT}/fold{k}/swin-factorizer/{CKPT}" for k in range(5))
TARGET_SPACING = 2.0
ROI = 64
OVERLAP = 0.5
SEED = 42


# ----------------------------------------------------------------------------- recipe pieces
def zscore_nonzero(data: np.ndarray) -> np.ndarray:
    """z-score over the non-zero voxels (population std; std 0 -> 1); zeros stay 0; float32."""
    data = np.asarray(data, dtype=np.float32)
    out = data.copy()
    mask = data != 0
    if mask.any():
        vals = data[mask].astype(np.float64)
        mean, std = vals.mean(), vals.std()
        out[mask] = ((vals - mean) / (std if std > 0 else 1.0)).astype(np.float32)
    return out


def resampled_size(shape: Sequence[int], spacing: Sequence[float], target: float = TARGET_SPACING):
    """``round(n * s / target)`` per axis in float32 (``None`` when the spacing is already ``target``)."""
    sp = np.asarray(spacing, dtype=np.float32)
    tgt = np.full(sp.shape, target, dtype=np.float32)
    if np.allclose(sp, tgt, rtol=1e-5, atol=1e-8):
        return None
    size = np.round(np.asarray(shape, dtype=np.float32) * sp / tgt).astype(int)
    return tuple(max(1, int(n)) for n in size)


class _Ensemble:
    """Callable for the sliding window: mean of the head-0 logits of the models."""

    def __init__(self, nets):
        self.nets = list(nets)

    def __call__(self, x):
        total = None
        for net in self.nets:
            out = net(x)
            out = out[0] if isinstance(out, (list, tuple)) else out
            total = out if total is None else total + out
        return total / len(self.nets)


class FactorizerPredictor:
    """The FACTORIZER member: ``predict(trace, adc, flair) -> float32 probability`` on the DWI grid."""

    recommended_min_lesion_ml = None

    def __init__(self, nets: Sequence, names: Sequence[str] | None = None, weights_sha256=None,
                 device: str = "cpu", dropout_at_inference: bool = True, seed: int = SEED,
                 sw_batch_size: int = 1):
        import torch

        from models.factorizer.swin_factorizer import SwinFactorizer

        if not nets:
            raise WeightsError("FACTORIZER: no model to run")
        self.device = torch.device(device)
        self.nets = [net.to(self.device) for net in nets]
        self.names = list(names) if names is not None else [type(n).__name__ for n in nets]
        self.weights_sha256 = weights_sha256
        self.dropout_at_inference = bool(dropout_at_inference)
        self.seed = int(seed)
        self.sw_batch_size = int(sw_batch_size)
        for net in self.nets:
            for p in net.parameters():
                p.requires_grad_(False)
            # faithful: the official modules stay in train mode (only the Swin dropouts matter)
            net.train(self.dropout_at_inference and isinstance(net, SwinFactorizer))

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _array(img, what):
        data = np.asarray(img.dataobj, dtype=np.float32) if hasattr(img, "dataobj") else np.asarray(img, np.float32)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise InputError(getattr(img, "get_filename", lambda: what)() or what,
                             f"FACTORIZER needs a 3-D {what}, got shape {data.shape}")
        return data

    def _inputs(self, trace, adc, flair):
        arrays = [self._array(i, w) for i, w in ((trace, "DWI"), (adc, "ADC"), (flair, "FLAIR"))]
        ref = arrays[0].shape
        for a, w in zip(arrays[1:], ("ADC", "FLAIR")):
            if a.shape != ref:
                raise DeepIslesError(f"FACTORIZER: {w} shape {a.shape} differs from the DWI shape {ref}; "
                                     "all channels must be on the DWI grid")
        if hasattr(trace, "affine"):
            for img, w in ((adc, "ADC"), (flair, "FLAIR")):
                if hasattr(img, "affine") and not np.allclose(img.affine, trace.affine, atol=1e-3):
                    raise DeepIslesError(f"FACTORIZER: the {w} affine differs from the DWI affine; "
                                         "register/conform it onto the DWI grid first")
            spacing = tuple(float(z) for z in trace.header.get_zooms()[:3])
        else:
            spacing = (TARGET_SPACING,) * 3
        return np.stack([zscore_nonzero(a) for a in arrays]), spacing

    # ------------------------------------------------------------------ inference
    def predict_logits(self, trace, adc, flair) -> np.ndarray:
        """Mean head-0 logit of the ensemble on the native grid (float32)."""
        import torch
        import torch.nn.functional as F
        from monai.inferers import SlidingWindowInferer

        from models.factorizer.swin_factorizer import attach_generator

        image, spacing = self._inputs(trace, adc, flair)
        native = image.shape[1:]
        x = torch.from_numpy(image)[None].to(self.device)
        size = resampled_size(native, spacing)
        if size is not None:
            x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed)
        for net in self.nets:
            attach_generator(net, gen if self.dropout_at_inference else None)
        inferer = SlidingWindowInferer(roi_size=(ROI,) * 3, sw_batch_size=self.sw_batch_size, overlap=OVERLAP,
                                       mode="constant", padding_mode="constant", cval=0.0, progress=False)
        try:
            with torch.inference_mode():
                logits = inferer(x, _Ensemble(self.nets))
                if size is not None:
                    logits = F.interpolate(logits, size=tuple(native), mode="trilinear", align_corners=False)
        finally:
            for net in self.nets:
                attach_generator(net, None)
        return logits[0, 0].float().cpu().numpy()

    def predict(self, trace, adc, flair) -> np.ndarray:
        """Lesion probability ``sigmoid(mean logit)`` (float32, DWI grid)."""
        logits = self.predict_logits(trace, adc, flair)
        return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)


# ----------------------------------------------------------------------------- building
def _manifest(options) -> dict | None:
    from models.weights import _norm_rel, load_checksum_manifest

    man = (options or {}).get("manifest")
    if man is None or man == "":
        return None
    if isinstance(man, dict):
        return {_norm_rel(k): str(v).strip().lower() for k, v in man.items()}
    return load_checksum_manifest(man)


def load_models(weights_dir, files: Sequence[str] = FACTORIZER_FILES, manifest: dict | None = None):
    """``(nets, names, {relpath: sha256}, {relpath: (arch, widths)})`` for the given checkpoint files."""
    from models.factorizer.checkpoint import build_network, net_state_dict, read_checkpoint
    from models.weights import require_files

    if weights_dir is None:
        raise WeightsError("FACTORIZER: no weights folder given")
    weights_dir = Path(weights_dir)
    require_files(weights_dir, files, what="FACTORIZER weights")
    if manifest is not None:
        absent = [rel for rel in files if rel not in manifest]
        if absent:
            raise WeightsError(f"FACTORIZER: checksum manifest has no entry for: {', '.join(absent[:3])}")
    nets, names, shas, archs = [], [], {}, {}
    for rel in files:
        path = weights_dir / rel
        ckpt, sha = read_checkpoint(path, manifest.get(rel) if manifest is not None else None)
        sd = net_state_dict(ckpt, str(path))
        net, arch, widths = build_network(sd, str(path))
        expected = "swin-factorizer" if "/swin-factorizer/" in rel else "resunet" if "/resunet/" in rel else arch
        if arch != expected:
            raise WeightsError(f"{path}: holds a {arch} state dict, expected a {expected}")
        nets.append(net)
        names.append(rel)
        shas[rel] = sha
        archs[rel] = (arch, widths)
        del ckpt, sd
    return nets, names, shas, archs


def build_factorizer(weights_dir, device: str = "cpu", options: dict | None = None) -> FactorizerPredictor:
    """Registry factory: load, verify and wrap the 10 official checkpoints.

    options: ``dropout_at_inference`` (default True = faithful), ``seed`` (42), ``manifest``
    ({relpath: sha256} or a manifest file), ``sw_batch_size`` (1). Other keys (``tta``, ``weights``)
    are ignored: the official member has no test-time augmentation.
    """
    from models.factorizer.resunet import OFFICIAL_WIDTHS

    options = dict(options or {})
    if options.get("tta"):
        log.warning("FACTORIZER has no test-time augmentation in the official recipe; tta ignored")
    nets, names, shas, archs = load_models(weights_dir, FACTORIZER_FILES, _manifest(options))
    odd = sorted({w for _, w in archs.values() if w != OFFICIAL_WIDTHS})
    if odd:
        log.warning("FACTORIZER checkpoints with non-official widths %s (not the released weights)", odd)
    pred = FactorizerPredictor(nets, names, shas, device=device,
                               dropout_at_inference=bool(options.get("dropout_at_inference", True)),
                               seed=int(options.get("seed", SEED)),
                               sw_batch_size=int(options.get("sw_batch_size", 1)))
    pred.architectures = archs
    return pred


def factorizer_checksums(weights_dir) -> dict | None:
    """``{relpath: sha256}`` of the FACTORIZER checkpoints present under ``weights_dir`` (None if none)."""
    from models.weights import sha256_file

    if weights_dir is None:
        return None
    root = Path(weights_dir)
    out = {rel: sha256_file(root / rel) for rel in FACTORIZER_FILES if (root / rel).is_file()}
    return out or None
