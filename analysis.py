"""Score a prepared split with a checkpoint: plots, a plain-language report and metrics.json.

    python analysis.py --model best_model.pth --data prepared_dataset/test --out results

The image size, normalisation and decision threshold come from the checkpoint, and images are
scored in the same precision as the app, so these numbers describe the decisions the app makes.
The figures and the report's text are built by report.py; this script scores and writes them.
"""

import contextlib
import csv
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

import cli
import engine
import errors
import lesion_labels
import metrics
import prepared
import report
import scoring
import subgroups

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
    "subgroups.png",
    "subgroups.csv",
    "predictions.csv",
    "summary_report.txt",
    METRICS_FILE,
)


def get_args_parser():
    parser = cli.ArgumentParser(
        description="Score a folder of mel_*/nomel_* images with a checkpoint; write plots, "
        "summary_report.txt and metrics.json."
    )
    add = parser.add_argument
    add("--model", default="best_model.pth", help="checkpoint written by model.py")
    add("--data", default="prepared_dataset/test", help="folder of mel_*/nomel_* images to score")
    add(
        "--history",
        default="training_history.json",
        help="training history written by model.py (learning_curves.png is skipped when missing)",
    )
    add("--out", default="results", help="folder for the plots and reports")
    add("--batch-size", type=cli.positive_int, default=32, help="images per batch")
    add(
        "--workers",
        type=cli.non_negative_int,
        default=min(4, cli.available_cores()),
        help="image-decoding worker processes (0 decodes in the main process)",
    )
    add("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    add(
        "--tta",
        action="store_true",
        help="test-time augmentation: average the 8 flips/rotations of each image (8x slower)",
    )
    add(
        "--bootstrap",
        type=cli.positive_int,
        default=1000,
        help="bootstrap resamples for the 95%% confidence intervals",
    )
    add("--seed", type=cli.non_negative_int, default=0, help="seed of the bootstrap resampling")
    add(
        "--gallery",
        type=cli.positive_int,
        default=8,
        help="worst false negatives and false positives shown",
    )
    return parser


# --- reading the inputs ----------------------------------------------------------------------


# What the learning curves plot, checked before the slow scoring starts.
HISTORY_KEYS = (
    "epoch",
    *(f"{split}_{key}" for split in ("train", "val") for key, _ in report.HISTORY_CURVES),
)


def read_history(path):
    """The training history dict, or None when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise errors.UserError(f"{path}: not a readable training history ({error})") from None
    if not isinstance(history, dict) or not isinstance(history.get("epochs"), list) or not history["epochs"]:
        raise errors.UserError(f"{path}: not a training history (no 'epochs' list with at least one epoch)")
    for epoch in history["epochs"]:
        if not isinstance(epoch, dict) or not all(is_number_or_null(epoch.get(key)) for key in HISTORY_KEYS):
            raise errors.UserError(
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
    manifest = data_folder.parent / prepared.MANIFEST_FILE
    if manifest.is_file():
        rows = [(row.split, row.label, row.augmented) for row in prepared.read_manifest(manifest)]
        return distribution_table(rows), str(manifest)
    if data_folder.name in prepared.SPLITS:
        folders = [
            data_folder.parent / split for split in prepared.SPLITS if (data_folder.parent / split).is_dir()
        ]
    else:
        folders = [data_folder]
    rows = [
        (folder.name, label, prepared.is_augmented_filename(path.name))
        for folder in folders
        for path, label in prepared.list_prepared_images(folder)
    ]
    return distribution_table(rows), "file names in " + ", ".join(str(folder) for folder in folders)


def distribution_table(rows):
    counts = Counter(rows)
    order = {split: index for index, split in enumerate(prepared.SPLITS)}  # train, val, test, then others
    splits = sorted({split for split, _, _ in rows}, key=lambda split: (order.get(split, len(order)), split))
    return {
        split: {
            lesion_labels.CLASS_NAMES[label]: {
                "original": counts[(split, label, False)],
                "augmented": counts[(split, label, True)],
            }
            for label in (lesion_labels.MELANOMA, lesion_labels.NON_MELANOMA)
        }
        for split in splits
    }


def subgroup_members(data_folder, samples):
    """(subgroups.group_members of the scored images, the manifest they come from), or (None,
    why there are none): from the prepared tree's manifest.csv, which lists each image's
    diagnosis, sex, age and body site by split and file name. Read before scoring: a bad age in
    it is a user error."""
    data_folder = Path(data_folder)
    manifest = data_folder.parent / prepared.MANIFEST_FILE
    if not manifest.is_file():
        return None, f"no {prepared.MANIFEST_FILE} beside {data_folder}"
    listed = [row._asdict() for row in prepared.read_manifest(manifest)]
    rows = subgroups.rows_for_files(listed, data_folder.name, [path.name for path, _ in samples])
    try:
        members = subgroups.group_members(rows)
    except ValueError as error:
        raise errors.UserError(f"{manifest}: {error}") from None
    if not members:
        return None, f"{manifest} records no diagnosis, sex, age or body site of these images"
    return members, str(manifest)


def subgroup_summary(found, labels, probabilities, flagged, result, args):
    """metrics.json's `subgroups`: each group's metrics at the threshold (images the model cannot
    judge counted when `flagged` is not None), and the groups whose interval lies wholly below the
    whole folder's value; `found` is what subgroup_members returned."""
    members, source = found
    if members is None:
        return {"source": None, "note": f"no subgroup facts were found ({source})", "groups": {}, "below": []}
    table = metrics.subgroup_table(
        labels, probabilities, result["threshold"], members, flagged, args.bootstrap, args.seed
    )
    overall = {rate: result[rate] for rate in metrics.SUBGROUP_RATES}
    return {
        "source": source,
        "min_per_class_for_auc": metrics.MIN_PER_CLASS_FOR_AUC,
        "groups": table,
        "below": metrics.groups_below_overall(table, overall),
    }


