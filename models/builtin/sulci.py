"""Sulcal CSF for the synthetic generator's anatomy.

The MNI152 template is a population average: most sulci are blurred away, so synthetic cortex is
smooth while a patient's cortex is cut by CSF-filled sulci every centimetre or so (bright on ADC,
dark on trace). Real images are therefore far more textured (``texture_stats.py``): the median ADC
gradient in the brain is 0.28 (1e-3 mm2/s per voxel) on the ISLES'22 sample case against 0.13 over 16
volumes of the generator without sulci, 0.19 with sulci in every volume.

``carve_sulci`` cuts thin CSF sheets into the cortical ribbon: the near-zero level set of a smooth
random field (spacing ~8-12 mm), restricted to grey matter in the outer ``MAX_DEPTH`` voxels of the
brain, so deep grey nuclei and white-matter cores keep their tissue.
"""

from __future__ import annotations

import torch

from .artefacts import surface_depth
from .fields import smooth_noise

MAX_DEPTH = 7  # voxels (14 mm at 2 mm): sulci reach 1-3 cm into the brain


def carve_sulci(rng, gen, gm: torch.Tensor, wm: torch.Tensor, csf: torch.Tensor):
    """Return ``(gm, wm, csf)`` with CSF sheets cut into the cortex; tissue fractions still sum as before."""
    fov = tuple(gm.shape)
    spacing = rng.uniform(3.5, 5.5)  # voxels between control points of the random field
    ctrl = tuple(max(4, int(round(n / spacing))) for n in fov)
    field = smooth_noise(gen, fov, ctrl, 1, gm.device)[0, 0]
    field = field / field.std().clamp(min=1e-6)
    width = rng.uniform(0.15, 0.4)  # sheet half-width in units of the field's s.d.
    sheet = torch.exp(-(field / width) ** 2)
    depth = surface_depth(torch.clamp(gm + wm + csf, 0, 1), MAX_DEPTH + 1)  # deeper voxels: MAX_DEPTH + 1
    ribbon = ((depth > 0) & (depth <= MAX_DEPTH)).float()
    cortex = torch.clamp(1.5 * gm / torch.clamp(gm + wm, min=1e-4), 0, 1)  # grey matter's share, boosted
    cut = torch.clamp(sheet * ribbon * cortex * rng.uniform(0.7, 1.0), 0, 1)
    return gm * (1 - cut), wm * (1 - cut), csf + (gm + wm) * cut
