"""The figures and the plain-language report of a scored folder, for analysis.py to write.

Every figure is one function returning a matplotlib `Figure` (no pyplot, no display); the report is
plain text. Nothing here scores images or writes files.
"""

import textwrap
from fractions import Fraction

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn import metrics as skmetrics

import image_input
import lesion_labels
import metrics
import subgroups

GALLERY_COLUMNS = 4
THUMBNAIL_SIZE = 224
MELANOMA_NAME = lesion_labels.CLASS_NAMES[lesion_labels.MELANOMA]
NON_MELANOMA_NAME = lesion_labels.CLASS_NAMES[lesion_labels.NON_MELANOMA]
NEEDS_BOTH = "undefined: the folder needs images of both classes"
# The learning curves' panels: (the key in each epoch of the training history, the panel's title).
HISTORY_CURVES = (("loss", "Loss"), ("accuracy_at_0.5", "Accuracy at probability 0.5"), ("auc", "ROC AUC"))


# --- plots (one figure per function, saved by the caller) ------------------------------------


def new_figure(width=6.4, height=4.8):
    # The object-oriented Figure needs no pyplot and no display: headless whatever MPLBACKEND says.
    return Figure(figsize=(width, height), layout="constrained")


def undefined_figure(title, reason):
    figure = new_figure(6.4, 2.4)
    axes = figure.subplots()
    axes.set_title(title)
    axes.text(0.5, 0.5, textwrap.fill(reason, 50), ha="center", va="center", fontsize=12)
    axes.set_axis_off()
    return figure


def plot_class_distribution(distribution):
    figure = new_figure()
    axes = figure.subplots()
    splits = list(distribution)
    x = np.arange(len(splits))
    width = 0.38
    colours = {MELANOMA_NAME: "tab:red", NON_MELANOMA_NAME: "tab:blue"}
    tallest = 1
    for offset, name in ((-width / 2, MELANOMA_NAME), (width / 2, NON_MELANOMA_NAME)):
        original = np.array([distribution[split][name]["original"] for split in splits])
        augmented = np.array([distribution[split][name]["augmented"] for split in splits])
        axes.bar(x + offset, original, width, color=colours[name], label=f"{name} (original)")
        augmented_style = {
            "color": colours[name],
            "alpha": 0.35,
            "hatch": "//",
            "label": f"{name} (augmented)",
        }
        axes.bar(x + offset, augmented, width, bottom=original, **augmented_style)
        for position, total in zip(x + offset, original + augmented, strict=True):
            axes.annotate(f"{total:,}", (position, total), ha="center", va="bottom", fontsize=8)
        tallest = max(tallest, *(original + augmented))
    axes.set_xticks(x, splits)
    # Room for the counts above the bars (the stacked bars' sticky edges defeat axes.margins).
    axes.set(
        title="Images per class in each split", xlabel="split", ylabel="images", ylim=(0, 1.12 * tallest)
    )
    axes.legend(fontsize=8)
    return figure


def plot_confusion_matrix(counts, threshold):
    """Rows: true class; columns: predicted class; Melanoma first (a clinical 2x2 table)."""
    matrix = np.array(
        [
            [counts["true_positive"], counts["false_negative"]],
            [counts["false_positive"], counts["true_negative"]],
        ]
    )
    row_totals = matrix.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = matrix / row_totals
    figure = new_figure(5.2, 4.6)
    axes = figure.subplots()
    image = axes.imshow(np.nan_to_num(rates), cmap="Blues", vmin=0, vmax=1)
    for row, column in np.ndindex(matrix.shape):
        rate = rates[row, column]
        text = f"{matrix[row, column]:,}\n" + ("(no images)" if np.isnan(rate) else f"({rate:.1%} of row)")
        colour = "white" if rate > 0.5 else "black"
        axes.text(column, row, text, ha="center", va="center", color=colour, fontsize=12)
    names = [MELANOMA_NAME, NON_MELANOMA_NAME]
    axes.set_xticks([0, 1], names)
    axes.set_yticks([0, 1], names)
    axes.set(
        title=f"Confusion matrix at threshold {threshold:.4f}", xlabel="predicted class", ylabel="true class"
    )
    figure.colorbar(image, ax=axes, label="share of the true class")
    return figure


