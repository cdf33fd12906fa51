"""Training-label rules of the built-in generator (``models/builtin/labels.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

pytest.importorskip("monai")

from models.builtin.labels import rim_label, threshold_label, visible_label  # noqa: E402
from models.builtin.synth import SynthGenerator  # noqa: E402


def _blob(shape, centre, sigma, peak):
    z = np.zeros(shape, np.float32)
    z[centre] = 1.0
    z = ndi.gaussian_filter(z, sigma)
    return torch.from_numpy(z / z.max() * peak)


def test_threshold_rule_is_half():
    soft = torch.linspace(0, 1, 27).reshape(3, 3, 3)
    assert torch.equal(threshold_label(soft), (soft > 0.5).float())


def test_visible_rule_keeps_core_of_faded_small_lesion():
    soft = _blob((20, 20, 20), (10, 10, 10), 1.0, 0.4)  # an embolus whose peak fell to 0.4 after blur
    assert threshold_label(soft).sum() == 0
    lab = visible_label(soft, dwi_excess=2.0)  # 0.4 x 2 = 80 % brighter than tissue: visible
    core = lab > 0
    assert 1 <= int(core.sum()) <= 27
    assert core[10, 10, 10] and float(soft[core].min()) >= 0.6 * 0.4 - 1e-6
    assert visible_label(soft, dwi_excess=0.5).sum() == 0  # 0.4 x 0.5 = 20 %: too faint to outline


def test_visible_rule_leaves_lesions_reaching_half_unchanged():
    soft = _blob((24, 24, 24), (12, 12, 12), 3.0, 1.0)
    assert torch.equal(visible_label(soft, dwi_excess=2.5), threshold_label(soft))


def test_rim_rule_adds_the_visible_partial_volume_edge():
    soft = _blob((24, 24, 24), (12, 12, 12), 2.0, 1.0)  # a lesion blurred over its edge
    visible = visible_label(soft, dwi_excess=1.5)
    rim = rim_label(soft, dwi_excess=1.5)  # 150 % brighter: soft 0.25 is 37 % brighter, outlined
    assert bool((rim >= visible).all()) and rim.sum() > visible.sum()
    assert torch.equal(rim > 0, (soft > 0.5) | (soft > 0.25))
    faint = rim_label(soft, dwi_excess=0.5)  # 50 % brighter: the edge needs soft >= 0.3
    assert torch.equal(faint > 0, (soft > 0.5) | (soft >= 0.3))
    assert torch.equal(rim_label(soft, dwi_excess=0.2), visible_label(soft, dwi_excess=0.2))  # edge too faint


def test_generator_rule_changes_labels_only():
    g0 = SynthGenerator("cpu", fov=(48, 56, 48))
    g1 = SynthGenerator("cpu", fov=(48, 56, 48), label_rule="visible")
    g2 = SynthGenerator("cpu", fov=(48, 56, 48), label_rule="rim")
    added = rim_added = 0
    for seed in range(6):
        x0, y0 = g0.sample_one(seed)
        x1, y1 = g1.sample_one(seed)
        x2, y2 = g2.sample_one(seed)
        assert torch.equal(x0, x1) and torch.equal(x0, x2)  # same random stream, same images
        assert bool((y1 >= y0).all()) and bool((y2 >= y1).all())  # each rule only adds voxels
        added += int((y1 - y0).sum())
        rim_added += int((y2 - y1).sum())
    assert added > 0 and rim_added > 0
    with pytest.raises(KeyError):
        SynthGenerator("cpu", fov=(48, 56, 48), label_rule="nope")
