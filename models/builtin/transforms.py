"""Intensity normalisation of the built-in model (shared by inference and the training generator) and
the training crop."""

from __future__ import annotations

import random

import numpy as np

DWI_CLIP = 8.0
ADC_CLIP = 4.0  # in 1e-3 mm2/s


def normalize_channels(trace: np.ndarray, adc: np.ndarray, brain: np.ndarray):
    """Return ``(dwi_n, adc_n)`` float32 arrays, zero outside the brain.

    - ``dwi_n``: trace divided by its median inside the brain (scanner-independent scale), clipped to
      ``[0, DWI_CLIP]``.
    - ``adc_n``: ADC in 1e-3 mm2/s (already harmonised), clipped to ``[0, ADC_CLIP]``; kept in physical
      units because the absolute ADC drop is the most specific sign of acute ischaemia.
    """
    brain = np.asarray(brain) > 0
    trace = np.nan_to_num(np.asarray(trace, dtype=np.float32))
    adc = np.nan_to_num(np.asarray(adc, dtype=np.float32))
    inside = trace[brain & (trace > 0)]
    scale = float(np.median(inside)) if inside.size else 1.0
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0
    dwi_n = np.clip(trace / scale, 0.0, DWI_CLIP) * brain
    adc_n = np.clip(adc, 0.0, ADC_CLIP) * brain
    return dwi_n.astype(np.float32), adc_n.astype(np.float32)


def normalize_channels_torch(trace, adc, brain):
    """Torch twin of :func:`normalize_channels` (same maths, any device), used by the training generator.

    ``trace``, ``adc``, ``brain``: tensors of one volume (any shape). Returns ``(dwi_n, adc_n)`` float32.
    The median is ``torch.quantile(.., 0.5)`` (linear interpolation), which equals ``numpy.median``.
    """
    import torch

    brain = brain > 0
    trace = torch.nan_to_num(trace.float())
    adc = torch.nan_to_num(adc.float())
    inside = trace[brain & (trace > 0)]
    if inside.numel():
        if inside.numel() > 8_000_000:  # quantile's input size limit; sorting gives the same value
            s = torch.sort(inside).values
            n = s.numel()
            scale = 0.5 * (s[(n - 1) // 2] + s[n // 2])
        else:
            scale = torch.quantile(inside, 0.5)
        scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    else:
        scale = torch.ones((), device=trace.device)
    b = brain.float()
    dwi_n = torch.clamp(trace / scale, 0.0, DWI_CLIP) * b
    adc_n = torch.clamp(adc, 0.0, ADC_CLIP) * b
    return dwi_n, adc_n


def crop_origins(x, y, patch, seed: int, p_lesion=0.7) -> list:
    """Origins of :func:`random_crop`'s windows: centred on a lesion voxel with ``p_lesion`` (else a brain
    voxel), jittered by up to a quarter window, kept inside the volume."""
    import torch

    rng = random.Random(int(seed))
    fov = x.shape[2:]
    origins = []
    for i in range(x.shape[0]):
        pool = torch.nonzero(y[i, 0] > 0) if rng.random() < p_lesion else torch.empty(0)
        if pool.numel() == 0:
            pool = torch.nonzero(x[i, 1] > 0)
        if pool.numel():
            c = pool[int(rng.random() * pool.shape[0]) % pool.shape[0]].tolist()
        else:
            c = [n // 2 for n in fov]
        lo = []
        for ax in range(3):
            c_ax = c[ax] + rng.randint(-patch[ax] // 4, patch[ax] // 4)
            lo.append(min(max(0, c_ax - patch[ax] // 2), fov[ax] - patch[ax]))
        origins.append(lo)
    return origins


def _window(lo, patch):
    return (slice(None),) + tuple(slice(a, a + p) for a, p in zip(lo, patch))


def random_crop(x, y, patch, seed: int, p_lesion=0.7):
    """Crop ``patch`` (3 ints) from each volume of (x, y) at :func:`crop_origins`."""
    import torch

    if tuple(patch) == tuple(x.shape[2:]):
        return x, y
    origins = crop_origins(x, y, patch, seed, p_lesion)
    return (torch.stack([x[i][_window(lo, patch)] for i, lo in enumerate(origins)]),
            torch.stack([y[i][_window(lo, patch)] for i, lo in enumerate(origins)]))


def shifted_pair_crop(x, y, patch, seed: int, max_shift: int, p_lesion=0.7):
    """Crops in pairs for the shift-consistency term (``loss.shift_consistency``): crops ``2j`` and
    ``2j + 1`` both come from volume ``2j`` (``x`` holds each volume twice, as ``--crops-per-volume 2``
    makes it); the first is :func:`random_crop`'s window, the second that window moved by a random
    ``[-max_shift, max_shift]`` voxels per axis, zero beyond the volume (as the app zero-fills beyond the
    brain box). Returns ``(x, y, overlaps)``, ``overlaps[j]`` = the slices of crop ``2j`` and of crop
    ``2j + 1`` that hold the same voxels."""
    import torch
    import torch.nn.functional as F

    m = int(max_shift)
    firsts = x[0::2]
    origins = crop_origins(firsts, y[0::2], patch, seed, p_lesion)
    rng = random.Random(int(seed) ^ 0x5EED)
    xs, ys, overlaps = [], [], []
    for j, lo in enumerate(origins):
        d = [rng.randint(-m, m) for _ in range(3)]
        xp, yp = F.pad(firsts[j], (m,) * 6), F.pad(y[2 * j], (m,) * 6)
        moved = [a + m + k for a, k in zip(lo, d)]
        xs += [firsts[j][_window(lo, patch)], xp[_window(moved, patch)]]
        ys += [y[2 * j][_window(lo, patch)], yp[_window(moved, patch)]]
        overlaps.append((tuple(slice(max(0, k), p + min(0, k)) for k, p in zip(d, patch)),
                         tuple(slice(max(0, -k), p - max(0, k)) for k, p in zip(d, patch))))
    return torch.stack(xs), torch.stack(ys), overlaps
