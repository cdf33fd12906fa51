"""Unlabelled EPI artefacts of the built-in generator (``models/builtin/artefacts.py``)."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("monai")

from models.builtin.artefacts import surface_depth, susceptibility_pileup  # noqa: E402

FOV = (40, 48, 40)


def _ball():
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in FOV], indexing="ij"))
    centre = torch.tensor([(n - 1) / 2 for n in FOV]).view(3, 1, 1, 1)
    brain = (((idx - centre) ** 2).sum(0).sqrt() <= 15).float()
    return brain, idx


def test_surface_depth_counts_layers_from_the_outside():
    brain, _ = _ball()
    depth = surface_depth(brain)
    c = [n // 2 for n in FOV]
    assert float(depth[tuple(c)]) == 8  # capped at MAX_DEPTH deep inside
    assert float(depth[0, 0, 0]) == 0  # outside
    box = torch.zeros(FOV)
    box[5:35, 5:43, 5:35] = 1
    assert [int(v) for v in surface_depth(box)[20, 24, 4:10]] == [0, 1, 2, 3, 4, 5]


def test_pileup_brightens_a_band_under_the_surface_only():
    brain, idx = _ball()
    depth = surface_depth(brain)
    hits = 0
    for seed in range(6):
        dwi, adc = brain.clone(), brain.clone()
        susceptibility_pileup(random.Random(seed), brain, idx, dwi, adc)
        assert torch.all(dwi[brain == 0] == 0) and torch.all(adc[brain == 0] == 0)
        assert torch.all(dwi >= brain - 1e-6)  # the trace only gets brighter
        gain = dwi - brain
        shallow, deep = gain[(depth >= 1) & (depth <= 2)], gain[depth >= 6]
        if float(shallow.max()) > 0.3:
            hits += 1
            assert float(shallow.max()) > 3 * float(deep.max())
        ratio = adc[gain > 0.3] / brain[gain > 0.3]
        assert ratio.numel() == 0 or (float(ratio.min()) >= 0.69 and float(ratio.max()) <= 1.31)
    assert hits >= 3


def test_pileup_is_deterministic_per_seed():
    brain, idx = _ball()
    a, b = brain.clone(), brain.clone()
    susceptibility_pileup(random.Random(3), brain, idx, a, brain.clone())
    susceptibility_pileup(random.Random(3), brain, idx, b, brain.clone())
    assert torch.equal(a, b)


def test_low_adc_pileups_lower_the_adc_and_can_peak_under_the_edge():
    """``low_adc=1``: every pile-up is pseudo-restricted: the ADC falls wherever the trace is brightened (to
    0.5x at the least), a peak that can lie below the outermost layer; nothing leaves the brain."""
    brain, idx = _ball()
    depth = surface_depth(brain)
    deeper_peaks, lowest = 0, 1.0
    for seed in range(8):
        dwi, adc = brain.clone(), brain.clone()
        susceptibility_pileup(random.Random(seed), brain, idx, dwi, adc, low_adc=1.0)
        assert torch.all(dwi[brain == 0] == 0) and torch.all(adc[brain == 0] == 0)
        assert torch.all(dwi >= brain - 1e-6) and torch.all(adc <= brain + 1e-6)
        gain = dwi - brain
        touched = gain > 1e-3
        ratio = adc[touched] / brain[touched]
        assert float(ratio.max()) < 1 and float(ratio.min()) >= 0.5 - 1e-6
        lowest = min(lowest, float(ratio.min()))
        layer_gain = [float(gain[depth == d].max()) for d in range(1, 6)]
        if max(layer_gain[1:]) > layer_gain[0] * 1.05:
            deeper_peaks += 1
    assert deeper_peaks >= 2 and lowest < 0.8


# sums of trace and ADC after ``susceptibility_pileup(random.Random(seed), ball, ...)`` with artefacts.py
# as it was before ``low_adc`` (e4c70c6, the pile-up of releases 1-4), seeds 0-3
BEFORE_LOW_ADC = ((16985.364886, 14221.012253), (14815.412766, 14319.978182), (14442.938220, 14319.522252),
                  (14334.030197, 14330.696809))


def test_low_adc_zero_is_the_pileup_of_release_4():
    """The default draws nothing more and changes nothing, so earlier recipes get their volumes back."""
    brain, idx = _ball()
    for seed, (dwi_sum, adc_sum) in enumerate(BEFORE_LOW_ADC):
        dwi, adc = brain.clone(), brain.clone()
        susceptibility_pileup(random.Random(seed), brain, idx, dwi, adc)
        assert float(dwi.double().sum()) == pytest.approx(dwi_sum, rel=1e-7)
        assert float(adc.double().sum()) == pytest.approx(adc_sum, rel=1e-7)
