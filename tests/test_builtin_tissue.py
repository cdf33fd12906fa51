"""Tissue maps of the built-in generator (``models/builtin/tissue.py``) and its cortical-lesion option
(``SynthGenerator(cortical=P)``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("monai")

from models.builtin.synth import SynthGenerator  # noqa: E402
from models.builtin.tissue import cortical_ribbon, cortical_support  # noqa: E402

FOV = (56, 64, 56)
# (DWI sum, ADC sum, label sum) of sample_one(seed) with pileup_low_adc=0.5, recorded from the generator at
# 3b8cae1, before the cortical option existed
BEFORE_CORTICAL = {900004000: (141936.7086289525, 142009.0032082498, 1793.0),
                   900004001: (130736.74045906216, 129112.65790188313, 0.0),
                   900004002: (146119.2324550599, 137459.91331622005, 176.0)}


def test_ribbon_is_grey_matter_next_to_csf():
    gm, wm, csf = torch.zeros(3, 9, 9, 9)
    gm[2:7, 2:7, 2:7] = 0.7
    wm[3:6, 3:6, 3:6] = 0.9
    gm[3:6, 3:6, 3:6] = 0.1
    csf[0:2] = 1.0  # a CSF sheet on one side
    got = {tuple(v) for v in cortical_ribbon(gm, wm, csf).tolist()}
    assert got and all(v[0] == 2 for v in got)  # only the grey-matter layer touching the CSF
    assert (2, 4, 4) in got and (4, 4, 4) not in got  # white matter and deep grey matter are not ribbon


def test_cortical_support_keeps_partial_tissue():
    paren = torch.tensor([0.0, 0.3, 0.45, 0.6, 1.0])
    torch.testing.assert_close(cortical_support(paren), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_default_generator_is_unchanged():
    gen = SynthGenerator("cpu", fov=FOV, label_rule="visible", pileup_low_adc=0.5)
    for seed, want in BEFORE_CORTICAL.items():
        x, y = gen.sample_one(seed)
        got = (float(x[0].double().sum()), float(x[1].double().sum()), float(y.double().sum()))
        assert got == pytest.approx(want, rel=1e-6)


def _share_near_csf(gen, seeds):
    """Share of labelled voxels with CSF (ADC > 1.5e-3 mm2/s in the generator's output) among their 26
    neighbours."""
    near, total = 0.0, 0.0
    for s in seeds:
        x, y = gen.sample_one(s)
        close = F.max_pool3d((x[1] > 1.5).float()[None, None], 3, 1, 1)[0, 0] > 0
        near += float((y[0] * close).sum())
        total += float(y[0].sum())
    return near / max(total, 1.0)


def test_cortical_lesions_lie_next_to_csf():
    seeds = range(900004100, 900004112)
    plain = _share_near_csf(SynthGenerator("cpu", fov=FOV, label_rule="visible"), seeds)
    cortical = _share_near_csf(SynthGenerator("cpu", fov=FOV, label_rule="visible", cortical=1.0), seeds)
    assert cortical > plain + 0.1, (plain, cortical)  # measured: 0.089 without, 0.232 with
