"""Score a prepared split with a checkpoint: plots, a plain-language report and metrics.json.

    python analysis.py --model best_model.pth --data prepared_dataset/test --out results

The image size, normalisation and decision threshold come from the checkpoint, and images are
scored in the same precision as the app, so these numbers describe the decisions the app makes.
"""

import contextlib
import csv
import json
import os
import shutil
import tempfile
import textwrap
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn import metrics as skmetrics
from tqdm import tqdm

import common

SPLITS = ("train", "val", "test")
ISIC_MIN_SENSITIVITY = 0.80  # ISIC 2018/2019 challenges: "AUC, Sens > 80%"
SCREENING_RATE = 0.95  # specificity at 95% sensitivity, sensitivity at 95% specificity
CALIBRATION_BINS = 10
GALLERY_COLUMNS = 4
THUMBNAIL_SIZE = 224
DPI = 110
METRICS_FILE = "metrics.json"
OUTPUT_FILES = (
    "class_distribution.png",
    "confusion_matrix.png",
    "roc_curve.png",
    "precision_recall_curve.png",
    "threshold_curve.png",
    "calibration.png",
    "learning_curves.png",
    "misclassified.png",
    "misclassified.csv",
    "predictions.csv",
    "summary_report.txt",
    METRICS_FILE,
)
MELANOMA_NAME = common.CLASS_NAMES[common.MELANOMA]
NON_MELANOMA_NAME = common.CLASS_NAMES[common.NON_MELANOMA]
NEEDS_BOTH = "undefined: the folder needs images of both classes"


