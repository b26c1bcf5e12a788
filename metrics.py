"""The statistics of scored images: decisions at a threshold, ranking and screening metrics,
calibration, intervals. Pure functions of (labels, probabilities); model.py's validation and
analysis.py's reports both use them, so one number has one definition everywhere.

Labels are 1 (melanoma) and 0; probabilities are melanoma probabilities. A metric that a set of
images cannot define (sensitivity without melanomas, AUC with one class) is None.
"""

import math

import numpy as np
from scipy import stats
from sklearn import metrics as skmetrics
from sklearn.calibration import calibration_curve

from lesion_labels import MELANOMA, NON_MELANOMA

ISIC_MIN_SENSITIVITY = 0.80  # ISIC 2018/2019 challenges: "AUC, Sens > 80%"
SCREENING_RATE = 0.95  # specificity at 95% sensitivity, sensitivity at 95% specificity
CALIBRATION_BINS = 10
COUNT_NAMES = ("true_positive", "false_negative", "false_positive", "true_negative")


def finite_or_none(value):
    """A float, or None for None, NaN and the infinities (metrics.json writes null)."""
    return float(value) if value is not None and math.isfinite(value) else None


def ratio(numerator, denominator):
    """numerator / denominator as a float, None (undefined) when the denominator is 0."""
    return float(numerator / denominator) if denominator else None


def has_both_classes(labels):
    return len(np.unique(labels)) == 2


# --- decisions at a threshold ------------------------------------------------------------------


def predict_labels(probabilities, threshold):
    """Melanoma (1) when the melanoma probability reaches the threshold, else 0."""
    return (np.asarray(probabilities) >= threshold).astype(int)


def confusion_counts(labels, predicted):
    """{true_positive, false_negative, false_positive, true_negative} with melanoma as positive."""
    tn, fp, fn, tp = skmetrics.confusion_matrix(labels, predicted, labels=[NON_MELANOMA, MELANOMA]).ravel()
    return dict(zip(COUNT_NAMES, map(int, (tp, fn, fp, tn)), strict=True))


def sensitivity_specificity(labels, probabilities, threshold):
    """(sensitivity, specificity) at `threshold`; None for a class that has no images."""
    counts = confusion_counts(labels, predict_labels(probabilities, threshold))
    tp, fn, fp, tn = (counts[name] for name in COUNT_NAMES)
    return ratio(tp, tp + fn), ratio(tn, tn + fp)


def accuracy(labels, probabilities, threshold):
    return float(np.mean(predict_labels(probabilities, threshold) == np.asarray(labels)))


