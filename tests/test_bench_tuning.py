"""bench/bench_tuning.py: each candidate's flags and train/, and the rules that choose the recipe."""

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def tuning():
    sys.path.insert(0, str(BENCH))  # the bench scripts import each other as siblings
    try:
        yield importlib.import_module("bench_tuning")
    finally:
        sys.path.remove(str(BENCH))


def settings_of(tuning, name):
    return tuning.recipe_settings(tuning.candidate_flags(name, 128))


def test_each_candidate_trains_what_its_name_says(tuning):
    baseline = settings_of(tuning, "baseline")
    assert (baseline.image_size, baseline.progressive_from, baseline.targets) == (128, 0, "melanoma")
    progressive = settings_of(tuning, "progressive")
    assert (progressive.progressive_from, progressive.image_size) == (96, 160)
    small = settings_of(tuning, "small_progressive")
    assert (small.progressive_from, small.image_size) == (64, 128)
    # The balanced candidate differs from "progressive" by its train/ only, not by a flag.
    assert tuning.candidate_flags("balanced_progressive", 128) == tuning.candidate_flags("progressive", 128)
    trees = {False: Path("imbalanced"), True: Path("balanced")}
    assert tuning.tree_of("balanced_progressive", trees) == Path("balanced")
    assert tuning.tree_of("small_progressive", trees) == Path("imbalanced")


def outcomes(**aucs):
    return [{"candidate": name, "auc": auc} for name, auc in aucs.items()]


def test_third_round_replaces_the_baseline_only_beyond_the_tie_margin(tuning):
    margin = tuning.TIE_MARGIN
    tie = outcomes(progressive=0.84, small_progressive=0.84 + margin / 2, balanced_progressive=0.83)
    assert tuning.chosen_candidate(tie, "progressive") == "progressive"
    win = outcomes(progressive=0.84, small_progressive=0.86, balanced_progressive=0.85)
    assert tuning.chosen_candidate(win, "progressive") == "small_progressive"
    assert tuning.choice_line(win, "progressive") == "recipe chosen by the rule: small_progressive"


def test_second_round_joins_each_option_that_beats_the_baseline(tuning):
    results = outcomes(baseline=0.806, diagnosis=0.805, ema=0.806, progressive=0.817)
    assert tuning.chosen_options(results) == ["progressive"]
    assert tuning.choice_line(results, "baseline") == "options chosen by the rule: progressive"