def get_args_parser():
    parser = common.ArgumentParser(
        description="Score a folder of mel_*/nomel_* images with a checkpoint; write plots, "
        "summary_report.txt and metrics.json."
    )
    parser.add_argument("--model", default="best_model.pth", help="checkpoint written by model.py")
    parser.add_argument(
        "--data", default="prepared_dataset/test", help="folder of mel_*/nomel_* images to score"
    )
    parser.add_argument(
        "--history",
        default="training_history.json",
        help="training history written by model.py (learning_curves.png is skipped when missing)",
    )
    parser.add_argument("--out", default="results", help="folder for the plots and reports")
    parser.add_argument("--batch-size", type=common.positive_int, default=32, help="images per batch")
    parser.add_argument(
        "--workers",
        type=common.non_negative_int,
        default=min(4, os.cpu_count() or 1),
        help="image-decoding worker processes (0 decodes in the main process)",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation: average the 8 flips/rotations of each image (8x slower)",
    )
    parser.add_argument(
        "--bootstrap",
        type=common.positive_int,
        default=1000,
        help="bootstrap resamples for the 95%% confidence intervals",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    parser.add_argument(
        "--gallery",
        type=common.positive_int,
        default=8,
        help="worst false negatives and false positives shown",
    )
    return parser


# --- reading the inputs ----------------------------------------------------------------------


HISTORY_CURVES = (("loss", "Loss"), ("accuracy", "Accuracy"), ("auc", "ROC AUC"))
HISTORY_KEYS = ("epoch", *(f"{split}_{key}" for split in ("train", "val") for key, _ in HISTORY_CURVES))


def read_history(path):
    """The training history dict, or None when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise common.UserError(f"{path}: not a readable training history ({error})") from None
    if not isinstance(history, dict) or not isinstance(history.get("epochs"), list) or not history["epochs"]:
        raise common.UserError(f"{path}: not a training history (no 'epochs' list with at least one epoch)")
    for epoch in history["epochs"]:
        if not isinstance(epoch, dict) or not all(is_number_or_null(epoch.get(key)) for key in HISTORY_KEYS):
            raise common.UserError(
                f"{path}: every epoch needs numbers (or null) for {', '.join(HISTORY_KEYS)}"
            )
    return history


def is_number_or_null(value):
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def class_distribution(data_folder):
    """({split: {class name: {"original": n, "augmented": n}}}, where the counts came from).

    The prepared tree's manifest.csv when there is one; otherwise the file names of the sibling
    train/val/test folders, or of the scored folder alone when it is not part of such a tree.
    """
    data_folder = Path(data_folder)
    manifest = data_folder.parent / "manifest.csv"
    if manifest.is_file():
        return distribution_table(manifest_rows(manifest)), str(manifest)
    if data_folder.name in SPLITS:
        folders = [data_folder.parent / split for split in SPLITS if (data_folder.parent / split).is_dir()]
    else:
        folders = [data_folder]
    rows = [
        (folder.name, label, common.is_augmented_filename(path.name))
        for folder in folders
        for path, label in common.list_prepared_images(folder)
    ]
    return distribution_table(rows), "file names in " + ", ".join(str(folder) for folder in folders)


def manifest_rows(manifest):
    """(split, label, augmented) for each row of a prepared tree's manifest.csv."""
    try:
        with open(manifest, newline="", encoding="utf-8") as file:
            return [manifest_row(row) for row in csv.DictReader(file)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise common.UserError(f"{manifest}: not a readable manifest ({error})") from None
    except (KeyError, ValueError) as error:
        raise common.UserError(
            f"{manifest}: expected columns split,label (1/0),augmented (yes/no) ({error})"
        ) from None


def manifest_row(row):
    augmented = {"yes": True, "no": False}[row["augmented"]]
    label = {"1": common.MELANOMA, "0": common.NON_MELANOMA}[row["label"]]
    return row["split"], label, augmented


def distribution_table(rows):
    counts = Counter(rows)
    order = {split: index for index, split in enumerate(SPLITS)}  # train, val, test, then others
    splits = sorted({split for split, _, _ in rows}, key=lambda split: (order.get(split, len(SPLITS)), split))
    return {
        split: {
            common.CLASS_NAMES[label]: {
                "original": counts[(split, label, False)],
                "augmented": counts[(split, label, True)],
            }
            for label in (common.MELANOMA, common.NON_MELANOMA)
        }
        for split in splits
    }


# --- scoring ---------------------------------------------------------------------------------


def dihedral_views(images):
    """The 8 flips/rotations of a batch of square images: nothing is cropped or filled in."""
    for oriented in (images, images.flip(-1)):
        for quarter_turns in range(4):
            yield torch.rot90(oriented, quarter_turns, dims=(-2, -1))


def batch_probabilities(model, images, device, amp_dtype, tta):
    """Melanoma probabilities of one batch; with `tta`, the mean over its 8 dihedral views."""
    if not tta:
        return common.melanoma_probabilities(model, images, device, amp_dtype)
    images = images.to(device, non_blocking=True)  # once, not once per view
    views = [common.melanoma_probabilities(model, view, device, amp_dtype) for view in dihedral_views(images)]
    return np.mean(views, axis=0)


@torch.inference_mode()
def score_folder(model, dataset, device, batch_size, workers, tta):
    """(melanoma probability of each image in dataset order, images scored per second)."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda"
    )
    amp_dtype = common.inference_amp_dtype(device)
    probabilities = []
    start = time.perf_counter()
    # disable=None: a bar on a terminal, none in logs and pipes.
    with tqdm(total=len(dataset), unit="img", desc="Scoring", disable=None) as progress:
        for images, _ in batches_with_readable_errors(loader):
            probabilities.append(batch_probabilities(model, images, device, amp_dtype, tta))
            progress.update(len(images))
    return np.concatenate(probabilities), len(dataset) / (time.perf_counter() - start)


def batches_with_readable_errors(loader):
    """The loader's batches; an unreadable image stops the run with the image's one-line message.

    A DataLoader worker re-raises an ImageError with the worker's whole traceback as its message;
    the last line of that traceback is `common.ImageError: <the message>`.
    """
    try:
        yield from loader
    except common.ImageError as error:
        last_line = str(error).strip().splitlines()[-1]
        raise common.ImageError(last_line.removeprefix("common.ImageError: ")) from None


# --- metrics ---------------------------------------------------------------------------------


def ratio(numerator, denominator):
    """numerator / denominator as a float, None (undefined) when the denominator is 0."""
    return float(numerator / denominator) if denominator else None


def defined(value):
    """NaN (common's "undefined") becomes None, which metrics.json writes as null."""
    return None if value is None or np.isnan(value) else float(value)


def has_both_classes(labels):
    return len(np.unique(labels)) == 2


COUNT_NAMES = ("true_positive", "false_negative", "false_positive", "true_negative")


def confusion_counts(labels, predicted):
    positives, flagged = labels == common.MELANOMA, predicted == common.MELANOMA
    return {
        "true_positive": int(np.sum(positives & flagged)),
        "false_negative": int(np.sum(positives & ~flagged)),
        "false_positive": int(np.sum(~positives & flagged)),
        "true_negative": int(np.sum(~positives & ~flagged)),
    }


def metrics_at_threshold(labels, probabilities, threshold):
    """Counts and the metrics of the decisions at `threshold`; None where undefined."""
    counts = confusion_counts(labels, common.predict_labels(probabilities, threshold))
    tp, fn, fp, tn = (counts[name] for name in COUNT_NAMES)
    sensitivity, specificity = map(defined, common.sensitivity_specificity(labels, probabilities, threshold))
    return counts, {
        "accuracy": ratio(tp + tn, len(labels)),
        "balanced_accuracy": (sensitivity + specificity) / 2 if has_both_classes(labels) else None,
        "precision": ratio(tp, tp + fp),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "negative_predictive_value": ratio(tn, tn + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


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
    """(best specificity among thresholds reaching `min_sensitivity`, that threshold)."""
    first = int(np.searchsorted(tpr, min_sensitivity, side="left"))  # both rates only grow along the curve
    return float(1 - fpr[first]), finite_or_none(thresholds[first])


def sensitivity_at_specificity(fpr, tpr, thresholds, min_specificity):
    """(best sensitivity among thresholds reaching `min_specificity`, that threshold)."""
    last = int(np.searchsorted(fpr, 1 - min_specificity, side="right")) - 1
    return float(tpr[last]), finite_or_none(thresholds[last])


def finite_or_none(value):
    """The curve's first threshold is +inf ("flag nothing"): not a threshold anyone can set."""
    return float(value) if np.isfinite(value) else None


def ranking_metrics(labels, probabilities):
    """Threshold-free metrics; all None unless both classes are present."""
    names = (
        "roc_auc",
        "average_precision",
        "auc_above_80_sensitivity",
        "specificity_at_95_sensitivity",
        "threshold_for_95_sensitivity",
        "sensitivity_at_95_specificity",
        "threshold_for_95_specificity",
    )
    if not has_both_classes(labels):
        return dict.fromkeys(names)
    fpr, tpr, thresholds = roc_points(labels, probabilities)
    specificity, specificity_threshold = specificity_at_sensitivity(fpr, tpr, thresholds, SCREENING_RATE)
    sensitivity, sensitivity_threshold = sensitivity_at_specificity(fpr, tpr, thresholds, SCREENING_RATE)
    values = (
        float(skmetrics.roc_auc_score(labels, probabilities)),
        float(skmetrics.average_precision_score(labels, probabilities)),
        auc_above_sensitivity(fpr, tpr),
        specificity,
        specificity_threshold,
        sensitivity,
        sensitivity_threshold,
    )
    return dict(zip(names, values, strict=True))


def calibration_bins(labels, probabilities, bins=CALIBRATION_BINS):
    """(images, mean predicted probability, fraction of melanomas) per equal-width bin.

    Bins are closed on the right like sklearn.calibration.calibration_curve; empty bins give NaN.
    """
    which = np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], probabilities)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_probability = np.bincount(which, weights=probabilities, minlength=bins) / counts
        melanoma_fraction = np.bincount(which, weights=labels, minlength=bins) / counts
    return counts, mean_probability, melanoma_fraction


def expected_calibration_error(labels, probabilities):
    """Mean |fraction of melanomas - mean probability| over the bins, weighted by their size."""
    counts, mean_probability, melanoma_fraction = calibration_bins(labels, probabilities)
    filled = counts > 0
    gaps = np.abs(melanoma_fraction[filled] - mean_probability[filled])
    return float(np.sum(counts[filled] * gaps) / counts.sum())


def bootstrap_intervals(labels, probabilities, threshold, resamples, seed):
    """Percentile 95% intervals of ROC AUC, sensitivity and specificity.

    Each class is resampled on its own (a stratified bootstrap, as in pROC): every resample keeps
    the folder's class counts, so the AUC stays defined and no resample is thrown away.
    """
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == label) for label in (common.MELANOMA, common.NON_MELANOMA)]
    samples = {"roc_auc": [], "sensitivity": [], "specificity": []}
    for _ in range(resamples):
        index = np.concatenate([rng.choice(members, len(members)) for members in by_class])
        sample_labels, sample_probabilities = labels[index], probabilities[index]
        sensitivity, specificity = common.sensitivity_specificity(
            sample_labels, sample_probabilities, threshold
        )
        samples["sensitivity"].append(sensitivity)
        samples["specificity"].append(specificity)
        if has_both_classes(labels):
            samples["roc_auc"].append(skmetrics.roc_auc_score(sample_labels, sample_probabilities))
    return {name: percentile_interval(values) for name, values in samples.items()}


def wilson_interval(successes, trials, z=1.959964):
    """95% Wilson score interval of a proportion; None without trials.

    Unlike a bootstrap, it stays honest at 0% or 100% and for a handful of images: 2 of 2
    melanomas found gives 34% to 100%, where every bootstrap resample says exactly 100%.
    """
    if not trials:
        return None
    rate = successes / trials
    centre = (rate + z**2 / (2 * trials)) / (1 + z**2 / trials)
    half_width = z * np.sqrt(rate * (1 - rate) / trials + z**2 / (4 * trials**2)) / (1 + z**2 / trials)
    return [float(max(0.0, centre - half_width)), float(min(1.0, centre + half_width))]


def rate_intervals(counts):
    """Wilson intervals of sensitivity and specificity from the confusion counts."""
    tp, fn, fp, tn = (counts[name] for name in COUNT_NAMES)
    return {"sensitivity": wilson_interval(tp, tp + fn), "specificity": wilson_interval(tn, tn + fp)}


def percentile_interval(values, level=0.95):
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if not values.size:
        return None
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def evaluate(labels, probabilities, threshold, resamples, seed):
    """Everything metrics.json reports about the scored images (None where undefined)."""
    labels, probabilities = np.asarray(labels), np.asarray(probabilities, dtype=float)
    counts, decision_metrics = metrics_at_threshold(labels, probabilities, threshold)
    return {
        "n_images": len(labels),
        "n_melanoma": int(np.sum(labels == common.MELANOMA)),
        "n_non_melanoma": int(np.sum(labels == common.NON_MELANOMA)),
        "threshold": float(threshold),
        **decision_metrics,
        **ranking_metrics(labels, probabilities),
        "brier_score": float(np.mean((probabilities - labels) ** 2)),
        "expected_calibration_error": expected_calibration_error(labels, probabilities),
        "confidence_intervals_95": bootstrap_intervals(labels, probabilities, threshold, resamples, seed),
        "wilson_intervals_95": rate_intervals(counts),
        "bootstrap_resamples": resamples,
        "bootstrap_seed": seed,
        "confusion_matrix": counts,
    }


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
    fpr, tpr, _ = roc_points(labels, probabilities)
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
    rates = np.array([common.sensitivity_specificity(labels, probabilities, t) for t in thresholds])
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


def plot_calibration(labels, probabilities, result):
    counts, mean_probability, melanoma_fraction = calibration_bins(labels, probabilities)
    figure = new_figure(6.4, 6.0)
    curve, histogram = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    curve.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    filled = counts > 0
    scores = f"Brier {result['brier_score']:.3f}, ECE {result['expected_calibration_error']:.3f}"
    curve.plot(
        mean_probability[filled], melanoma_fraction[filled], "o-", color="tab:blue", label=f"model ({scores})"
    )
    curve.set(title="Reliability diagram", ylabel="fraction that are melanomas", ylim=(-0.02, 1.02))
    curve.legend(loc="upper left")
    edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
    histogram.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:blue", alpha=0.6)
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


def misclassified_rows(paths, labels, probabilities, threshold):
    """Errors, worst first: missed melanomas (lowest probability first), then false alarms."""
    predicted = common.predict_labels(probabilities, threshold)
    rows = [
        {"file": path.name, "label": int(label), "probability": float(probability), "path": path}
        for path, label, probability, decision in zip(paths, labels, probabilities, predicted, strict=True)
        if label != decision
    ]
    missed = sorted((r for r in rows if r["label"] == common.MELANOMA), key=lambda r: r["probability"])
    alarms = sorted((r for r in rows if r["label"] != common.MELANOMA), key=lambda r: -r["probability"])
    for row in missed:
        row["error"] = "false negative (missed melanoma)"
    for row in alarms:
        row["error"] = "false positive (benign flagged)"
    return missed, alarms


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
    thumbnail = common.load_image(error["path"], min_size=THUMBNAIL_SIZE)
    thumbnail.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    axes.imshow(thumbnail)
    title = f"{kind}\n{shorten(error['file'])}\np(melanoma) = {error['probability']:.4f}"
    axes.set_title(title, color=colour, fontsize=9)


def shorten(name, limit=30):
    return name if len(name) <= limit else f"{name[: limit // 2 - 1]}...{name[-(limit // 2 - 2) :]}"


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


def metric_lines(result):
    lines = []
    for label, key in METRIC_LINES:
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
                f"    {name}: {percent(ratio(count, total))} ({count:,}; {kinds['augmented']:,} augmented)"
            )
    return lines