def metrics_at_threshold(labels, probabilities, threshold):
    """(confusion counts, the metrics of the decisions at `threshold`); None where undefined."""
    counts = confusion_counts(labels, predict_labels(probabilities, threshold))
    tp, fn, fp, tn = (counts[name] for name in COUNT_NAMES)
    sensitivity, specificity = ratio(tp, tp + fn), ratio(tn, tn + fp)
    return counts, {
        "accuracy": ratio(tp + tn, len(labels)),
        "balanced_accuracy": (sensitivity + specificity) / 2 if has_both_classes(labels) else None,
        "precision": ratio(tp, tp + fp),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "negative_predictive_value": ratio(tn, tn + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


# --- ranking ----------------------------------------------------------------------------------


def choose_threshold(labels, probabilities, setting="auto", target_sensitivity=0.9):
    """(threshold, the rule in plain words), from validation scores only: a fixed `setting`, or
    the highest threshold that catches `target_sensitivity` of the melanomas."""
    if setting != "auto":
        return float(setting), f"fixed at {setting:g}, not chosen on data (--threshold or --preset)"
    melanoma = np.sort(np.asarray(probabilities)[np.asarray(labels) == MELANOMA])[::-1]
    if not len(melanoma):
        return 0.5, "0.5, because the validation split has no melanoma to set a sensitivity target on"
    # The k-th highest melanoma score catches k melanomas; the tolerance absorbs 0.9 * 10 = 9.000001.
    needed = max(1, math.ceil(target_sensitivity * len(melanoma) - 1e-9))
    rule = f"the highest threshold with validation sensitivity >= {target_sensitivity:g}"
    return float(melanoma[needed - 1]), rule


def roc_auc(labels, probabilities):
    """ROC AUC, or None when only one class is present (it is undefined then)."""
    if not has_both_classes(labels):
        return None
    return float(skmetrics.roc_auc_score(labels, probabilities))


def roc_points(labels, probabilities):
    """(false positive rates, true positive rates, thresholds), every point kept."""
    return skmetrics.roc_curve(labels, probabilities, drop_intermediate=False)


def auc_above_sensitivity(fpr, tpr, min_sensitivity=ISIC_MIN_SENSITIVITY):
    """The ISIC 2018/2019 challenges' "AUC, Sens > 80%": the raw area under the part of the ROC
    curve where sensitivity is at least `min_sensitivity` (1.0 perfect, 0.18 for chance)."""
    first = int(np.searchsorted(tpr, min_sensitivity, side="left"))  # tpr[first - 1] < min <= tpr[first]
    fpr_at_min = np.interp(min_sensitivity, tpr[first - 1 : first + 1], fpr[first - 1 : first + 1])
    return float(skmetrics.auc(np.r_[fpr_at_min, fpr[first:]], np.r_[min_sensitivity, tpr[first:]]))


def specificity_at_sensitivity(fpr, tpr, thresholds, min_sensitivity):
    """(best specificity among thresholds reaching `min_sensitivity`, that threshold).

    The curve's first threshold is +inf ("flag nothing"): not one anyone can set, so None."""
    first = int(np.searchsorted(tpr, min_sensitivity, side="left"))  # both rates only grow along the curve
    return float(1 - fpr[first]), finite_or_none(thresholds[first])


def sensitivity_at_specificity(fpr, tpr, thresholds, min_specificity):
    """(best sensitivity among thresholds reaching `min_specificity`, that threshold)."""
    last = int(np.searchsorted(fpr, 1 - min_specificity, side="right")) - 1
    return float(tpr[last]), finite_or_none(thresholds[last])


RANKING_NAMES = (
    "roc_auc",
    "average_precision",
    "auc_above_80_sensitivity",
    "specificity_at_95_sensitivity",
    "threshold_for_95_sensitivity",
    "sensitivity_at_95_specificity",
    "threshold_for_95_specificity",
)


def ranking_metrics(labels, probabilities):
    """Threshold-free metrics; all None unless both classes are present."""
    if not has_both_classes(labels):
        return dict.fromkeys(RANKING_NAMES)
    fpr, tpr, thresholds = roc_points(labels, probabilities)
    specificity, specificity_threshold = specificity_at_sensitivity(fpr, tpr, thresholds, SCREENING_RATE)
    sensitivity, sensitivity_threshold = sensitivity_at_specificity(fpr, tpr, thresholds, SCREENING_RATE)
    values = (
        roc_auc(labels, probabilities),
        float(skmetrics.average_precision_score(labels, probabilities)),
        auc_above_sensitivity(fpr, tpr),
        specificity,
        specificity_threshold,
        sensitivity,
        sensitivity_threshold,
    )
    return dict(zip(RANKING_NAMES, values, strict=True))


# --- calibration ------------------------------------------------------------------------------


def calibration_bins(labels, probabilities, bins=CALIBRATION_BINS):
    """(images, mean predicted probability, fraction of melanomas) of each non-empty bin of
    equal width, in order (sklearn's calibration_curve plus the bins' sizes)."""
    melanoma_fraction, mean_probability = calibration_curve(labels, probabilities, n_bins=bins)
    counts = bin_sizes(probabilities, bins)
    return counts[counts > 0], mean_probability, melanoma_fraction


def bin_sizes(probabilities, bins=CALIBRATION_BINS):
    """Images in each of the equal-width bins, empty ones too, binned as calibration_curve
    bins them (edges at k / bins, each bin closed on the right)."""
    return np.bincount(np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], probabilities), minlength=bins)


def expected_calibration_error(labels, probabilities):
    """Mean |fraction of melanomas - mean probability| over the bins, weighted by their size."""
    counts, mean_probability, melanoma_fraction = calibration_bins(labels, probabilities)
    return float(np.sum(counts * np.abs(melanoma_fraction - mean_probability)) / counts.sum())


def brier_score(labels, probabilities):
    return float(skmetrics.brier_score_loss(labels, probabilities, pos_label=MELANOMA))


def cross_entropy(labels, probabilities):
    """Plain cross-entropy of each image, from its melanoma probability (clipped away from 0)."""
    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=float)
    probability_of_truth = np.where(labels == MELANOMA, probabilities, 1 - probabilities)
    return -np.log(np.clip(probability_of_truth, 1e-7, 1.0))


