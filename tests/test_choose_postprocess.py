"""models/builtin/choose_postprocess.py: the fixed rule, and the sidecar record on real weights."""
import hashlib
import json
import shutil
from pathlib import Path

from models.builtin import choose_postprocess as C
from models.builtin.predictor import BuiltinPredictor

WEIGHTS = Path(__file__).parents[1] / "models/builtin/weights/builtin_v1.pt"


def _r(dice, f1):
    return {"dice": dice, "lesion_f1": f1}


def _results(none, check, grow_none, grow_check):
    """Figures of every option; ``grow_none`` / ``grow_check``: ``{low: (dice, f1)}``, levels not given
    lower both figures."""
    out = {"none": _r(*none), "check": _r(*check)}
    for low in C.GROW_LOWS:
        out[f"none+grow{low:g}"] = _r(*grow_none.get(low, (none[0] - 0.1, none[1] - 0.1)))
        out[f"check+grow{low:g}"] = _r(*grow_check.get(low, (check[0] - 0.1, check[1] - 0.1)))
    return out


def test_levels_are_sorted_and_include_the_release_4_to_6_ones():
    assert list(C.GROW_LOWS) == sorted(C.GROW_LOWS) and {0.2, 0.3, 0.4} <= set(C.GROW_LOWS)
    assert C.JUDGE_LABELS == "rim"


def test_rule_check_then_best_growth_that_lowers_nothing():
    res = _results((0.50, 0.60), (0.52, 0.60),
                   {low: (0.9, 0.9) for low in C.GROW_LOWS},       # never looked at: the check is on
                   {0.2: (0.55, 0.59), 0.3: (0.54, 0.61), 0.4: (0.53, 0.62)})  # 0.2 lowers F1; 0.3, 0.4 tie
    assert C.choose(res) == {"contrast_check": True, "grow_lesions": True, "grow_low": 0.3}
    res["check+grow0.05"] = _r(0.60, 0.61)  # a lower level with a better mean wins
    assert C.choose(res) == {"contrast_check": True, "grow_lesions": True, "grow_low": 0.05}


def test_rule_check_off_when_it_lowers_f1_and_growth_off_when_all_lower():
    res = _results((0.50, 0.60), (0.55, 0.59),
                   {0.05: (0.49, 0.70), 0.2: (0.49, 0.70), 0.3: (0.51, 0.59), 0.4: (0.50, 0.599)},
                   {low: (0.9, 0.9) for low in C.GROW_LOWS})
    assert C.choose(res) == {"contrast_check": False, "grow_lesions": False, "grow_low": None}


def test_records_the_choice_in_the_sidecar_without_touching_the_weights(tmp_path):
    for suffix in (".pt", ".json"):
        shutil.copy(WEIGHTS.with_suffix(suffix), tmp_path / f"w{suffix}")
    before = hashlib.sha256((tmp_path / "w.pt").read_bytes()).hexdigest()
    calibration = json.loads((tmp_path / "w.json").read_text())["calibration"]
    rec = C.choose_postprocess(tmp_path / "w.pt", n=1)
    side = json.loads((tmp_path / "w.json").read_text())
    assert side["postprocess"] == json.loads(json.dumps(rec)) and side["calibration"] == calibration
    assert set(rec["measured"]) == {"none", "check"} | {f"{b}+grow{low:g}" for b in ("none", "check")
                                                        for low in C.GROW_LOWS}
    assert rec["n_volumes"] == 1 and rec["generator_seeds"] == [C.POST_SEED0, C.POST_SEED0]
    assert rec["label_rule"] == C.JUDGE_LABELS
    assert hashlib.sha256((tmp_path / "w.pt").read_bytes()).hexdigest() == before
    pred = BuiltinPredictor(tmp_path / "w.pt")
    assert pred.recommended_contrast_check is rec["contrast_check"]
    assert pred.recommended_grow_low == (rec["grow_low"] if rec["grow_lesions"] else None)
    assert not list(tmp_path.glob("*.part"))


def test_shipped_recommendation_follows_the_rule_from_its_recorded_figures():
    post = json.loads(WEIGHTS.with_suffix(".json").read_text())["postprocess"]
    assert C.choose(post["measured"]) == {k: post[k] for k in ("contrast_check", "grow_lesions", "grow_low")}
    assert post["n_volumes"] >= 32 and post["generator_seeds"][0] == C.POST_SEED0
    assert post["label_rule"] == C.JUDGE_LABELS  # judged against the outlines experts draw (stage AC)
    assert set(post["measured"]) == {"none", "check"} | {f"{b}+grow{low:g}" for b in ("none", "check")
                                                         for low in C.GROW_LOWS}