def known(value):
    return "not recorded" if value is None else value


def summary_report(result, context):
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
        *distribution_lines(context["class_distribution"], context["class_distribution_source"]),
    ]
    return "\n".join(lines) + "\n"


# --- writing the results ---------------------------------------------------------------------


@contextlib.contextmanager
def staged_results(out):
    """A temporary folder inside `out` whose files replace this script's old outputs in `out`
    only once everything is written, metrics.json last: a results folder that looks complete
    always comes from one complete run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out, prefix=".analysis-"))
    except OSError as error:
        raise common.UserError(f"{out}: cannot write the results there ({error.strerror})") from None
    try:
        yield staging
        publish(staging, out)
    finally:
        shutil.rmtree(staging)


def publish(staging, out):
    for name in OUTPUT_FILES:  # metrics.json is last in OUTPUT_FILES and first to go here
        (out / name).unlink(missing_ok=True)
    for path in sorted(staging.iterdir(), key=lambda path: path.name == METRICS_FILE):
        os.replace(path, out / path.name)


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


def draw_figures(labels, probabilities, result, context, errors, per_kind):
    """{file name: Figure}; learning_curves.png only when there is a training history."""
    threshold = result["threshold"]
    figures = {
        "class_distribution.png": plot_class_distribution(context["class_distribution"]),
        "confusion_matrix.png": plot_confusion_matrix(result["confusion_matrix"], threshold),
        "roc_curve.png": plot_roc_curve(labels, probabilities, result),
        "precision_recall_curve.png": plot_precision_recall_curve(labels, probabilities, result),
        "threshold_curve.png": plot_threshold_curve(labels, probabilities, threshold),
        "calibration.png": plot_calibration(labels, probabilities, result),
        "misclassified.png": plot_misclassified(*errors, threshold, per_kind),
    }
    if context["history"] is not None:
        figures["learning_curves.png"] = plot_learning_curves(context["history"])
    return figures


def prediction_rows(paths, labels, probabilities, threshold):
    decisions = common.predict_labels(probabilities, threshold)
    return [
        (path.name, int(label), float(probability), int(decision))
        for path, label, probability, decision in zip(paths, labels, probabilities, decisions, strict=True)
    ]


def write_results(out, paths, labels, probabilities, result, context, per_kind):
    """Every output file, staged first (see `staged_results`); returns the report's text."""
    errors = misclassified_rows(paths, labels, probabilities, result["threshold"])
    report = summary_report(result, context)
    metrics = {**result, "model": context["model"], "run": run_facts(context)}
    with staged_results(out) as folder:
        for name, figure in draw_figures(labels, probabilities, result, context, errors, per_kind).items():
            figure.savefig(folder / name, dpi=DPI)
        write_csv(
            folder / "predictions.csv",
            ("file", "label", "probability", "predicted"),
            prediction_rows(paths, labels, probabilities, result["threshold"]),
        )
        write_csv(
            folder / "misclassified.csv",
            ("file", "label", "probability", "error"),
            [(row["file"], row["label"], row["probability"], row["error"]) for row in errors[0] + errors[1]],
        )
        (folder / "summary_report.txt").write_text(report, encoding="utf-8")
        (folder / METRICS_FILE).write_text(
            json.dumps(metrics, indent=2, allow_nan=False) + "\n", encoding="utf-8"
        )
    return report