def calibration_metrics(labels, probabilities):
    return {
        "brier_score": brier_score(labels, probabilities),
        "expected_calibration_error": expected_calibration_error(labels, probabilities),
    }


# --- intervals --------------------------------------------------------------------------------


def wilson_interval(successes, trials, level=0.95):
    """Wilson score interval of a proportion; None without trials.

    Unlike a bootstrap, it stays honest at 0% or 100% and for a handful of images: 2 of 2
    melanomas found gives 34% to 100%, where every bootstrap resample says exactly 100%.
    """
    if not trials:
        return None
    interval = stats.binomtest(int(successes), int(trials)).proportion_ci(level, method="wilson")
    return [float(interval.low), float(interval.high)]


def rate_intervals(counts):
    """Wilson intervals of sensitivity and specificity from the confusion counts."""
    tp, fn, fp, tn = (counts[name] for name in COUNT_NAMES)
    return {"sensitivity": wilson_interval(tp, tp + fn), "specificity": wilson_interval(tn, tn + fp)}


def percentile_interval(values, level=0.95):
    values = np.asarray([np.nan if value is None else value for value in values], dtype=float)
    values = values[~np.isnan(values)]
    if not values.size:
        return None
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def stratified_resamples(labels, resamples, seed):
    """The image indices of each bootstrap resample. Each class is resampled on its own (a
    stratified bootstrap, as in pROC): every resample keeps the class counts, so the AUC stays
    defined and no resample is thrown away."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == label) for label in (MELANOMA, NON_MELANOMA)]
    for _ in range(resamples):
        yield np.concatenate([rng.choice(members, len(members)) for members in by_class])


def bootstrap_aucs(labels, probabilities, resamples, seed):
    """The ROC AUC of each of `stratified_resamples(labels, resamples, seed)`, roc_auc_score's value
    on each resample without sorting each one: the scores are ranked once, and a resample's AUC is
    the Mann-Whitney statistic with each image weighted by how often the resample drew it (a tie
    counts one half). Linear time per resample, so a thousand resamples of a large test set stay
    quick."""
    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=float)
    melanoma, benign = labels == MELANOMA, labels == NON_MELANOMA
    levels, level_of = np.unique(probabilities, return_inverse=True)
    for index in stratified_resamples(labels, resamples, seed):
        drawn = np.bincount(index, minlength=len(labels))
        benign_at = np.bincount(level_of[benign], weights=drawn[benign], minlength=len(levels))
        benign_below = np.cumsum(benign_at) - benign_at
        wins = benign_below[level_of[melanoma]] + 0.5 * benign_at[level_of[melanoma]]
        yield float(drawn[melanoma] @ wins) / (melanoma.sum() * benign.sum())


def bootstrap_intervals(labels, probabilities, threshold, resamples, seed):
    """Percentile 95% intervals of ROC AUC, sensitivity and specificity (stratified bootstrap)."""
    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=float)
    melanoma, benign = labels == MELANOMA, labels == NON_MELANOMA
    caught = predict_labels(probabilities, threshold) == MELANOMA
    samples = {"roc_auc": [], "sensitivity": [], "specificity": []}
    # A stratified resample keeps each class's count, so only the numerators change: the images
    # decided right, each counted as often as the resample drew it.
    for index in stratified_resamples(labels, resamples, seed):
        drawn = np.bincount(index, minlength=len(labels))
        samples["sensitivity"].append(ratio(drawn[melanoma & caught].sum(), melanoma.sum()))
        samples["specificity"].append(ratio(drawn[benign & ~caught].sum(), benign.sum()))
    if has_both_classes(labels):
        samples["roc_auc"] = list(bootstrap_aucs(labels, probabilities, resamples, seed))
    return {name: percentile_interval(values) for name, values in samples.items()}


def auc_difference_interval(labels, probabilities, other_probabilities, resamples=1000, seed=0):
    """Percentile 95% interval of ROC AUC(probabilities) - ROC AUC(other_probabilities), both
    computed on the same resampled images (a paired bootstrap: the variation the two rankings
    share cancels, so for rankings that mostly agree the interval is far narrower than either
    AUC's own); None with one class."""
    labels = np.asarray(labels)
    if not has_both_classes(labels):
        return None
    ours, theirs = (
        np.fromiter(bootstrap_aucs(labels, scores, resamples, seed), dtype=float)
        for scores in (probabilities, other_probabilities)
    )
    return percentile_interval(ours - theirs)


# --- everything at once -----------------------------------------------------------------------


def evaluate(labels, probabilities, threshold, resamples=1000, seed=0):
    """Everything a report says about a set of scored images (None where undefined)."""
    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=float)
    counts, decision_metrics = metrics_at_threshold(labels, probabilities, threshold)
    return {
        "n_images": len(labels),
        "n_melanoma": int(np.sum(labels == MELANOMA)),
        "n_non_melanoma": int(np.sum(labels == NON_MELANOMA)),
        "threshold": float(threshold),
        **decision_metrics,
        **ranking_metrics(labels, probabilities),
        **calibration_metrics(labels, probabilities),
        "confidence_intervals_95": bootstrap_intervals(labels, probabilities, threshold, resamples, seed),
        "wilson_intervals_95": rate_intervals(counts),
        "bootstrap_resamples": resamples,
        "bootstrap_seed": seed,
        "confusion_matrix": counts,
    }


