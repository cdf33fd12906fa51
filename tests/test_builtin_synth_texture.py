"""Texture of the built-in generator (``SynthGenerator(texture=P)``): sharp tissue edges, older brains'
pure CSF and clinical ADC noise, which real images have and the population template lacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("monai")

from models.builtin.synth import SynthGenerator  # noqa: E402
from models.builtin.tissue import sharpen_tissues  # noqa: E402
from models.builtin.texture_stats import figures  # noqa: E402

FOV = (56, 64, 56)
SEEDS = tuple(range(900003000, 900003008))


def test_sharpening_keeps_the_brain_and_hardens_the_shares():
    gm = torch.tensor([0.5, 0.2, 0.0, 0.3])
    wm = torch.tensor([0.3, 0.2, 0.0, 0.0])
    csf = torch.tensor([0.2, 0.2, 0.0, 0.3])
    g, w, c = sharpen_tissues(gm, wm, csf, 3.0)
    torch.testing.assert_close(g + w + c, gm + wm + csf)  # the brain support (partial edge voxels) is kept
    assert float(g[0]) > 0.5 and float(c[0]) < 0.2  # the dominant tissue gains, the others lose
    torch.testing.assert_close(g[1], w[1])  # ties stay ties
    assert float(g[2] + w[2] + c[2]) == 0  # outside the brain stays empty
    one = sharpen_tissues(gm, wm, csf, 1.0)  # power 1: unchanged
    for a, b in zip(one, (gm, wm, csf)):
        torch.testing.assert_close(a, b)


def _figures(gen, seed):
    """ADC 90th percentile in the brain (pure CSF) and high-pass ADC s.d. away from CSF (noise), as
    ``texture_stats`` measures them."""
    x, _ = gen.sample_one(seed)
    x = x.numpy()
    got = figures(x[0], x[1], (x[0] > 0) | (x[1] > 0))
    return got["adc_p90"], got["adc_highpass_sd"]


def test_texture_gives_pure_csf_and_noisier_adc():
    """The reason for the option: with it, volumes have more pure CSF and a noisier ADC. The extra draw
    changes every later draw, so the same seeds give other volumes: compared as medians over 8 seeds."""
    plain = SynthGenerator("cpu", fov=FOV, label_rule="visible")
    textured = SynthGenerator("cpu", fov=FOV, label_rule="visible", texture=1.0)
    a = np.median([_figures(plain, s) for s in SEEDS], axis=0)
    b = np.median([_figures(textured, s) for s in SEEDS], axis=0)
    assert b[0] > a[0] + 0.2  # ADC p90, 1e-3 mm2/s (measured: 1.75 -> 2.05)
    assert b[1] > a[1]  # high-pass s.d. of the ADC away from CSF (measured: 0.038 -> 0.054)


def test_texture_is_deterministic():
    gen = SynthGenerator("cpu", fov=FOV, label_rule="visible", sulci=0.7, texture=0.7)
    a, b = gen.sample_one(SEEDS[1]), gen.sample_one(SEEDS[1])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