def run_facts(context):
    keys = ("data", "device", "precision", "tta", "images_per_second", "class_distribution")
    return {key: context[key] for key in keys}


# --- the command -----------------------------------------------------------------------------


def model_facts(path, meta):
    return {
        "path": str(path),
        "weights": meta.get("weights"),
        "threshold": float(meta["threshold"]),
        "threshold_rule": meta.get("threshold_rule"),
        "epoch": meta.get("epoch"),
        "image_size": meta.get("image_size"),
        "trained_at": meta.get("trained_at"),
    }


@common.exits_on_user_error
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise common.UserError(f"{out}: exists and is not a folder (pass another --out)")
    # Every input is checked before the slow scoring starts.
    device = common.choose_device(args.device)
    model, meta = common.load_scoring_model(args.model, device)
    dataset = common.SkinLesionDataset(args.data, common.checkpoint_transform(meta))
    history = read_history(args.history)
    distribution, distribution_source = class_distribution(args.data)

    probabilities, speed = score_folder(model, dataset, device, args.batch_size, args.workers, args.tta)
    precision = common.amp_name(common.inference_amp_dtype(device))
    setting = f"{device}, {precision}, TTA {on_off(args.tta)}"
    print(f"Scored {len(dataset):,} images, {speed:.1f} images/s ({setting})")
    labels = np.asarray(dataset.labels)
    result = evaluate(labels, probabilities, meta["threshold"], args.bootstrap, args.seed)
    context = {
        "model": model_facts(args.model, meta),
        "data": str(args.data),
        "history_path": str(args.history),
        "history": history,
        "class_distribution": distribution,
        "class_distribution_source": distribution_source,
        "device": str(device),
        "precision": precision,
        "tta": args.tta,
        "images_per_second": speed,
    }
    print(write_results(out, dataset.paths, labels, probabilities, result, context, args.gallery))
    print(f"Results written to {out}/")


def on_off(flag):
    return "on" if flag else "off"


if __name__ == "__main__":
    main()
