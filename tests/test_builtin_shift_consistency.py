"""Shift consistency of the built-in model's training: paired crops (``transforms.shifted_pair_crop``), the
loss term (``loss.shift_consistency``) and the training option (``train --shift-consistency``)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("monai")

from models.builtin.loss import shift_consistency  # noqa: E402
from models.builtin.synth import SynthGenerator  # noqa: E402
from models.builtin.transforms import crop_origins, random_crop, shifted_pair_crop  # noqa: E402

PATCH = (16, 16, 16)
SMALL_FOV = (48, 56, 48)


def _volumes(seed=0):
    """Two volumes, each twice (as ``--crops-per-volume 2`` gives them), with a few lesion voxels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 2, 30, 34, 26, generator=g) + 0.1
    y = (torch.rand(2, 1, 30, 34, 26, generator=g) > 0.995).float()
    return x.repeat_interleave(2, 0), y.repeat_interleave(2, 0)


@pytest.mark.parametrize("seed", range(6))
def test_pairs_hold_the_same_voxels_where_they_overlap(seed):
    x, y = _volumes(seed)
    xc, yc, overlaps = shifted_pair_crop(x, y, PATCH, seed, max_shift=5)
    assert xc.shape == (4, 2, *PATCH) and yc.shape == (4, 1, *PATCH) and len(overlaps) == 2
    # the first crop of each pair is random_crop's window of that volume
    xr, yr = random_crop(x[0::2], y[0::2], PATCH, seed)
    assert torch.equal(xc[0::2], xr) and torch.equal(yc[0::2], yr)
    for j, (sa, sb) in enumerate(overlaps):
        a, b = (slice(None),) + sa, (slice(None),) + sb
        assert torch.equal(xc[2 * j][a], xc[2 * j + 1][b]) and torch.equal(yc[2 * j][a], yc[2 * j + 1][b])
        # the second window is the first moved by d: the volume's voxels there, zeros beyond the volume
        d = [p.start - q.start for p, q in zip(sa, sb)]
        lo = [o + k for o, k in zip(crop_origins(x[0::2], y[0::2], PATCH, seed)[j], d)]
        padded = torch.nn.functional.pad(x[2 * j], (8,) * 6)
        want = padded[(slice(None),) + tuple(slice(a + 8, a + 8 + n) for a, n in zip(lo, PATCH))]
        assert torch.equal(xc[2 * j + 1], want)


def test_pairs_are_moved_up_to_max_shift_and_seeded():
    x, y = _volumes(1)
    shifts = set()
    for seed in range(40):
        _, _, overlaps = shifted_pair_crop(x, y, PATCH, seed, max_shift=3)
        for sa, sb in overlaps:
            d = tuple(a.start - b.start for a, b in zip(sa, sb))
            assert all(abs(k) <= 3 for k in d)
            shifts.add(d)
    assert len(shifts) > 20  # many different moves
    first = shifted_pair_crop(x, y, PATCH, 7, max_shift=3)
    again = shifted_pair_crop(x, y, PATCH, 7, max_shift=3)
    assert torch.equal(first[0], again[0]) and first[2] == again[2]


def _pair_logits(world_logit, overlaps_from):
    """Logits of each crop read from one map of the whole volume: windows that agree everywhere."""
    x = world_logit[None, None].repeat(4, 2, 1, 1, 1)
    y = torch.zeros(4, 1, *world_logit.shape)
    xc, _, overlaps = shifted_pair_crop(x, y, PATCH, overlaps_from, max_shift=4)
    return xc[:, :1].clone(), overlaps


def test_agreeing_windows_cost_nothing():
    """Windows cut from one varied map agree on their overlap, and only there: the overlap's slices are
    checked, since a misaligned overlap of a varied map disagrees."""
    world = 4.0 * torch.randn(30, 34, 26, generator=torch.Generator().manual_seed(4))
    logits, overlaps = _pair_logits(world, 3)
    assert any(sa != sb for sa, sb in overlaps)  # the windows were moved
    assert float(shift_consistency(logits, overlaps)) == pytest.approx(0.0, abs=1e-9)
    swapped = [(sb, sa) for sa, sb in overlaps]
    assert float(shift_consistency(logits, swapped)) > 0.05


def test_a_lesion_one_window_misses_costs_and_pulls_both_windows():
    world = torch.full((30, 34, 26), -12.0)
    logits, overlaps = _pair_logits(world, 3)
    # one window finds a 4-voxel lesion (p ~ 1) in the overlap, the other does not
    sa = overlaps[0][0]
    corner = tuple(slice(s.start, s.start + 2 if i < 2 else s.start + 1) for i, s in enumerate(sa))
    logits[0, 0][corner] = 12.0
    logits.requires_grad_(True)
    term = shift_consistency(logits, overlaps)
    assert 0.3 < float(term.detach()) < 0.5  # (4 / (4 + 1)) / 2 pairs
    term.backward()
    assert logits.grad[0].abs().sum() > 0 and logits.grad[1].abs().sum() > 0  # both windows pulled together
    assert logits.grad[2:].abs().sum() == 0  # the agreeing pair is untouched



def test_training_option_reaches_the_loss_and_the_sidecar(tmp_path, monkeypatch):
    import models.builtin.train as T

    calls = []

    def spy(logits, overlaps):
        calls.append(len(overlaps))
        return shift_consistency(logits, overlaps)

    monkeypatch.setattr(T, "SynthGenerator", lambda device, **kw: SynthGenerator(device, fov=SMALL_FOV, **kw))
    monkeypatch.setattr(T, "shift_consistency", spy)
    common = ["--batch", "2", "--crops-per-volume", "2", "--device", "cpu", "--patch", "32", "32", "32",
              "--val-every", "0", "--steps", "1"]
    meta = T.main(["--out", str(tmp_path / "a")] + common + ["--shift-consistency", "0.5", "--max-shift", "4"])
    assert calls == [1] and (meta["shift_consistency"], meta["max_shift"]) == (0.5, 4)
    meta = T.main(["--out", str(tmp_path / "b")] + common)
    assert calls == [1] and "shift_consistency" not in meta
    with pytest.raises(SystemExit):
        T.main(["--out", str(tmp_path / "c"), "--crops-per-volume", "1", "--shift-consistency", "1", "--steps", "1"])
