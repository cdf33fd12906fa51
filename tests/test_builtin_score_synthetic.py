"""Synthetic scoring of built-in weights through the predictor (``models/builtin/score_synthetic.py``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("monai")

from models.builtin import score_synthetic as S  # noqa: E402
from models.builtin.metrics import lesion_metrics  # noqa: E402
from models.builtin.network import DEFAULT_HPARAMS, build_network  # noqa: E402
from models.builtin.predictor import BuiltinPredictor  # noqa: E402
from models.builtin.synth import SynthGenerator  # noqa: E402
from models.builtin.train import VAL_SEED0  # noqa: E402
from models.weights import sha256_file  # noqa: E402

FOV = (32, 40, 32)
S_SEED = 123_000


class _Oracle:
    """A predictor whose logits are +-10 where a fixed mask is / is not (to check the pooling)."""

    def __init__(self, masks):
        self.masks = iter(masks)

    def logits_model_grid(self, x):
        return np.where(next(self.masks), 10.0, -10.0).astype(np.float32)


def test_pooled_figures_match_a_direct_count():
    gen = SynthGenerator("cpu", fov=FOV, label_rule="visible")
    labels = [gen.sample_one(S_SEED + i)[1][0].numpy() > 0.5 for i in range(3)]
    rng = np.random.default_rng(0)
    noisy = [lab ^ (rng.random(lab.shape) < 0.01) for lab in labels]
    got = S.score({"perfect": _Oracle(labels), "noisy": _Oracle(noisy)}, 3, S_SEED,
                  generator=SynthGenerator("cpu", fov=FOV, label_rule="visible"))
    assert any(lab.any() for lab in labels)
    assert got["perfect"]["dice"] == 1.0 and got["perfect"]["fp"] == 0 and got["perfect"]["fn"] == 0
    inter = sum(float((m & lab).sum()) for m, lab in zip(noisy, labels))
    total = sum(float(m.sum() + lab.sum()) for m, lab in zip(noisy, labels))
    tp = sum(lesion_metrics(m, lab, 0.008)["tp"] for m, lab in zip(noisy, labels))
    fp = sum(lesion_metrics(m, lab, 0.008)["fp"] for m, lab in zip(noisy, labels))
    fn = sum(lesion_metrics(m, lab, 0.008)["fn"] for m, lab in zip(noisy, labels))
    assert got["noisy"]["dice"] == round(2 * inter / total, 4) < 1.0
    assert (got["noisy"]["tp"], got["noisy"]["fp"], got["noisy"]["fn"]) == (tp, fp, fn) and fp > 0
    f1 = tp / (tp + 0.5 * (fp + fn))
    assert got["noisy"]["score"] == round(0.5 * (2 * inter / total + f1), 4)
    assert got["noisy"]["score_unrounded"] == pytest.approx(0.5 * (2 * inter / total + f1), abs=1e-12)


def test_cli_scores_weights_and_their_mean(tmp_path, monkeypatch, capsys):
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        w = tmp_path / f"w{seed}.pt"
        torch.save(build_network(DEFAULT_HPARAMS).state_dict(), w)
        w.with_suffix(".json").write_text(json.dumps({"hparams": DEFAULT_HPARAMS, "sha256": sha256_file(w),
                                                      "patch": [32, 32, 32]}))
        paths.append(str(w))
    small = SynthGenerator("cpu", fov=FOV, label_rule="visible")
    asked = []
    monkeypatch.setattr("models.builtin.synth.SynthGenerator", lambda *a, **k: asked.append(k) or small)
    out = S.main(["--weights", *paths, "--n", "2", "--mean-of-all", "--json", str(tmp_path / "s.json")])
    assert set(out) == {*paths, S.MEAN_OF_ALL}
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["scores"] == out and record["sulci"] == 0.0 and record["texture"] == 0.0
    assert record["pileup_low_adc"] == 0.0 and record["cortical"] == 0.0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("weights\tDice") and len(printed) == 1 + len(out)
    direct = S.score({"one": BuiltinPredictor(paths[1])}, 2, VAL_SEED0, generator=small)
    assert direct["one"] == out[paths[1]]  # deterministic, default seeds = train.VAL_SEED0
    with pytest.raises(SystemExit):
        S.main(["--weights", paths[0], "--mean-of-all"])
    S.main(["--weights", paths[0], "--n", "1", "--sulci", "0.7", "--texture", "0.4",
            "--pileup-low-adc", "0.2", "--cortical", "0.3"])  # they reach the generator
    S.main(["--weights", paths[0], "--n", "1", "--label-rule", "rim", "--json", str(tmp_path / "r.json")])
    assert asked == [{"label_rule": "visible", "sulci": 0.0, "texture": 0.0, "pileup_low_adc": 0.0, "cortical": 0.0},
                     {"label_rule": "visible", "sulci": 0.7, "texture": 0.4, "pileup_low_adc": 0.2, "cortical": 0.3},
                     {"label_rule": "rim", "sulci": 0.0, "texture": 0.0, "pileup_low_adc": 0.0, "cortical": 0.0}]
    assert json.loads((tmp_path / "r.json").read_text())["label_rule"] == "rim"
    both = S.main(["--weights", paths[0], "--n", "2", "--overlap", "0.25", "0.5"])  # one row per overlap
    assert set(both) == {f"{paths[0]}@overlap=0.25", f"{paths[0]}@overlap=0.5"}
    assert both[f"{paths[0]}@overlap=0.25"] == out[paths[0]]  # 0.25 = the sidecar's default