def mark_operating_point(axes, x, y, threshold):
    axes.plot(x, y, "o", color="tab:red", markersize=9, label=f"threshold {threshold:.4f}", zorder=3)


def plot_roc_curve(labels, probabilities, result):
    if result["roc_auc"] is None:
        return undefined_figure("ROC curve", NEEDS_BOTH)
    fpr, tpr, _ = metrics.roc_points(labels, probabilities)
    figure = new_figure()
    axes = figure.subplots()
    axes.plot(fpr, tpr, color="tab:blue", label=f"model (AUC {result['roc_auc']:.3f})")
    axes.plot([0, 1], [0, 1], "--", color="grey", label="chance (AUC 0.5)")
    mark_operating_point(axes, 1 - result["specificity"], result["sensitivity"], result["threshold"])
    axes.set(
        title="ROC curve: melanoma vs non-melanoma",
        xlabel="false positive rate (1 - specificity)",
        ylabel="true positive rate (sensitivity)",
        aspect="equal",
    )
    axes.legend(loc="lower right")
    return figure


def plot_precision_recall_curve(labels, probabilities, result):
    if result["average_precision"] is None:
        return undefined_figure("Precision-recall curve", NEEDS_BOTH)
    precision, recall, _ = skmetrics.precision_recall_curve(labels, probabilities)
    prevalence = result["n_melanoma"] / result["n_images"]
    figure = new_figure()
    axes = figure.subplots()
    axes.step(
        recall,
        precision,
        where="post",
        color="tab:blue",
        label=f"model (AP {result['average_precision']:.3f})",
    )
    axes.axhline(prevalence, linestyle="--", color="grey", label=f"chance (melanoma share {prevalence:.1%})")
    if result["precision"] is not None:
        mark_operating_point(axes, result["sensitivity"], result["precision"], result["threshold"])
    axes.set(
        title="Precision-recall curve",
        xlabel="recall (sensitivity)",
        ylabel="precision (melanomas among flagged)",
        ylim=(0, 1.02),
    )
    axes.legend(loc="upper right")
    return figure


def plot_threshold_curve(labels, probabilities, threshold):
    thresholds = np.unique(np.r_[0.0, probabilities, 1.0])
    # dtype=float: a rate a class cannot define (None) becomes NaN, which is not drawn.
    rates = np.array(
        [metrics.sensitivity_specificity(labels, probabilities, t) for t in thresholds], dtype=float
    )
    figure = new_figure()
    axes = figure.subplots()
    for column, name, colour in ((0, "sensitivity", "tab:red"), (1, "specificity", "tab:blue")):
        if not np.all(np.isnan(rates[:, column])):
            # "pre": a rate holds on (previous threshold, this one], since it counts p >= threshold.
            axes.step(thresholds, rates[:, column], where="pre", color=colour, label=name)
    axes.axvline(threshold, linestyle="--", color="black", label=f"stored threshold {threshold:.4f}")
    axes.set(
        title="Sensitivity and specificity against the threshold",
        xlabel="threshold on the melanoma probability",
        ylabel="rate",
        xlim=(0, 1),
        ylim=(-0.02, 1.02),
    )
    axes.legend(loc="center right")
    return figure


def plot_calibration(labels, series):
    """Reliability diagram of each {name: (probabilities, Brier score, ECE)}, with the share of
    images per bin of the last series (the probability that is shown) below it."""
    figure = new_figure(6.4, 6.0)
    curve, histogram = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    curve.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    for (name, (probabilities, brier, ece)), colour in zip(
        series.items(), ("tab:orange", "tab:blue"), strict=False
    ):
        _, mean_probability, melanoma_fraction = metrics.calibration_bins(labels, probabilities)
        label = f"{name} (Brier {brier:.3f}, ECE {ece:.3f})"
        curve.plot(mean_probability, melanoma_fraction, "o-", color=colour, label=label)
    curve.set(title="Reliability diagram", ylabel="fraction that are melanomas", ylim=(-0.02, 1.02))
    curve.legend(loc="upper left")
    edges = np.linspace(0, 1, metrics.CALIBRATION_BINS + 1)
    counts = metrics.bin_sizes(probabilities)
    histogram.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=colour, alpha=0.6)
    histogram.set(xlabel="predicted melanoma probability", ylabel="images", xlim=(0, 1))
    return figure