# --- scoring ---------------------------------------------------------------------------------


def score_folder(network, samples, batch_size, workers, tta):
    """(engine.ScoredImages of the (path, label) `samples`, images scored per second), scored
    by the engine's one loop, as the app scores an upload."""
    start = time.perf_counter()
    paths, labels = zip(*samples, strict=True)
    scored = engine.score_files(network, paths, labels, batch_size, workers, tta)
    return scored, len(paths) / (time.perf_counter() - start)


def prepared_images(folder):
    """The (path, label) pairs of the folder's mel_*/nomel_* images; none is a user error."""
    samples = prepared.list_prepared_images(folder)
    if not samples:
        raise errors.UserError(f"{folder}: no mel_*/nomel_* images in this folder")
    return samples


def trust_summary(labels, uncalibrated, answers, rules, paths, resamples, seed):
    """What the checkpoint's scoring rules say about the folder: calibration before and after,
    which images it flags as not judgeable, the metrics on the others, the quality warnings."""
    probabilities = np.array([answer["probability"] for answer in answers])
    flagged = flagged_mask(answers)
    unflagged = None
    if flagged.any() and not flagged.all():
        kept = ~flagged
        unflagged = metrics.evaluate(labels[kept], probabilities[kept], rules.threshold, resamples, seed)
    return {
        "calibration": {
            "calibrated": rules.calibration is not None,
            "rule": (rules.calibration or {}).get("rule"),
            "before": metrics.calibration_metrics(labels, uncalibrated),
            "after": metrics.calibration_metrics(labels, probabilities),
        },
        "flagging": {
            "available": rules.can_flag,
            "rule": (rules.ood or {}).get("rule"),
            "n_flagged": int(flagged.sum()),
            "flagged_files": [
                path.name for path, is_flagged in zip(paths, flagged, strict=True) if is_flagged
            ],
        },
        "unflagged": unflagged,
        "warnings": dict(
            Counter(warning for answer in answers for warning in answer["warnings"]).most_common()
        ),
    }


def flagged_mask(answers):
    """Whether the model cannot judge each image (all False when the checkpoint cannot flag)."""
    return np.array([answer["reliable"] is False for answer in answers], dtype=bool)


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
        raise errors.UserError(f"{out}: cannot write the results there ({error.strerror})") from None
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


def misclassified_rows(paths, labels, probabilities, threshold):
    """Errors, worst first: missed melanomas (lowest probability first), then false alarms."""
    predicted = metrics.predict_labels(probabilities, threshold)
    rows = [
        {"file": path.name, "label": int(label), "probability": float(probability), "path": path}
        for path, label, probability, decision in zip(paths, labels, probabilities, predicted, strict=True)
        if label != decision
    ]
    missed = sorted((r for r in rows if r["label"] == lesion_labels.MELANOMA), key=lambda r: r["probability"])
    alarms = sorted(
        (r for r in rows if r["label"] != lesion_labels.MELANOMA), key=lambda r: -r["probability"]
    )
    for row in missed:
        row["error"] = "false negative (missed melanoma)"
    for row in alarms:
        row["error"] = "false positive (benign flagged)"
    return missed, alarms


