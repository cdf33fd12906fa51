"""The app on a second real acute stroke, unlike the ISLES'22 sample in every acquisition detail.

SOOP sub-3 (OpenNeuro ds004889, CC0; ``bids_app/data/demo/soop-sub-3``): dcm2niix names
(``rec-TRACE``/``rec-ADC``), 4-D images with one volume, ADC in 1e-6 mm2/s, 1.5 T, 0.9 x 0.9 x 6 mm
oblique slices, skull not removed; a 157 ml manual acute lesion mask. The built-in model never saw it
in training, selection or calibration. Through the CLI with the defaults, then ``deepisles evaluate``.

Measured with release 6 (sha256 661e4653...): Dice 0.878, lesion F1 0.600 (3 predicted components
against 6 reference pieces of the one infarct, cut apart by the 6 mm slice gaps), 131 ml against 157 ml
(release 5: 0.876, 0.444, 127 ml; release 4: 0.877, 0.444, 131 ml). The floors catch a broken chain
(layout, units, brain extraction, resampling) or a model that
loses this lesion, not small changes of the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from bids_app.cli import main

ROOT = Path(__file__).resolve().parents[1]
SOOP = ROOT / "bids_app/data/demo/soop-sub-3"
REFERENCE = SOOP / "derivatives" / "manual"
DICE_FLOOR = 0.75
VOLUME_RATIO = (0.6, 1.3)  # predicted / reference volume


@pytest.fixture(scope="module")
def soop(tmp_path_factory):
    base = tmp_path_factory.mktemp("soop")
    out, work = base / "out", base / "work"
    code = main([str(SOOP), str(out), "participant", "-w", str(work), "--nprocs", "2"])
    table = base / "eval.tsv"
    eval_code = main(["evaluate", str(out), str(REFERENCE), "-o", str(table)]) if code == 0 else None
    return {"code": code, "eval_code": eval_code, "out": out, "work": work, "table": table}


def test_runs_and_reads_the_layout(soop):
    assert soop["code"] == 0
    reportlets = soop["work"] / "reportlets" / "sub-3"
    assert json.loads((reportlets / "adc_units.json").read_text())["values"]["scale"] == pytest.approx(1e-3)
    strip = json.loads((reportlets / "skullstrip.json").read_text())["values"]
    assert strip["skull_stripped_input"] is False
    assert "rec-trace" in (soop["out"] / "sub-3.html").read_text()


def test_lesion_found(soop):
    assert soop["eval_code"] == 0
    row = pd.read_csv(soop["table"], sep="\t").set_index("case").loc["sub-3"]
    assert row["dice"] >= DICE_FLOOR, row.to_dict()
    ratio = row["pred_volume_ml"] / row["ref_volume_ml"]
    assert VOLUME_RATIO[0] <= ratio <= VOLUME_RATIO[1], row.to_dict()