def history_series(history, key):
    return np.array(
        [np.nan if epoch.get(key) is None else epoch[key] for epoch in history["epochs"]], dtype=float
    )


def plot_learning_curves(history):
    epochs = history_series(history, "epoch")
    figure = new_figure(12, 3.8)
    for axes, (key, title) in zip(figure.subplots(1, 3), HISTORY_CURVES, strict=True):
        for split, colour in (("train", "tab:blue"), ("val", "tab:orange")):
            values = history_series(history, f"{split}_{key}")
            if not np.all(np.isnan(values)):
                axes.plot(epochs, values, "o-", color=colour, label=split)
        if history.get("best_epoch") is not None:
            axes.axvline(history["best_epoch"], linestyle="--", color="grey", label="best epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set(title=title, xlabel="epoch", ylabel=title.lower())
        if axes.get_legend_handles_labels()[0]:  # an empty legend warns
            axes.legend()
    return figure


def plot_misclassified(missed, alarms, threshold, per_kind):
    """Missed melanomas on the first rows, false alarms from a fresh row below them."""
    sections = [
        ("missed melanoma", "tab:red", missed[:per_kind]),
        ("false alarm", "tab:orange", alarms[:per_kind]),
    ]
    sections = [section for section in sections if section[2]]
    if not sections:
        return undefined_figure(
            "Misclassified images", f"No image is misclassified at threshold {threshold:.4f}."
        )
    rows_per_section = [-(-len(errors) // GALLERY_COLUMNS) for _, _, errors in sections]
    figure = new_figure(2.3 * GALLERY_COLUMNS, 2.3 * sum(rows_per_section) + 0.4)
    grid = figure.subplots(sum(rows_per_section), GALLERY_COLUMNS, squeeze=False)
    for axes in grid.ravel():
        axes.set_axis_off()
    first_row = 0
    for (kind, colour, errors), rows in zip(sections, rows_per_section, strict=True):
        for index, error in enumerate(errors):
            show_error(
                grid[first_row + index // GALLERY_COLUMNS, index % GALLERY_COLUMNS], error, kind, colour
            )
        first_row += rows
    figure.suptitle(
        f"Worst errors at threshold {threshold:.4f}: {len(missed)} missed melanomas, {len(alarms)} "
        f"false alarms (up to {per_kind} of each shown)"
    )
    return figure


def show_error(axes, error, kind, colour):
    thumbnail = image_input.load_image(error["path"], min_size=THUMBNAIL_SIZE)
    thumbnail.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    axes.imshow(thumbnail)
    title = f"{kind}\n{shorten(error['file'])}\np(melanoma) = {error['probability']:.4f}"
    axes.set_title(title, color=colour, fontsize=9)


def shorten(name, limit=30):
    return name if len(name) <= limit else f"{name[: limit // 2 - 1]}...{name[-(limit // 2 - 2) :]}"


def plot_subgroups(subgroup_results, result):
    """Sensitivity and specificity of every group with their 95% Wilson intervals, one row per
    group, the whole folder's value as a dashed line; an empty rate says why it is empty."""
    rows = [
        (dimension, group, row)
        for dimension, groups in subgroup_results["groups"].items()
        for group, row in groups.items()
    ]
    figure = new_figure(11, 1.4 + 0.32 * len(rows))
    panels = figure.subplots(1, 2, sharey=True)
    y = np.arange(len(rows))[::-1]
    for axes, rate, colour in zip(
        panels, ("sensitivity", "specificity"), ("tab:red", "tab:blue"), strict=True
    ):
        for position, (_, _, row) in zip(y, rows, strict=True):
            if row[rate] is None:
                axes.text(0.02, position, row["why_empty"][rate], va="center", fontsize=8, color="grey")
                continue
            low, high = row[f"{rate}_interval"]
            error = [[row[rate] - low], [high - row[rate]]]
            axes.errorbar(row[rate], position, xerr=error, fmt="o", color=colour, capsize=3, markersize=4)
        title = f"{rate.capitalize()} (95% Wilson interval)"
        if result[rate] is not None:
            axes.axvline(result[rate], linestyle="--", color="black")
            title += f"\ndashed: whole folder, {result[rate]:.1%}"
        for boundary in np.cumsum([len(groups) for groups in subgroup_results["groups"].values()])[:-1]:
            axes.axhline(len(rows) - boundary - 0.5, color="lightgrey", linewidth=0.8)
        axes.set(title=title, xlabel=rate, xlim=(-0.02, 1.02))
    labels = [
        f"{subgroups.group_label(dimension, group)} (n={row['n_images']}, {row['n_melanoma']} mel)"
        for dimension, group, row in rows
    ]
    panels[0].set_yticks(y, labels, fontsize=8)
    panels[0].set_ylim(-0.7, len(rows) - 0.3)
    figure.suptitle(f"Results by subgroup at threshold {result['threshold']:.4f}")
    return figure


def calibration_series(result, uncalibrated, probabilities):
    """The reliability diagram's curves: before calibration (when there is one) and as shown."""
    calibration = result["calibration"]
    shown = (
        probabilities,
        calibration["after"]["brier_score"],
        calibration["after"]["expected_calibration_error"],
    )
    if not calibration["calibrated"]:
        return {"model (not calibrated)": shown}
    before = calibration["before"]
    return {
        "before calibration": (uncalibrated, before["brier_score"], before["expected_calibration_error"]),
        "calibrated (shown)": shown,
    }


def draw_figures(labels, probabilities, uncalibrated, result, context, errors, per_kind):
    """{file name: Figure}; learning_curves.png only when there is a training history."""
    threshold = result["threshold"]
    figures = {
        "class_distribution.png": plot_class_distribution(context["class_distribution"]),
        "confusion_matrix.png": plot_confusion_matrix(result["confusion_matrix"], threshold),
        "roc_curve.png": plot_roc_curve(labels, probabilities, result),
        "precision_recall_curve.png": plot_precision_recall_curve(labels, probabilities, result),
        "threshold_curve.png": plot_threshold_curve(labels, probabilities, threshold),
        "calibration.png": plot_calibration(labels, calibration_series(result, uncalibrated, probabilities)),
        "misclassified.png": plot_misclassified(*errors, threshold, per_kind),
    }
    if context["history"] is not None:
        figures["learning_curves.png"] = plot_learning_curves(context["history"])
    if result["subgroups"]["groups"]:
        figures["subgroups.png"] = plot_subgroups(result["subgroups"], result)
    return figures


# --- the report ------------------------------------------------------------------------------


def percent(value):
    return "undefined" if value is None else f"{value:.1%}"


def in_plain_words(rate):
    """0.9 -> ', about 9 in 10'; '' where a small fraction would round to none or all."""
    fraction = Fraction(rate).limit_denominator(10)
    if fraction.numerator == 0 or fraction == 1:
        return ""
    return f", about {fraction.numerator} in {fraction.denominator}"


def screening_paragraph(result):
    """What the numbers mean for a person being screened, in plain words."""
    counts, threshold = result["confusion_matrix"], result["threshold"]
    n_melanoma, n_benign = result["n_melanoma"], result["n_non_melanoma"]
    flagged = counts["true_positive"] + counts["false_positive"]
    sentences = []
    if n_melanoma:
        sensitivity = result["sensitivity"]
        sentences.append(
            f"At the threshold {threshold:.4f}, the model flags {counts['true_positive']} of the "
            f"{n_melanoma} melanomas in this folder ({percent(sensitivity)}{in_plain_words(sensitivity)}) "
            f"and misses {counts['false_negative']}."
        )
    else:
        sentences.append(
            "This folder holds no melanomas, so how many melanomas the model finds cannot be measured."
        )
    if n_benign:
        false_alarm_rate = 1 - result["specificity"]
        sentences.append(
            f"It also flags {counts['false_positive']} of the {n_benign} benign lesions "
            f"({percent(false_alarm_rate)}{in_plain_words(false_alarm_rate)}): each would mean an "
            f"unnecessary referral or biopsy."
        )
    else:
        sentences.append("This folder holds no benign lesions, so false alarms cannot be measured.")
    if flagged and n_melanoma and n_benign:
        sentences.append(
            f"Of the {flagged} flagged lesions, {counts['true_positive']} are melanomas "
            f"({percent(result['precision'])}); "
            f"melanoma makes up {percent(n_melanoma / result['n_images'])} of this folder, and where it is "
            f"rarer, fewer flagged lesions will be melanomas."
        )
    interval = result["wilson_intervals_95"]["sensitivity"]
    if interval:
        sentences.append(
            f"With {n_melanoma} melanomas, the true sensitivity could plausibly be anywhere from "
            f"{percent(interval[0])} to {percent(interval[1])} (95% Wilson interval)."
        )
    sentences += subgroup_sentences(result.get("subgroups"))
    sentences.append(
        f"These are measurements on {result['n_images']} images, not a clinical validation; "
        f"this tool is not a medical device."
    )
    return textwrap.fill(" ".join(sentences), 90)


METRIC_LINES = (
    ("Accuracy", "accuracy"),
    ("Balanced accuracy", "balanced_accuracy"),
    ("Precision (PPV)", "precision"),
    ("Sensitivity (recall)", "sensitivity"),
    ("Specificity", "specificity"),
    ("Negative predictive value", "negative_predictive_value"),
    ("F1 score", "f1"),
    ("ROC AUC", "roc_auc"),
    ("Average precision", "average_precision"),
    ("AUC above 80% sensitivity (ISIC)", "auc_above_80_sensitivity"),
    ("Specificity at 95% sensitivity", "specificity_at_95_sensitivity"),
    ("Sensitivity at 95% specificity", "sensitivity_at_95_specificity"),
    ("Brier score (lower is better)", "brier_score"),
    ("Expected calibration error", "expected_calibration_error"),
)

UNDEFINED_BECAUSE = {
    "precision": "no image is flagged",
    "sensitivity": "no melanomas",
    "specificity": "no benign lesions",
    "negative_predictive_value": "no image is cleared",
    "f1": "no melanomas and none flagged",
}
OPERATING_POINT_THRESHOLDS = {
    "specificity_at_95_sensitivity": "threshold_for_95_sensitivity",
    "sensitivity_at_95_specificity": "threshold_for_95_specificity",
}


# The metrics repeated for the unflagged images (calibration is reported once, for all).
RANKING_AND_DECISION_LINES = tuple(
    line for line in METRIC_LINES if line[1] not in ("brier_score", "expected_calibration_error")
)


def metric_lines(result, lines_shown=METRIC_LINES):
    lines = []
    for label, key in lines_shown:
        value = result[key]
        text = (
            f"undefined ({UNDEFINED_BECAUSE.get(key, 'needs both classes')})"
            if value is None
            else f"{value:.3f}"
        )
        interval = result["confidence_intervals_95"].get(key)
        if interval:
            text += f"   95% CI {interval[0]:.3f} to {interval[1]:.3f}"
        wilson = result["wilson_intervals_95"].get(key)
        if wilson:
            text += f" (Wilson {wilson[0]:.3f} to {wilson[1]:.3f})"
        threshold_key = OPERATING_POINT_THRESHOLDS.get(key)
        if threshold_key and result[threshold_key] is not None:
            text += f"   (at threshold {result[threshold_key]:.4f})"
        lines.append(f"  {label:<34}{text}")
    return lines


def confusion_lines(counts):
    return [
        f"  {'':<16}{'predicted ' + MELANOMA_NAME:>22}{'predicted ' + NON_MELANOMA_NAME:>26}",
        f"  {MELANOMA_NAME:<16}{counts['true_positive']:>22,}{counts['false_negative']:>26,}",
        f"  {NON_MELANOMA_NAME:<16}{counts['false_positive']:>22,}{counts['true_negative']:>26,}",
    ]


def distribution_lines(distribution, source):
    lines = [f"Class distribution (from {source}):"]
    for split, classes in distribution.items():
        total = sum(sum(kinds.values()) for kinds in classes.values())
        augmented = sum(kinds["augmented"] for kinds in classes.values())
        lines.append(f"  {split}: {total:,} images ({augmented:,} augmented)")
        for name, kinds in classes.items():
            count = kinds["original"] + kinds["augmented"]
            lines.append(
                f"    {name}: {percent(metrics.ratio(count, total))} "
                f"({count:,}; {kinds['augmented']:,} augmented)"
            )
    return lines


FLAGGED_LISTED = 20


def trust_lines(result):
    """Calibration before and after, the images the model cannot judge, the quality warnings."""
    calibration, flagging = result["calibration"], result["flagging"]
    before, after = calibration["before"], calibration["after"]
    if calibration["calibrated"]:
        lines = [
            f"Calibration: {calibration['rule']}.",
            f"  ECE {before['expected_calibration_error']:.3f} before, "
            f"{after['expected_calibration_error']:.3f} after; Brier score {before['brier_score']:.3f} "
            f"before, {after['brier_score']:.3f} after.",
        ]
    else:
        lines = ["Calibration: none in this checkpoint; the probabilities are the network's raw output."]
    if not flagging["available"]:
        return [*lines, "Flagging: not available (this checkpoint has no out-of-distribution score)."]
    files = flagging["flagged_files"]
    lines += [
        f"Flagged as not judgeable: {flagging['n_flagged']} of {result['n_images']} images "
        f"({flagging['rule']}).",
        *(f"  {name}" for name in files[:FLAGGED_LISTED]),
    ]
    if len(files) > FLAGGED_LISTED:
        lines.append(f"  ... and {len(files) - FLAGGED_LISTED} more (metrics.json lists all)")
    if result["unflagged"] is not None:
        kept = result["unflagged"]
        lines.append(f"Metrics on the {kept['n_images']} unflagged images:")
        lines += metric_lines(kept, RANKING_AND_DECISION_LINES)
    lines.append("Quality warnings: " + ("none" if not result["warnings"] else ""))
    lines += [f"  {count} x {warning}" for warning, count in result["warnings"].items()]
    return lines


def rate_text(rate, value):
    return f"{value:.3f}" if rate == "roc_auc" else percent(value)


RATE_NAMES = {"sensitivity": "sensitivity", "specificity": "specificity", "roc_auc": "ROC AUC"}


def subgroup_sentences(subgroup_results):
    """The groups whose 95% interval lies wholly below the whole folder's value, by name."""
    if not subgroup_results or not subgroup_results["groups"]:
        return []
    if not subgroup_results["below"]:
        return [
            "No group (by diagnosis, sex, age or body site) has an interval wholly below the whole "
            "folder's figure; groups with few melanomas give wide intervals and prove nothing either way."
        ]
    worse = [worse_sentence(item) for item in subgroup_results["below"]]
    return [
        "The model does worse for these groups (95% interval wholly below the whole folder's "
        f"figure): {'; '.join(worse)}."
    ]


def worse_sentence(item):
    rate, (low, high) = item["metric"], item["interval"]
    return (
        f"{subgroups.group_label(item['dimension'], item['group'])}: {RATE_NAMES[rate]} "
        f"{rate_text(rate, item['value'])} (95% interval {rate_text(rate, low)} to {rate_text(rate, high)}, "
        f"against {rate_text(rate, item['overall'])} for the whole folder)"
    )


def interval_cell(row, rate):
    """'81.8% (61.5% to 92.7%)', or why the cell is empty."""
    if row[rate] is None:
        why = row["why_empty"][rate]
        return (
            f"- (under {metrics.MIN_PER_CLASS_FOR_AUC} per class)"
            if rate == "roc_auc" and why.startswith("needs")
            else f"- ({why})"
        )
    low, high = row[f"{rate}_interval"] or (None, None)
    if low is None:
        return rate_text(rate, row[rate])
    return f"{rate_text(rate, row[rate])} ({rate_text(rate, low)} to {rate_text(rate, high)})"


def cannot_judge_cell(row):
    return "n/a" if row["n_cannot_judge"] is None else str(row["n_cannot_judge"])


def subgroup_lines(subgroup_results, result):
    """The report's section: one table per dimension (diagnosis: the share flagged as melanoma)."""
    title = "Results by subgroup"
    if not subgroup_results["groups"]:
        return [f"{title}: {subgroup_results['note']}."]
    lines = [
        f"{title} (at threshold {result['threshold']:.4f}; facts from {subgroup_results['source']}):",
        "  Sensitivity and specificity with 95% Wilson intervals; ROC AUC with a 95% stratified",
        f"  bootstrap interval ({result['bootstrap_resamples']} resamples) where a group has at least "
        f"{subgroup_results['min_per_class_for_auc']} images",
        "  of each class. Groups with few melanomas give wide intervals and prove nothing either way.",
    ]
    for dimension, groups in subgroup_results["groups"].items():
        if dimension == "diagnosis":
            lines += diagnosis_lines(groups)
            continue
        lines += [
            f"  By {subgroups.DIMENSION_NAMES[dimension]}:",
            f"    {'group':<20}{'n':>6}{'melanomas':>11}  {'sensitivity (95% CI)':<26}"
            f"{'specificity (95% CI)':<26}{'ROC AUC (95% CI)':<26}cannot judge",
        ]
        for group, row in groups.items():
            lines.append(
                f"    {group:<20}{row['n_images']:>6,}{row['n_melanoma']:>11,}  "
                f"{interval_cell(row, 'sensitivity'):<26}{interval_cell(row, 'specificity'):<26}"
                f"{interval_cell(row, 'roc_auc'):<26}{cannot_judge_cell(row)}"
            )
    return lines


def diagnosis_lines(groups):
    """Each diagnosis's share flagged as melanoma: the sensitivity for melanomas, the false-alarm
    share for the others (their false alarms add up to the confusion matrix's)."""
    lines = [
        "  By diagnosis (flagged as melanoma: for melanomas the sensitivity, for the others false alarms):",
        f"    {'diagnosis':<36}{'n':>6}{'flagged':>9}  {'share (95% Wilson interval)':<30}cannot judge",
    ]
    for group, row in groups.items():
        flagged = row["true_positive"] + row["false_positive"]
        share = metrics.ratio(flagged, row["n_images"])
        low, high = metrics.wilson_interval(flagged, row["n_images"])
        lines.append(
            f"    {subgroups.group_label('diagnosis', group):<36}{row['n_images']:>6,}{flagged:>9,}  "
            f"{f'{percent(share)} ({percent(low)} to {percent(high)})':<30}{cannot_judge_cell(row)}"
        )
    return lines


def known(value):
    return "not recorded" if value is None else value


def summary_report(result, context):
    """The text of summary_report.txt: `result` is metrics.json's numbers, `context` the run's facts
    (model, data, history, class distribution, device, precision, TTA, speed)."""
    model = context["model"]
    title = "Melanoma classifier: evaluation report"
    tta = "on (8 flips/rotations averaged)" if context["tta"] else "off"
    if context["history"] is None:
        learning_curves = f"skipped: no training history at {context['history_path']}"
    else:
        learning_curves = f"learning_curves.png, from {context['history_path']}"
    lines = [
        title,
        "=" * len(title),
        "",
        "What the numbers mean for screening",
        "-----------------------------------",
        screening_paragraph(result),
        "",
        f"Model:      {model['path']} (weights started from: {known(model['weights'])}; "
        f"epoch {known(model['epoch'])}; trained {known(model['trained_at'])})",
        f"Threshold:  {result['threshold']:.4f} (chosen by: {known(model['threshold_rule'])})",
        f"Data:       {context['data']}: {result['n_images']:,} images, {result['n_melanoma']:,} "
        f"{MELANOMA_NAME}, {result['n_non_melanoma']:,} {NON_MELANOMA_NAME}",
        f"Scoring:    {context['device']}, {context['precision']}, test-time augmentation {tta}, "
        f"{context['images_per_second']:.1f} images/s",
        f"Learning curves: {learning_curves}",
        "",
        f"Metrics (95% CIs: stratified bootstrap, {result['bootstrap_resamples']} resamples, "
        f"seed {result['bootstrap_seed']}):",
        *metric_lines(result),
        "",
        "Confusion matrix (rows: true class, columns: predicted class):",
        *confusion_lines(result["confusion_matrix"]),
        "",
        *trust_lines(result),
        "",
        *subgroup_lines(result["subgroups"], result),
        "",
        *distribution_lines(context["class_distribution"], context["class_distribution_source"]),
    ]
    return "\n".join(lines) + "\n"
