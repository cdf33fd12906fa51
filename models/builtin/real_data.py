"""Labelled real cases for (optional) fine-tuning of the built-in model: ``train.py --real-data DIR``.

``DIR`` is a BIDS folder the app can read (ISLES'22 ``*_dwi``/``*_adc``, dcm2niix ``*_rec-TRACE_dwi``/
``*_rec-ADC_dwi``, ...; found by ``bids_app.discovery``) with one expert mask per subject/session
anywhere under it (ISLES'22 ``*_msk`` or a BIDS lesion ``*_mask``, as ``deepisles evaluate`` finds
them). Raw multi-shell DWI is skipped. Each case goes through the app's own steps, in the app's order:
singleton axes dropped, ADC units harmonised to 1e-3 mm2/s, ADC put on the DWI grid, brain extraction
unless the input is skull-stripped (``skullstrip_canonical``), intensity normalisation; then the model
grid (RAS 2 mm, as ``predictor._Grid`` does). Crops are augmented with a random left-right flip and a
trace scale of 0.85-1.15, and are a function of the seed only.

The shipped weights' sidecar records which real cases (if any) they saw (see MODEL_CARD.md).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch


def find_cases(root) -> list[dict]:
    """``[{"id", "dwi", "adc", "mask"}]`` for every session with a trace, an ADC and one expert mask."""
    from bids_app.discovery import discover
    from bids_app.evaluate import find_references

    root = Path(root)
    refs = find_references(root, skip_dirs=app_output_dirs(root))
    cases = []
    for ses in discover(root, validate=False):
        mask = refs.get((ses.subject, ses.session), (None, ""))[0]
        if ses.problem or ses.adc is None or mask is None:
            continue
        case_id = f"sub-{ses.subject}" + (f"_ses-{ses.session}" if ses.session else "")
        cases.append({"id": case_id, "dwi": Path(ses.dwi), "adc": Path(ses.adc), "mask": mask})
    if not cases:
        raise FileNotFoundError(f"{root}: no session with a trace DWI, an ADC and one expert lesion mask")
    return cases


def app_output_dirs(root) -> list[Path]:
    """Folders under ``root`` written by this app (its masks are predictions, never references)."""
    import json

    from bids_app import APP_NAME

    found = []
    for desc in Path(root).rglob("dataset_description.json"):
        try:
            gen = json.loads(desc.read_text()).get("GeneratedBy") or []
        except (OSError, ValueError):
            continue
        if any(isinstance(g, dict) and g.get("Name") == APP_NAME for g in gen):
            found.append(desc.parent)
    return found


def prepare_case(dwi_path, adc_path):
    """(trace_n, adc_n, affine) as the app's load/units/conform/skullstrip/normalize steps make them."""
    import nibabel as nib

    from nodes.adc_units import harmonise_adc
    from nodes.conform import conform_adc
    from nodes.load import squeeze_extra_axes
    from nodes.normalize import normalize
    from nodes.skullstrip import skullstrip_canonical

    dwi, adc_img = nib.load(str(dwi_path)), nib.load(str(adc_path))
    trace = squeeze_extra_axes(np.asarray(dwi.dataobj, dtype=np.float32))
    adc = squeeze_extra_axes(np.asarray(adc_img.dataobj, dtype=np.float32))
    adc, _ = harmonise_adc(adc, path=adc_path)
    adc, _ = conform_adc(trace, dwi.affine, adc, adc_img.affine, adc_path=adc_path)
    brain = skullstrip_canonical(trace, adc, dwi.header.get_zooms()[:3], dwi.affine)
    dwi_n, adc_n, _ = normalize(brain["trace"], brain["adc"], brain["mask"])
    return dwi_n, adc_n, dwi.affine


def load_reference(mask_path, affine, shape) -> np.ndarray:
    """The expert mask as a boolean array on the DWI grid: read as ``deepisles evaluate`` reads masks,
    nearest neighbour if its grid differs by more than ``GRID_TOL_MM``."""
    from bids_app.evaluate import GRID_TOL_MM, load_mask_3d, resample_nearest

    ref, mask = load_mask_3d(mask_path)
    mask = mask > 0
    if mask.shape != tuple(shape) or not np.allclose(ref.affine, affine, atol=GRID_TOL_MM):
        mask = resample_nearest(mask.astype(np.uint8), ref.affine, affine, shape) > 0
    return mask


def load_case(case: dict, voxel_mm: float = 2.0):
    """(x (2, D, H, W) float32, y (1, D, H, W) float32) on the RAS 2 mm model grid."""
    from .predictor import _Grid

    dwi_n, adc_n, affine = prepare_case(case["dwi"], case["adc"])
    mask = load_reference(case["mask"], affine, dwi_n.shape)
    grid = _Grid(dwi_n.shape, affine, voxel_mm)
    x = np.stack([grid.to_model(dwi_n), grid.to_model(adc_n)])  # float32 from to_model
    y = (grid.to_model(mask.astype(np.float32)) > 0.5).astype(np.float32)[None]
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
