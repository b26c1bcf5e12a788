"""metrics.py: the statistics on known cases, and against scikit-learn and SciPy."""

import numpy as np
import pytest
from sklearn import calibration

import metrics


def test_sensitivity_and_specificity_at_a_threshold():
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    probabilities = [0.9, 0.8, 0.6, 0.2, 0.7, 0.3, 0.1, 0.0]
    assert metrics.sensitivity_specificity(labels, probabilities, 0.5) == (0.75, 0.75)
    assert metrics.sensitivity_specificity(labels, probabilities, 0.6) == (0.75, 0.75)
    assert metrics.sensitivity_specificity(labels, probabilities, 0.65) == (0.5, 0.75)
    assert metrics.sensitivity_specificity([0, 0], [0.1, 0.9], 0.5) == (None, 0.5)


def test_confusion_counts_put_melanoma_first():
    counts = metrics.confusion_counts(np.array([1, 1, 1, 0, 0]), np.array([1, 0, 0, 1, 0]))
    assert counts == {"true_positive": 1, "false_negative": 2, "false_positive": 1, "true_negative": 1}
    assert metrics.confusion_counts(np.array([0, 0]), np.array([0, 0]))["true_negative"] == 2


def test_one_class_leaves_ranking_undefined():
    assert metrics.roc_auc([1, 1], [0.2, 0.9]) is None
    assert set(metrics.ranking_metrics(np.array([0, 0]), np.array([0.2, 0.9])).values()) == {None}


# --- known cases -------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "scores", "expected"),
    [
        ([1, 1, 0, 0], [0.5, 0.5, 0.5, 0.5], 0.18),  # chance: the diagonal from (0.8, 0.8) to (1, 1)
        ([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1], 1.0),  # perfect
        ([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9], 0.0),  # perfectly wrong
        # (0, .8) (.6, .8) (.6, 1) (1, 1): 0.6 * 0.8 + 0.4 * 1
        ([1] * 5 + [0] * 5, [0.9, 0.8, 0.7, 0.6, 0.2, 0.5, 0.4, 0.3, 0.1, 0.05], 0.88),
        # a tie makes the segment (0, .5)-(.5, 1), which crosses sensitivity 0.8 at FPR 0.3
        ([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1], 0.2 * 0.9 + 0.5),
    ],
)
def test_auc_above_80_sensitivity(labels, scores, expected):
    fpr, tpr, _ = metrics.roc_points(np.array(labels), np.array(scores))
    assert metrics.auc_above_sensitivity(fpr, tpr) == pytest.approx(expected)


def synthetic_scores(size=400, seed=0):
    rng = np.random.default_rng(seed)
    probabilities = rng.random(size)
    labels = (rng.random(size) < probabilities**2).astype(int)  # overconfident on purpose
    return labels, probabilities


def test_expected_calibration_error_uses_sklearn_calibration_bins():
    labels, probabilities = synthetic_scores()
    fraction, mean = calibration.calibration_curve(labels, probabilities, n_bins=10, strategy="uniform")
    counts = np.histogram(probabilities, bins=10, range=(0, 1))[0]
    expected = np.sum(counts[counts > 0] * np.abs(fraction - mean)) / len(labels)
    assert metrics.expected_calibration_error(labels, probabilities) == pytest.approx(expected)
    assert expected > 0.05


def test_bootstrap_is_seeded_and_skips_what_one_class_cannot_give():
    labels, probabilities = synthetic_scores()
    first = metrics.bootstrap_intervals(labels, probabilities, 0.5, 100, seed=1)
    assert first == metrics.bootstrap_intervals(labels, probabilities, 0.5, 100, seed=1)
    assert first != metrics.bootstrap_intervals(labels, probabilities, 0.5, 100, seed=2)
    melanomas = labels == metrics.MELANOMA
    only_melanoma = metrics.bootstrap_intervals(labels[melanomas], probabilities[melanomas], 0.5, 50, seed=1)
    assert only_melanoma["roc_auc"] is None and only_melanoma["specificity"] is None
    assert only_melanoma["sensitivity"][0] <= only_melanoma["sensitivity"][1]


def test_stratified_resamples_keep_each_class_count():
    labels, _ = synthetic_scores()
    for index in metrics.stratified_resamples(labels, 5, seed=0):
        assert np.bincount(labels[index]).tolist() == np.bincount(labels).tolist()


def test_paired_auc_difference_cancels_what_two_rankings_share():
    labels, probabilities = synthetic_scores()
    noise = np.random.default_rng(1).normal(0, 1, len(labels))
    assert metrics.auc_difference_interval(labels, probabilities, probabilities, 50) == [0.0, 0.0]
    # A much noisier ranking: clearly worse, the interval holds the gain and excludes 0.
    worse = probabilities + 0.3 * noise
    low, high = metrics.auc_difference_interval(labels, probabilities, worse, resamples=100)
    assert 0 < low < metrics.roc_auc(labels, probabilities) - metrics.roc_auc(labels, worse) < high
    # A ranking that mostly agrees: the paired interval is far narrower than either AUC's own.
    close = probabilities + 0.05 * noise
    low, high = metrics.auc_difference_interval(labels, probabilities, close, resamples=100)
    alone = metrics.bootstrap_intervals(labels, probabilities, 0.5, 100, seed=0)["roc_auc"]
    assert high - low < (alone[1] - alone[0]) / 3
    only = labels == metrics.MELANOMA
    assert metrics.auc_difference_interval(labels[only], probabilities[only], worse[only]) is None


@pytest.mark.parametrize(
    ("successes", "trials", "expected"),
    [(2, 2, [0.3424, 1.0]), (0, 10, [0.0, 0.2775]), (45, 50, [0.7864, 0.9565]), (0, 0, None)],
)
def test_wilson_interval_matches_published_values(successes, trials, expected):
    interval = metrics.wilson_interval(successes, trials)
    assert interval == (None if expected is None else pytest.approx(expected, abs=1e-4))
