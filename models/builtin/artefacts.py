"""Unlabelled EPI artefacts for the synthetic generator.

``susceptibility_pileup``: near air and bone (frontal sinus, mastoid air cells, skull base) the
echo-planar b~1000 image piles signal up into a bright band along the brain surface, a few
millimetres deep, often on both temporal poles at once; its ADC is roughly normal, sometimes a
little low. It is not a lesion. The band is a depth profile ``exp(-(depth - 1) / lam)`` below the
brain surface (depth in voxels, by repeated 26-neighbour erosion), confined to one or a few smooth
regions, mirrored across the midline in half the cases.

With ``low_adc=P`` (0 by default, the generator of releases 1-4) a share P of pile-ups are the
pseudo-restricted kind: where the b=0 and b=1000 images are distorted differently (eddy currents,
susceptibility at the skull base) the computed ADC in the band is low too (0.5-0.8x), and the band can
peak a few voxels under the mask edge (the cortex under the surface CSF), always at one of ``SITES``.
A bright, low-ADC spot there is still not a lesion.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .fields import blur

MAX_DEPTH = 8
# typical sites in the generator's RAS-normalised coordinates (x, y, z ranges), chosen 70 % of the time
SITES = (
    ((0.35, 0.65), (0.85, 1.0), (0.15, 0.55)),  # frontal pole / orbitofrontal
    ((0.12, 0.35), (0.55, 0.8), (0.05, 0.35)),  # temporal pole (mirrored for the other side)
    ((0.3, 0.7), (0.0, 0.18), (0.15, 0.6)),     # occipital pole
)


def surface_depth(brain_soft: torch.Tensor, max_depth: int = MAX_DEPTH) -> torch.Tensor:
    """Depth of each brain voxel below the surface, in voxels (1 = outermost layer, 0 = outside)."""
    inside = (brain_soft > 0.5).float()[None, None]
    depth = torch.zeros_like(inside)
    for _ in range(max_depth):
        depth += inside
        inside = -F.max_pool3d(-inside, 3, 1, 1)
    return depth[0, 0]


def susceptibility_pileup(rng, brain_soft: torch.Tensor, vox: torch.Tensor, dwi: torch.Tensor,
                          adc: torch.Tensor, low_adc: float = 0.0) -> None:
    """Add one susceptibility pile-up artefact to ``dwi`` / ``adc`` in place (unlabelled).

    ``low_adc``: probability that it is the pseudo-restricted kind (low ADC too, peak 1-4 voxels deep).
    """
    fov = brain_soft.shape
    restricted = low_adc > 0 and rng.random() < low_adc  # no draw at 0: earlier recipes reproduce
    x, y, z = (vox[i] / (fov[i] - 1) for i in range(3))
    loc = torch.zeros(fov, device=brain_soft.device)
    for _ in range(rng.choice([1, 1, 2, 3])):
        if restricted or rng.random() < 0.7:
            (x0, x1), (y0, y1), (z0, z1) = rng.choice(SITES)
            xc, yc, zc = rng.uniform(x0, x1), rng.uniform(y0, y1), rng.uniform(z0, z1)
        else:
            xc, yc, zc = rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.6)
        w = rng.uniform(0.06, 0.2)
        centres = [xc, 1.0 - xc] if rng.random() < 0.5 else [xc]
        for xm in centres:
            loc = torch.maximum(loc, torch.exp(-((x - xm) ** 2 + (y - yc) ** 2 + (z - zc) ** 2) / (2 * w ** 2)))
    depth = surface_depth(brain_soft)
    lam = rng.uniform(0.6, 3.0)
    peak = rng.uniform(1.0, 4.0) if restricted else 1.0
    band = torch.where(depth > 0, torch.exp(-(depth - peak).abs() / lam), torch.zeros_like(depth)) * brain_soft
    band = blur((band * loc)[None, None], [rng.uniform(0.3, 1.2)] * 3)[0, 0]
    dwi.mul_(1 + band * math.exp(rng.uniform(math.log(0.4), math.log(3.5))))
    adc.mul_(1 + band * (rng.uniform(-0.5, -0.2) if restricted else rng.uniform(-0.3, 0.3)))
