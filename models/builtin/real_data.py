"""Labelled real cases for (optional) fine-tuning of the built-in model: ``train.py --real-data DIR``.

``DIR`` is an ISLES'22-style BIDS folder: ``sub-*/[ses-*/]dwi/*_dwi.nii*`` (trace) with ``*_adc.nii*``
in 1e-3 mm2/s, and expert masks ``derivatives/**/sub-*[_ses-*]_msk.nii*``. Each case is normalised
exactly as at inference (``normalize_images``; brain = non-zero trace, the images being skull-stripped)
and put on the model grid (RAS 2 mm, as ``predictor._Grid`` does). Crops are augmented with a random
left-right flip and a trace scale of 0.85-1.15, and are a function of the seed only.

The shipped weights never use this (see MODEL_CARD.md): it exists to measure what training on a
case is worth, and for users who have labelled data of their own.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch


def _key(path: Path) -> tuple:
    """(subject, session) of a BIDS file name, parsed by pybids."""
    from bids.layout import parse_file_entities

    ent = parse_file_entities(str(path))
    return ent.get("subject"), ent.get("session")


def find_cases(root) -> list[dict]:
    """``[{"id", "dwi", "adc", "mask"}]`` for every DWI that has an ADC and an expert mask."""
    root = Path(root)
    masks = {}
    for m in sorted((root / "derivatives").rglob("*_msk.nii*")):
        masks[_key(m)] = m
    cases = []
    for dwi in sorted(root.glob("sub-*/**/dwi/*_dwi.nii*")):
        key = _key(dwi)
        adc = sorted(dwi.parent.glob(dwi.name.split("_dwi.nii")[0] + "_adc.nii*"))
        if adc and key in masks:
            case_id = f"sub-{key[0]}" + (f"_ses-{key[1]}" if key[1] else "")
            cases.append({"id": case_id, "dwi": dwi, "adc": adc[0], "mask": masks[key]})
    if not cases:
        raise FileNotFoundError(f"{root}: no case with *_dwi, *_adc and a derivatives/*_msk mask")
    return cases


def load_case(case: dict, voxel_mm: float = 2.0):
    """(x (2, D, H, W) float32, y (1, D, H, W) float32) on the RAS 2 mm model grid."""
    import nibabel as nib

    from .predictor import _Grid, normalize_images

    dwi, adc = nib.load(str(case["dwi"])), nib.load(str(case["adc"]))
    brain = np.asarray(dwi.dataobj) > 0
    dn, an = normalize_images(dwi, adc, brain)
    mask = (np.asarray(nib.load(str(case["mask"])).dataobj) > 0).astype(np.float32)
    grid = _Grid(dwi.shape, dwi.affine, voxel_mm)
    x = np.stack([grid.to_model(np.asarray(dn.dataobj)), grid.to_model(np.asarray(an.dataobj))])
    y = (grid.to_model(mask) > 0.5).astype(np.float32)[None]
    return torch.from_numpy(x), torch.from_numpy(y)


class RealCases:
    """Seeded lesion-centred crops of labelled real cases."""

    def __init__(self, root, patch):
        self.patch = tuple(int(p) for p in patch)
        self.ids, self.volumes = [], []
        for case in find_cases(root):
            x, y = load_case(case)
            pad = [max(0, p - s) for p, s in zip(self.patch, x.shape[1:])]
            if any(pad):
                spec = [v for p in reversed(pad) for v in (p // 2, p - p // 2)]
                x, y = torch.nn.functional.pad(x, spec), torch.nn.functional.pad(y, spec)
            self.ids.append(case["id"])
            self.volumes.append((x, y))

    def crop(self, seed: int):
        """One augmented crop: (x (2, *patch), y (1, *patch))."""
        from .transforms import random_crop

        rng = random.Random(int(seed))
        x, y = self.volumes[rng.randrange(len(self.volumes))]
        if rng.random() < 0.5:
            x, y = x.flip(1), y.flip(1)
        x = x.clone()
        x[0] = torch.clamp(x[0] * rng.uniform(0.85, 1.15), max=8.0)
        xc, yc = random_crop(x[None], y[None], self.patch, rng.randrange(2 ** 31))
        return xc[0], yc[0]