PREDICTION_COLUMNS = (
    "file",
    "label",
    "probability",
    "predicted",
    "probability_uncalibrated",
    "ood_score",
    "flagged",
    "warnings",
)


def prediction_rows(paths, labels, uncalibrated, answers, threshold):
    """One row per image: the shown (calibrated) probability and the decision at the threshold,
    the probability before calibration, the out-of-distribution score and flag, the warnings."""
    probabilities = [answer["probability"] for answer in answers]
    decisions = metrics.predict_labels(probabilities, threshold)
    rows = zip(paths, labels, uncalibrated, answers, decisions, strict=True)
    return [
        (
            path.name,
            int(label),
            answer["probability"],
            int(decision),
            float(raw),
            "" if answer["ood_score"] is None else answer["ood_score"],
            {True: "no", False: "yes", None: ""}[answer["reliable"]],
            "; ".join(answer["warnings"]),
        )
        for path, label, raw, answer, decision in rows
    ]


def write_results(out, paths, labels, uncalibrated, answers, result, context, per_kind):
    """Every output file, staged first (see `staged_results`); returns the report's text."""
    probabilities = np.array([answer["probability"] for answer in answers])
    mistakes = misclassified_rows(paths, labels, probabilities, result["threshold"])
    summary = report.summary_report(result, context)
    everything = {**result, "model": context["model"], "run": run_facts(context)}
    figures = report.draw_figures(labels, probabilities, uncalibrated, result, context, mistakes, per_kind)
    with staged_results(out) as folder:
        for name, figure in figures.items():
            figure.savefig(folder / name, dpi=DPI)
        write_csv(
            folder / "predictions.csv",
            PREDICTION_COLUMNS,
            prediction_rows(paths, labels, uncalibrated, answers, result["threshold"]),
        )
        if result["subgroups"]["groups"]:
            write_csv(folder / "subgroups.csv", *subgroups.csv_table(result["subgroups"]["groups"]))
        write_csv(
            folder / "misclassified.csv",
            ("file", "label", "probability", "error"),
            [
                (row["file"], row["label"], row["probability"], row["error"])
                for row in mistakes[0] + mistakes[1]
            ],
        )
        (folder / "summary_report.txt").write_text(summary, encoding="utf-8")
        (folder / METRICS_FILE).write_text(
            json.dumps(everything, indent=2, allow_nan=False) + "\n", encoding="utf-8"
        )
    return summary


def run_facts(context):
    keys = ("data", "device", "engine", "precision", "tta", "images_per_second", "class_distribution")
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


@cli.exits_on_user_error
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise errors.UserError(f"{out}: exists and is not a folder (pass another --out)")
    # Every input is checked before the slow scoring starts; the network last, since a
    # checkpoint without its exported network is exported first (engine.load_network).
    samples = prepared_images(args.data)
    history = read_history(args.history)
    distribution, distribution_source = class_distribution(args.data)
    subgroups_found = subgroup_members(args.data, samples)
    network = engine.load_network(args.model, args.device)
    meta = network.meta

    scored, speed = score_folder(network, samples, args.batch_size, args.workers, args.tta)
    precision = "fp32"
    device = f"{network.device}"
    setting = f"{network.engine}, {device}, {precision}, TTA {on_off(args.tta)}"
    print(f"Scored {len(samples):,} images, {speed:.1f} images/s ({setting})")
    rules = scoring.ScoringRules(meta)
    answers = rules.answers(scored.logits, scored.stage_means, scored.facts)
    uncalibrated = scoring.melanoma_probability(scored.logits, melanoma_index=rules.melanoma_index)
    labels = scored.labels
    probabilities = np.array([answer["probability"] for answer in answers])
    result = metrics.evaluate(labels, probabilities, rules.threshold, args.bootstrap, args.seed)
    paths = [path for path, _ in samples]
    result |= trust_summary(labels, uncalibrated, answers, rules, paths, args.bootstrap, args.seed)
    flagged = flagged_mask(answers) if rules.can_flag else None
    result["subgroups"] = subgroup_summary(subgroups_found, labels, probabilities, flagged, result, args)
    context = {
        "model": model_facts(args.model, meta),
        "data": str(args.data),
        "history_path": str(args.history),
        "history": history,
        "class_distribution": distribution,
        "class_distribution_source": distribution_source,
        "device": device,
        "engine": network.engine,
        "precision": precision,
        "tta": args.tta,
        "images_per_second": speed,
    }
    print(write_results(out, paths, labels, uncalibrated, answers, result, context, args.gallery))
    print(f"Results written to {out}/")


def on_off(flag):
    return "on" if flag else "off"


if __name__ == "__main__":
    main()
