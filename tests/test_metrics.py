"""metrics.py: the statistics on known cases, and against scikit-learn and SciPy."""

import numpy as np
import pytest
from scipy import stats
from sklearn import calibration
from sklearn import metrics as skmetrics

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


def test_bootstrap_intervals_are_the_percentiles_of_each_resamples_figures():
    labels, probabilities = synthetic_scores(size=80)
    intervals = metrics.bootstrap_intervals(labels, probabilities, 0.4, 30, seed=5)
    per_resample = [
        (
            metrics.roc_auc(labels[index], probabilities[index]),
            *metrics.sensitivity_specificity(labels[index], probabilities[index], 0.4),
        )
        for index in metrics.stratified_resamples(labels, 30, seed=5)
    ]
    columns = zip(*per_resample, strict=True)
    for name, values in zip(("roc_auc", "sensitivity", "specificity"), columns, strict=True):
        assert intervals[name] == pytest.approx(metrics.percentile_interval(values), abs=1e-12)
    assert intervals["sensitivity"][0] < intervals["sensitivity"][1]


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


# --- subgroups ---------------------------------------------------------------


def test_a_groups_wilson_interval_is_scipys():
    labels = [1] * 9 + [0] * 4
    probabilities = [0.9] * 7 + [0.1] * 2 + [0.8] + [0.2] * 3  # 7 of 9 melanomas found, 1 false alarm
    row = metrics.subgroup_metrics(labels, probabilities, 0.5)
    expected = stats.binomtest(7, 9).proportion_ci(method="wilson")
    assert row["sensitivity"] == pytest.approx(7 / 9)
    assert row["sensitivity_interval"] == pytest.approx([expected.low, expected.high])
    assert row["sensitivity_interval"] == pytest.approx([0.4526, 0.9368], abs=1e-4)  # by hand
    assert row["specificity_interval"] == pytest.approx(
        list(stats.binomtest(3, 4).proportion_ci(method="wilson"))
    )
    assert (row["true_positive"], row["false_negative"], row["false_positive"], row["true_negative"]) == (
        7,
        2,
        1,
        3,
    )


def test_a_group_without_melanomas_says_why_its_cells_are_empty():
    row = metrics.subgroup_metrics(
        [0, 0, 0, 0], [0.7, 0.2, 0.1, 0.3], 0.5, flagged=[True, False, False, True]
    )
    assert (row["n_images"], row["n_melanoma"], row["n_non_melanoma"]) == (4, 0, 4)
    assert row["sensitivity"] is None and row["sensitivity_interval"] is None
    assert row["specificity"] == 0.75 and row["false_positive"] == 1
    assert row["roc_auc"] is None and row["roc_auc_interval"] is None
    assert row["why_empty"] == {
        "sensitivity": "no melanomas",
        "roc_auc": "needs 10 of each class (0 melanomas, 4 benign)",
    }
    assert row["n_cannot_judge"] == 2


@pytest.mark.parametrize(("label", "probability"), [(1, 0.9), (1, 0.1), (0, 0.9), (0, 0.1)])
def test_a_group_of_one_image(label, probability):
    row = metrics.subgroup_metrics([label], [probability], 0.5)
    found = probability >= 0.5
    rate, other = ("sensitivity", "specificity") if label else ("specificity", "sensitivity")
    assert row[rate] == (float(found) if label else float(not found))
    assert row[rate + "_interval"] == pytest.approx(
        [0.0, 0.7935] if row[rate] == 0 else [0.2065, 1.0], abs=1e-4
    )
    assert row[other] is None and set(row["why_empty"]) == {other, "roc_auc"}
    assert row["n_cannot_judge"] is None  # no flags given: the checkpoint cannot flag


def test_auc_and_its_interval_only_with_ten_of_each_class():
    labels, probabilities = synthetic_scores(size=200)
    row = metrics.subgroup_metrics(labels, probabilities, 0.5, resamples=200)
    assert row["roc_auc"] == pytest.approx(skmetrics.roc_auc_score(labels, probabilities))
    low, high = row["roc_auc_interval"]
    assert low < row["roc_auc"] < high and high - low < 0.25
    assert "roc_auc" not in row["why_empty"]
    nine = np.r_[np.flatnonzero(labels == 1)[:9], np.flatnonzero(labels == 0)[:50]]
    few = metrics.subgroup_metrics(labels[nine], probabilities[nine], 0.5)
    assert (
        few["roc_auc"] is None
        and few["why_empty"]["roc_auc"] == "needs 10 of each class (9 melanomas, 50 benign)"
    )


def test_bootstrap_aucs_are_scikit_learns_on_each_resample():
    labels, probabilities = synthetic_scores(size=60)
    probabilities = np.round(probabilities, 1)  # ties, which count one half
    fast = list(metrics.bootstrap_aucs(labels, probabilities, 20, seed=3))
    slow = [
        skmetrics.roc_auc_score(labels[index], probabilities[index])
        for index in metrics.stratified_resamples(labels, 20, seed=3)
    ]
    assert fast == pytest.approx(slow, abs=1e-12)
    assert len(set(fast)) > 10


def test_per_diagnosis_false_alarms_add_up_to_the_folders():
    labels, probabilities = synthetic_scores()
    diagnoses = np.where(
        labels == 1, "mel", np.random.default_rng(0).choice(["nv", "bkl", "df"], len(labels))
    )
    members = {"diagnosis": {name: np.flatnonzero(diagnoses == name) for name in ("mel", "nv", "bkl", "df")}}
    table = metrics.subgroup_table(labels, probabilities, 0.5, members, resamples=10)["diagnosis"]
    folder = metrics.confusion_counts(labels, metrics.predict_labels(probabilities, 0.5))
    assert sum(row["false_positive"] for row in table.values()) == folder["false_positive"] > 0
    assert table["mel"]["sensitivity"] == pytest.approx(
        metrics.sensitivity_specificity(labels, probabilities, 0.5)[0]
    )
    assert sum(row["n_images"] for row in table.values()) == len(labels)


def test_groups_whose_interval_lies_wholly_below_the_folder_are_named():
    worse = {
        "sensitivity_interval": [0.2, 0.6],
        "specificity_interval": [0.5, 0.95],
        "roc_auc_interval": None,
    }
    straddles = {"sensitivity_interval": [0.5, 0.95], "specificity_interval": None, "roc_auc_interval": None}
    table = {
        "age": {
            "70 and over": {**worse, "sensitivity": 0.4, "specificity": 0.8, "roc_auc": None},
            "under 30": {**straddles, "sensitivity": 0.8, "specificity": None, "roc_auc": None},
        }
    }
    below = metrics.groups_below_overall(table, {"sensitivity": 0.7, "specificity": 0.9, "roc_auc": None})
    assert below == [
        {"dimension": "age", "group": "70 and over", "metric": "sensitivity", "value": 0.4,
         "interval": [0.2, 0.6], "overall": 0.7}
    ]  # fmt: skip