# --- subgroups --------------------------------------------------------------------------------

MIN_PER_CLASS_FOR_AUC = 10  # below this, a group's AUC and its interval say little


def subgroup_metrics(labels, probabilities, threshold, flagged=None, resamples=1000, seed=0):
    """One group of images at `threshold`: its size and confusion counts, sensitivity and
    specificity with Wilson intervals, and ROC AUC with a stratified bootstrap interval when both
    classes have MIN_PER_CLASS_FOR_AUC images; `flagged` (bool per image, None when the
    checkpoint cannot flag) counts those the model cannot judge. `why_empty` says, for each
    empty value, why it is empty."""
    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=float)
    counts, decisions = metrics_at_threshold(labels, probabilities, threshold)
    n_melanoma = int(np.sum(labels == MELANOMA))
    n_benign = len(labels) - n_melanoma
    intervals = rate_intervals(counts)
    row = {
        "n_images": len(labels),
        "n_melanoma": n_melanoma,
        "n_non_melanoma": n_benign,
        **counts,
        "sensitivity": decisions["sensitivity"],
        "sensitivity_interval": intervals["sensitivity"],
        "specificity": decisions["specificity"],
        "specificity_interval": intervals["specificity"],
        "roc_auc": None,
        "roc_auc_interval": None,
        "n_cannot_judge": None if flagged is None else int(np.sum(flagged)),
        "why_empty": {},
    }
    if not n_melanoma:
        row["why_empty"]["sensitivity"] = "no melanomas"
    if not n_benign:
        row["why_empty"]["specificity"] = "no benign lesions"
    if min(n_melanoma, n_benign) < MIN_PER_CLASS_FOR_AUC:
        row["why_empty"]["roc_auc"] = (
            f"needs {MIN_PER_CLASS_FOR_AUC} of each class ({n_melanoma} melanomas, {n_benign} benign)"
        )
    else:
        row["roc_auc"] = roc_auc(labels, probabilities)
        row["roc_auc_interval"] = percentile_interval(bootstrap_aucs(labels, probabilities, resamples, seed))
    return row


def subgroup_table(labels, probabilities, threshold, members, flagged=None, resamples=1000, seed=0):
    """{dimension: {group: subgroup_metrics of its images}} for `members`, {dimension: {group:
    image indices}} (see subgroups.group_members)."""
    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=float)
    flagged = None if flagged is None else np.asarray(flagged, dtype=bool)
    return {
        dimension: {
            group: subgroup_metrics(
                labels[index],
                probabilities[index],
                threshold,
                None if flagged is None else flagged[index],
                resamples,
                seed,
            )
            for group, index in groups.items()
        }
        for dimension, groups in members.items()
    }


SUBGROUP_RATES = ("sensitivity", "specificity", "roc_auc")


def groups_below_overall(table, overall):
    """The groups whose 95% interval of a rate lies wholly below the whole folder's `overall`
    value of that rate ({rate: value}): [{dimension, group, metric, value, interval, overall}]."""
    below = []
    for dimension, groups in table.items():
        for group, row in groups.items():
            for rate in SUBGROUP_RATES:
                interval, whole = row[f"{rate}_interval"], overall.get(rate)
                if interval and whole is not None and interval[1] < whole:
                    below.append(
                        {"dimension": dimension, "group": group, "metric": rate, "value": row[rate],
                         "interval": interval, "overall": whole}
                    )  # fmt: skip
    return below
