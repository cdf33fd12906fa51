"""Seeded, device-agnostic (CPU/CUDA) generator of synthetic [DWI, ADC] + lesion-mask training pairs.

Everything is made with torch ops on the requested device (``grid_sample`` for the spatial warps,
separable ``conv3d`` for blurs), on a 2 mm RAS grid of ``FOV`` voxels (whole brain):

- anatomy: the MNI152 2009a GM/WM/CSF atlas (``atlas/mni152_tissue_1p5mm.npz``) under a random affine
  (rotation, anisotropic scale, shear, translation) and a smooth elastic deformation; with
  ``sulci=P`` (off by default, as for releases 1-4) a share P of volumes get CSF sheets cut into the
  cortical ribbon (``sulci.py``), the sulci the population template blurs away; with ``texture=P`` (off
  by default) a share P of volumes get sharpened tissue shares (``sharpen_tissues``), 0.3-2 voxels of
  atrophy instead of 0-1.3 and ADC noise s.d. 0.05-0.16 instead of 0.01-0.08: older patients' pure CSF;
- contrasts: tissue-dependent trace DWI (b~1000; GM a bit brighter than WM, CSF dark) and ADC in
  1e-3 mm2/s (WM ~0.7, GM ~0.85, CSF ~2.2-3.3), all randomised, with smooth texture;
- lesions: expert ISLES'22 shapes (``shapes/``; flipped, axis-permuted, scaled), smooth irregular blobs
  and clusters of tiny emboli, from one 2 mm voxel to territorial (> 50 ml), bright on DWI and dark on
  ADC with varied contrast, heterogeneity and edge sharpness; ~12 % of volumes have none; with
  ``cortical=P`` (off by default, as for releases 1-5) a share P of volumes have their lesions centred
  in the cortical ribbon, kept down to 30 % tissue share (``cortical_support``) instead of 60 %;
- negatives (not labelled): T2 shine-through / chronic lesions (bright or dark DWI with normal or high
  ADC), susceptibility pile-up (``artefacts.py``: a bright band a few mm under the brain surface at
  the frontal, temporal or occipital poles, often bilateral; with ``pileup_low_adc=P`` a share P of
  them with low ADC too, the pseudo-restricted kind), low-ADC
  patches without bright trace (short-T2 tissue), plus the CSF;
- degradation: partial-volume blur, thick slices (2.5-6 mm along a random axis, blur + down + upsampling),
  Rician noise on DWI, Gaussian noise on ADC, bias field, random DWI scale, then in half the volumes
  1-2 trilinear re-griddings under a small rigid motion (the interpolation blur of oblique or
  anisotropic scans), brain-mask edge variation;
- then ``transforms.normalize_channels_torch`` (the torch twin of what inference applies).

Labels: the soft lesion map undergoes the same blur / slice degradation, then ``labels.LABEL_RULES``
(``threshold``: > 0.5; ``visible``: also the core of small lesions still visible after degradation).
Same ``seed`` -> same tensors (on the same device type).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .artefacts import susceptibility_pileup
from .fields import blur, smooth_noise
from .labels import LABEL_RULES
from .sulci import carve_sulci
from .tissue import cortical_ribbon, cortical_support, infratentorial, sharpen_tissues
from .transforms import normalize_channels_torch

HERE = Path(__file__).resolve().parent
ATLAS = HERE / "atlas" / "mni152_tissue_1p5mm.npz"
SHAPES = HERE / "shapes"
# optional shares (0 = releases 1-4): in sidecars, read by generator_for, flags from add_generator_arguments
GENERATOR_OPTIONS = {
    "sulci": "probability of sulcal CSF per volume (sulci.py)",
    "texture": "probability of sharp tissue edges, older brains' CSF and clinical ADC noise per volume",
    "pileup_low_adc": "share of susceptibility pile-ups with low ADC too, the pseudo-restricted kind (artefacts.py)",
    "cortical": "share of volumes with lesions in the cortical ribbon, down to 30 %% tissue (tissue.py)",
}
FOV = (88, 104, 88)  # 176 x 208 x 176 mm at 2 mm
VOXEL_MM = 2.0


class SynthGenerator:
    def __init__(self, device="cpu", fov=FOV, atlas_path=ATLAS, shapes_dir=SHAPES, label_rule="threshold",
                 sulci: float = 0.0, texture: float = 0.0, pileup_low_adc: float = 0.0, cortical: float = 0.0):
        self.device = torch.device(device)
        self.sulci = float(sulci)  # probability of sulcal CSF per volume; 0 = the generator of releases 1-4
        self.texture = float(texture)  # probability of sharp tissue edges + clinical ADC noise; 0 = releases 1-4
        self.pileup_low_adc = float(pileup_low_adc)  # share of pile-ups with low ADC too; 0 = releases 1-4
        self.cortical = float(cortical)  # share of volumes with lesions in the cortical ribbon; 0 = releases 1-5
        self.label_rule = LABEL_RULES[label_rule]
        self.label_rule_name = label_rule
        self.fov = tuple(fov)
        d = np.load(atlas_path)
        self.atlas = torch.from_numpy(d["tissue"].astype(np.float32) / 255.0)[None].to(self.device)
        self.atlas_aff = np.asarray(d["affine"], dtype=np.float64)
        ashape = np.array(self.atlas.shape[2:])
        # brain centre of the atlas in mm
        self.center_mm = (self.atlas_aff @ np.r_[(ashape - 1) / 2.0, 1.0])[:3]
        self.templates = self._load_shapes(shapes_dir)
        # output voxel centres in mm relative to the FOV centre, (D, H, W, 3)
        axes = [(torch.arange(n, dtype=torch.float32) - (n - 1) / 2.0) * VOXEL_MM for n in self.fov]
        self.grid_mm = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).to(self.device)
        self.vox = torch.stack(
            torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in self.fov], indexing="ij"), 0
        ).to(self.device)

    def _load_shapes(self, shapes_dir):
        out = []
        import nibabel as nib

        from .metrics import label26

        for f in sorted(Path(shapes_dir).glob("*.nii*")):
            m = np.asarray(nib.load(str(f)).dataobj) > 0
            if not m.any():
                continue
            pieces = [m]
            lab, n = label26(m)
            sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
            for i in np.argsort(sizes)[::-1][:4]:
                if sizes[i] >= 8:
                    pieces.append(lab == i + 1)
            for p in pieces:
                nz = np.argwhere(p)
                lo, hi = nz.min(0), nz.max(0) + 1
                crop = p[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.float32)
                out.append(torch.from_numpy(np.pad(crop, 2)).to(self.device))
        return out

    # ------------------------------------------------------------------ anatomy
    def _warp_grid(self, rng: random.Random, gen):
        rot = _rot([math.radians(rng.uniform(-15, 15)) for _ in range(3)])
        scale = np.diag([rng.uniform(1.02, 1.25) for _ in range(3)])  # atlas mm per output mm
        shear = np.eye(3)
        for i, j in ((0, 1), (0, 2), (1, 2)):
            shear[i, j] = rng.uniform(-0.06, 0.06)
        a = rot @ shear @ scale
        if rng.random() < 0.5:  # left-right flip
            a = a @ np.diag([-1.0, 1.0, 1.0])
        t = self.center_mm + np.array([rng.uniform(-8, 8) for _ in range(3)])
        a_t = torch.tensor(a, dtype=torch.float32, device=self.device)
        p = self.grid_mm
        amp = rng.uniform(0.0, 4.0)  # elastic displacement (mm)
        if amp > 0:
            disp = smooth_noise(gen, self.fov, (5, 6, 5), 3, self.device)[0].permute(1, 2, 3, 0) * amp
            p = p + disp
        q = p @ a_t.T + torch.tensor(t, dtype=torch.float32, device=self.device)
        inv = torch.tensor(np.linalg.inv(self.atlas_aff), dtype=torch.float32, device=self.device)
        ijk = q @ inv[:3, :3].T + inv[:3, 3]
        shp = torch.tensor(self.atlas.shape[2:], dtype=torch.float32, device=self.device)
        norm = ijk / (shp - 1) * 2 - 1
        return norm.flip(-1)[None], q  # grid_sample wants (x=W, y=H, z=D); q: MNI mm per voxel

    # ------------------------------------------------------------------ lesions
    def _centre(self, rng, cand):
        i = int(rng.random() * cand.shape[0])
        return cand[min(i, cand.shape[0] - 1)].tolist()

    def _box(self, c, half):
        sl, lo = [], []
        for ax in range(3):
            a = max(0, int(c[ax] - half[ax]))
            b = min(self.fov[ax], int(c[ax] + half[ax]) + 1)
            sl.append(slice(a, b))
            lo.append(a)
        return tuple(sl)

    def _ellipsoid(self, rng, gen, field, c, radii, sharp, irregular):
        half = [r * 1.6 + 3 for r in radii]
        sl = self._box(c, half)
        v = self.vox[(slice(None),) + sl]
        if v[0].numel() == 0:
            return
        ang = [rng.uniform(0, 2 * math.pi) for _ in range(3)]
        rot = torch.tensor(
            _rot(ang), dtype=torch.float32, device=self.device
        )
        d = (v - torch.tensor(c, dtype=torch.float32, device=self.device).view(3, 1, 1, 1))
        d = torch.einsum("ij,jxyz->ixyz", rot, d)
        d = d / torch.tensor(radii, dtype=torch.float32, device=self.device).view(3, 1, 1, 1)
        r = torch.sqrt((d ** 2).sum(0))
        val = 1 - r
        if irregular > 0:
            val = val + irregular * smooth_noise(gen, v.shape[1:], (4, 4, 4), 1, self.device)[0, 0]
        val = torch.sigmoid(val / sharp)
        field[sl] = torch.maximum(field[sl], val)

    def _paste_shape(self, rng, field, c):
        t = self.templates[int(rng.random() * len(self.templates)) % len(self.templates)]
        perm = list(range(3))
        rng.shuffle(perm)
        t = t.permute(*perm)
        flips = [ax for ax in range(3) if rng.random() < 0.5]
        if flips:
            t = t.flip(flips)
        s = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        size = [max(1, int(round(n * s * rng.uniform(0.85, 1.15)))) for n in t.shape]
        t = F.interpolate(t[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
        lo = [int(c[ax] - size[ax] // 2) for ax in range(3)]
        src, dst = [], []
        for ax in range(3):
            a, b = max(0, lo[ax]), min(self.fov[ax], lo[ax] + size[ax])
            if b <= a:
                return
            dst.append(slice(a, b))
            src.append(slice(a - lo[ax], b - lo[ax]))
        field[tuple(dst)] = torch.maximum(field[tuple(dst)], t[tuple(src)])

    def _lesions(self, rng, gen, cand):
        """Soft lesion map (D, H, W) in [0, 1]."""
        field = torch.zeros(self.fov, device=self.device)
        if rng.random() < 0.12 or cand.shape[0] == 0:
            return field
        n_events = rng.choice([1, 1, 2, 2, 3, 4])
        for _ in range(n_events):
            kind = rng.random()
            c = self._centre(rng, cand)
            if kind < 0.3 and self.templates:
                self._paste_shape(rng, field, c)
            elif kind < 0.6:
                r0 = math.exp(rng.uniform(math.log(0.6), math.log(14.0)))
                radii = [r0 * rng.uniform(0.6, 1.4) for _ in range(3)]
                self._ellipsoid(rng, gen, field, c, radii, rng.uniform(0.03, 0.15),
                                rng.uniform(0.0, 0.5) if r0 > 2 else 0.0)
            else:  # cluster of emboli
                spread = rng.uniform(4, 22)
                for _ in range(rng.randint(3, 30)):
                    cc = [c[ax] + rng.gauss(0, spread / 2) for ax in range(3)]
                    r0 = math.exp(rng.uniform(math.log(0.5), math.log(2.5)))
                    radii = [r0 * rng.uniform(0.7, 1.3) for _ in range(3)]
                    self._ellipsoid(rng, gen, field, cc, radii, rng.uniform(0.03, 0.12), 0.0)
        return field

    def _negatives(self, rng, gen, cand, brain_soft, dwi, adc):
        """Unlabelled look-alikes, applied in place."""
        if cand.shape[0] and rng.random() < 0.35:  # T2 shine-through / chronic lesions
            f = torch.zeros(self.fov, device=self.device)
            for _ in range(rng.randint(1, 4)):
                r0 = math.exp(rng.uniform(math.log(1.0), math.log(10.0)))
                self._ellipsoid(rng, gen, f, self._centre(rng, cand),
                                [r0 * rng.uniform(0.6, 1.4) for _ in range(3)], rng.uniform(0.05, 0.3), 0.3)
            if rng.random() < 0.6:  # shine-through: bright DWI, normal / high ADC
                dwi.mul_(1 + f * rng.uniform(0.3, 1.5))
                adc.mul_(1 + f * rng.uniform(0.0, 0.7))
            else:  # chronic: dark-ish DWI, high ADC
                dwi.mul_(1 - f * rng.uniform(0.0, 0.5))
                adc.mul_(1 + f * rng.uniform(0.6, 2.0))
        if rng.random() < 0.5:  # regional DWI hyperintensity with NORMAL ADC (posterior fossa, brainstem,
            # cortex at b=1000, coil inhomogeneity): bright trace alone is not a lesion
            z = self.vox[2] / (self.fov[2] - 1)
            y = self.vox[1] / (self.fov[1] - 1)
            x = self.vox[0] / (self.fov[0] - 1)
            if rng.random() < 0.6:
                zc, yc, xc = rng.uniform(0.0, 0.35), rng.uniform(0.1, 0.5), rng.uniform(0.2, 0.8)
            else:
                zc, yc, xc = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9)
            w = rng.uniform(0.06, 0.2)
            reg = torch.exp(-((z - zc) ** 2 + (y - yc) ** 2 + (x - xc) ** 2) / (2 * w ** 2))
            dwi.mul_(1 + reg * rng.uniform(0.2, 0.9))
            adc.mul_(1 + reg * rng.uniform(-0.1, 0.2))
        if cand.shape[0] and rng.random() < 0.5:  # bright-DWI blobs with normal ADC
            f = torch.zeros(self.fov, device=self.device)
            for _ in range(rng.randint(1, 6)):
                r0 = math.exp(rng.uniform(math.log(0.6), math.log(8.0)))
                self._ellipsoid(rng, gen, f, self._centre(rng, cand),
                                [r0 * rng.uniform(0.6, 1.4) for _ in range(3)], rng.uniform(0.03, 0.2), 0.2)
            dwi.mul_(1 + f * rng.uniform(0.3, 2.0))
            adc.mul_(1 + f * rng.uniform(-0.05, 0.3))
        if rng.random() < 0.6:  # susceptibility pile-up: bright band under the brain surface
            susceptibility_pileup(rng, brain_soft, self.vox, dwi, adc, self.pileup_low_adc)
        if cand.shape[0] and rng.random() < 0.5:  # low ADC WITHOUT bright trace (short-T2 tissue such as
            # iron-rich deep grey nuclei, tract anisotropy): a low ADC alone is not a lesion
            f = torch.zeros(self.fov, device=self.device)
            for _ in range(rng.randint(1, 8)):
                r0 = math.exp(rng.uniform(math.log(0.6), math.log(6.0)))
                self._ellipsoid(rng, gen, f, self._centre(rng, cand),
                                [r0 * rng.uniform(0.6, 1.4) for _ in range(3)], rng.uniform(0.03, 0.2), 0.2)
            adc.mul_(1 - f * rng.uniform(0.15, 0.4))
            dwi.mul_(1 + f * rng.uniform(-0.1, 0.12))

    # ------------------------------------------------------------------ one volume
    @torch.no_grad()
    def sample_one(self, seed: int):
        rng = random.Random(int(seed))
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed) & 0x7FFFFFFFFFFF)
        dev = self.device
        grid, mni = self._warp_grid(rng, gen)
        pv = F.grid_sample(self.atlas, grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
        gm, wm, csf = pv[0], pv[1], pv[2]
        textured = self.texture > 0 and rng.random() < self.texture  # no draw at 0: earlier recipes reproduce
        if textured:
            gm, wm, csf = sharpen_tissues(gm, wm, csf, rng.uniform(1.5, 4.0))
        # atrophy: widen sulci and ventricles by up to ~1.3 voxels (2 with texture: older brains' pure CSF)
        atro = rng.uniform(0.3, 2.0) if textured else rng.uniform(0.0, 1.3)
        if atro > 0.1:
            grown = F.max_pool3d(csf[None, None], 3, 1, 1)
            if atro > 1.0:
                grown = F.max_pool3d(grown, 3, 1, 1) * (atro - 1.0) + grown * (2.0 - atro)
            csf2 = torch.maximum(csf, min(atro, 1.0) * grown[0, 0])
            k = torch.clamp(1 - csf2, 0, 1) / torch.clamp(gm + wm, min=1e-4)
            k = torch.clamp(k, max=1.0)
            gm, wm, csf = gm * k, wm * k, csf2
        if self.sulci > 0 and rng.random() < self.sulci:  # no draw at 0: earlier recipes reproduce
            gm, wm, csf = carve_sulci(rng, gen, gm, wm, csf)
        brain_soft = torch.clamp(gm + wm + csf, 0, 1)
        paren = gm + wm
        cand = torch.nonzero(paren > 0.6)

        # tissue contrasts
        d_wm, d_gm, d_csf = 1.0, rng.uniform(1.05, 1.7), rng.uniform(0.1, 0.45)
        a_wm = rng.uniform(0.55, 0.8)
        a_gm, a_csf = a_wm + rng.uniform(0.0, 0.22), rng.uniform(2.2, 3.3)
        tex = smooth_noise(gen, self.fov, (12, 14, 12), 2, dev)[0]
        dwi_t = (gm * d_gm + wm * d_wm) * torch.exp(tex[0] * rng.uniform(0.0, 0.15))
        adc_t = (gm * a_gm + wm * a_wm) * torch.exp(tex[1] * rng.uniform(0.0, 0.06))
        if rng.random() < 0.85:  # posterior fossa: brighter trace, lower ADC than the cerebrum (normal)
            infra = infratentorial(mni)
            dwi_t = dwi_t * (1 + infra * rng.uniform(0.0, 0.7))
            adc_t = adc_t * (1 - infra * rng.uniform(0.0, 0.15))

        # lesions (in parenchyma only; CSF keeps its signal)
        cortical = self.cortical > 0 and rng.random() < self.cortical  # no draw at 0: releases 1-5 reproduce
        if cortical:
            ribbon = cortical_ribbon(gm, wm, csf)
            les = self._lesions(rng, gen, ribbon if ribbon.shape[0] else cand) * cortical_support(paren)
        else:
            les = self._lesions(rng, gen, cand) * torch.clamp(paren * 2.5 - 1.5, 0, 1)
        fd = 1.0
        if float(les.max()) > 0:
            het = 1 + smooth_noise(gen, self.fov, (10, 12, 10), 2, dev)[0] * rng.uniform(0.0, 0.25)
            fd = rng.uniform(1.25, 3.5)
            dwi_t = dwi_t * (1 + les * (fd - 1) * torch.clamp(het[0], 0.3, 2))
            if rng.random() < 0.5:  # absolute lesion ADC (1e-3 mm2/s)
                a_map = torch.clamp(rng.uniform(0.28, 0.6) * torch.clamp(het[1], 0.6, 1.4), max=0.9) * paren
            else:  # relative to the local tissue (rADC 0.45-0.85), e.g. in the posterior fossa
                r = torch.clamp(rng.uniform(0.45, 0.85) * torch.clamp(het[1], 0.8, 1.2), max=0.9)
                a_map = adc_t * r
            adc_t = adc_t * (1 - les) + a_map * les
        dwi = dwi_t + csf * d_csf
        adc = adc_t + csf * a_csf
        self._negatives(rng, gen, cand, brain_soft, dwi, adc)

        # degradation: partial volume blur + thick slices, same for lesion map and brain support
        stack = torch.stack([dwi, adc, les, brain_soft])[None]
        s_pv = rng.uniform(0.0, 0.5)
        stack = blur(stack, [s_pv] * 3)
        if rng.random() < 0.45:
            ax = rng.randrange(3)
            k = rng.uniform(1.25, 3.0)  # 2.5-6 mm slices
            sig = [0.0, 0.0, 0.0]
            sig[ax] = 0.42 * k
            stack = blur(stack, sig)
            small = list(self.fov)
            small[ax] = max(2, int(round(self.fov[ax] / k)))
            stack = F.interpolate(stack, size=small, mode="trilinear", align_corners=True)
            stack = F.interpolate(stack, size=self.fov, mode="trilinear", align_corners=True)
        dwi, adc, les, bsoft = stack[0]

        # noise, bias, scale
        sd = rng.uniform(0.01, 0.12)
        n = torch.randn((2,) + self.fov, generator=gen, device=dev) * sd
        dwi = torch.sqrt((dwi + n[0]) ** 2 + n[1] ** 2)
        adc_sd = rng.uniform(0.05, 0.16) if textured else rng.uniform(0.01, 0.08)
        adc = torch.clamp(adc + torch.randn(self.fov, generator=gen, device=dev) * adc_sd, min=0)
        bias = smooth_noise(gen, self.fov, (3, 3, 3), 1, dev)[0, 0] * rng.uniform(0.0, 0.3)
        dwi = dwi * torch.exp(bias) * (10 ** rng.uniform(0, 3))
        if rng.random() < 0.5:  # re-gridding of the acquired (noisy) images: 1-2 trilinear resamplings
            stack = torch.stack([dwi, adc, les, bsoft])[None]
            for _ in range(rng.choice([1, 2])):
                stack = self._regrid(rng, stack)
            dwi, adc, les, bsoft = stack[0]
        label = self.label_rule(les, dwi_excess=fd - 1.0)

        # brain mask with edge variation
        edge = smooth_noise(gen, self.fov, (6, 7, 6), 1, dev)[0, 0] * rng.uniform(0.0, 0.15)
        brain = (bsoft + edge) > rng.uniform(0.3, 0.6)

        dwi_n, adc_n = normalize_channels_torch(dwi, adc, brain)
        label = label * brain.float()
        return torch.stack([dwi_n, adc_n]), label[None]

    def _regrid(self, rng, stack):
        """One trilinear resampling under a small random rigid motion (+-12 deg, sub-voxel shift): the
        interpolation blur of oblique or anisotropic acquisitions brought to the model grid."""
        rot = _rot([math.radians(rng.uniform(-12, 12)) for _ in range(3)])
        theta = torch.zeros(1, 3, 4, device=self.device)
        theta[0, :, :3] = torch.tensor(rot, dtype=torch.float32, device=self.device)
        theta[0, :, 3] = torch.tensor([rng.uniform(-1, 1) / (n - 1) for n in reversed(self.fov)],
                                      dtype=torch.float32, device=self.device)
        grid = F.affine_grid(theta, list(stack.shape), align_corners=True)
        return F.grid_sample(stack, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def batch(self, seed: int, n: int):
        """Batch of ``n`` volumes: x (n, 2, *FOV), y (n, 1, *FOV). Volume i uses seed ``seed * 1000 + i``."""
        xs, ys = zip(*(self.sample_one(seed * 1000 + i) for i in range(n)))
        return torch.stack(xs), torch.stack(ys)


def add_generator_arguments(ap) -> None:
    """One ``--name`` flag per generator option (argparse; default 0, the generator of releases 1-4)."""
    for name, text in GENERATOR_OPTIONS.items():
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=0.0, help=text + "; default 0")


def generator_for(meta: dict, device="cpu", label_rule=None) -> SynthGenerator:
    """The generator that weights were trained with (label rule and ``GENERATOR_OPTIONS``), from their
    sidecar ``meta``; ``label_rule`` another rule of ``labels.py`` for the same images."""
    return SynthGenerator(device, label_rule=label_rule or meta.get("label_rule", "threshold"),
                          **{k: meta.get(k, 0.0) for k in GENERATOR_OPTIONS})


def _rot(ang):
    cx, cy, cz = (math.cos(a) for a in ang)
    sx, sy, sz = (math.sin(a) for a in ang)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rx @ ry @ rz
