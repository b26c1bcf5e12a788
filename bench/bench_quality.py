"""Full-scale quality benchmark: the four stages, unchanged, on ../shared/data/ham10000_300.

Runs our recipe and the original project's recipe (model.py --preset original, trained on a
train split balanced with augmented copies) on the same lesion-grouped split, scores the same
test images with analysis.py, asks the running app for a few of them, and prints one table:
held-out test ROC AUC with its 95% bootstrap interval, sensitivity and specificity at the stored
threshold, and the wall time of every stage.

    python bench/bench_quality.py                 # ours for 40 training minutes, the original for 4 epochs
    python bench/bench_quality.py --recipes ours  # ours alone
    python bench/bench_quality.py --budget 2 --epochs 1 --limit 400   # a smoke run in a few minutes

Everything a recipe chooses (threshold, best epoch) is chosen on the validation split by
model.py; test images are only scored.
"""

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # app_harness and torch_reference: what the tests see of the app

import budget  # noqa: E402

import app_harness  # noqa: E402
import cli  # noqa: E402
import metrics  # noqa: E402
from devices import cpu_description  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "ham10000_300"

# Each recipe: how prepdata balances train/, what model.py is told on top of the common flags,
# and whether it trains for --budget minutes (its epochs planned from costs measured on this
# machine, bench/budget.py) or for --epochs. Ours: the peak learning rate that bench_tuning.py's
# first round chose for random initialisation (the default 3e-4 is a fine-tuning rate), and the
# options its second round chose on validation at equal wall time (docs/measurements.md).
# Second round: progressive resizing from 96 to 160 px beat the baseline; the diagnosis head tied
# and the weights' moving average trailed (model.py's defaults keep both off). Third round, at
# this 40-minute budget: a train/ balanced 1:1 with augmented melanoma copies beat both the
# class-weighted originals alone and more, smaller epochs (64 to 128 px).
OURS_OPTIONS = ["--progressive-from", "96", "--image-size", "160"]
RECIPES = {
    "ours": {
        "prepdata": [],
        "model": ["--lr", "1e-3", "--warmup-epochs", "0.5", *OURS_OPTIONS],
        "budget": True,
    },
    "original": {"prepdata": [], "model": ["--preset", "original"], "budget": False},
    # Fine-tuning EfficientNet-Lite0 from the ImageNet weights its pip package ships, at its own
    # 224 px, with model.py's fine-tuning defaults (lr 3e-4, cosine after a warm-up of a fifth of
    # an epoch: bench_tuning.py's fourth round chose it on validation over a whole epoch and 176 px),
    # on the original images with the loss weighted by class: the sixth round chose them over a
    # train/ balanced with augmented copies, on two seeds (docs/measurements.md).
    "lite0": {
        "prepdata": ["--no-balance"],
        "model": ["--arch", "efficientnet_lite0", "--weights", "imagenet", "--image-size", "224"],
        "budget": True,
    },
}
# The plan fills this share of the budget and leaves the rest for what it cannot foresee: the
# guard ends the run at the budget itself, which cuts the schedule short. 0.97 was too little:
# the 40-minute run on the 2-core AMD EPYC overran its plan by 4.8% over 5 epochs (13% in the
# first), and the guard dropped the sixth (docs/measurements.md).
PLAN_SHARE = 0.93


# The plots the README shows (the others stay in the working folder).
DOCS_PLOTS = ["roc_curve.png", "confusion_matrix.png", "learning_curves.png", "calibration.png"]


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=DATA, help="folder with GroundTruth.csv, metadata, images/"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "bench_runs" / "quality", help="working folder")
    parser.add_argument(
        "--recipes", nargs="+", choices=sorted(RECIPES), default=["ours", "lite0", "original"]
    )
    parser.add_argument("--image-size", type=int, default=128, help="training and scoring size")
    parser.add_argument("--epochs", type=int, default=4, help="most epochs of a recipe without a budget")
    parser.add_argument(
        "--budget", type=float, default=40.0, help="training minutes of a recipe with a budget (ours)"
    )
    parser.add_argument("--workers", type=int, default=2, help="loader workers")
    add_amp_argument(parser, "recipe")
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch size")
    parser.add_argument("--accumulation-steps", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N CSV rows (0: all)")
    parser.add_argument("--tta", action="store_true", help="also score with test-time augmentation")
    parser.add_argument("--docs", type=Path, help="copy the plots of the first recipe into this folder")
    parser.add_argument("--app-images", type=int, default=20, help="test images to send to the running app")
    return parser


def add_amp_argument(parser, runs):
    parser.add_argument(
        "--amp",
        choices=("auto", "bf16", "off"),
        default="auto",
        help=f"model.py's --amp for every {runs} (bf16 is not faster on every CPU with AVX512-BF16)",
    )


def run_stage(timings, name, script, *args):
    """Run one stage script as a user would; remember its wall time; stop on failure."""
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    print(f"\n$ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT)
    timings[name] = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{script} failed with exit code {result.returncode}")


def limited_csv(data, work, limit):
    """The ground truth, or its first `limit` rows (a quick run of the same code)."""
    if not limit:
        return data / "GroundTruth.csv"
    rows = (data / "GroundTruth.csv").read_text().splitlines()
    target = work / "GroundTruth_subset.csv"
    target.write_text("\n".join(rows[: limit + 1]) + "\n")
    return target


def run_recipe(name, args, labels_csv):
    recipe, work = RECIPES[name], args.work / name
    timings = {}
    prepared, results = work / "prepared_dataset", work / "results"
    run_stage(
        timings, "prepdata", "prepdata.py",
        "--csv", labels_csv, "--images", args.data / "images",
        "--metadata", args.data / "HAM10000_metadata.csv",
        "--out", prepared, "--overwrite", *recipe["prepdata"],
    )  # fmt: skip
    flags = [
        "--weights", "none", "--image-size", args.image_size, "--batch-size", args.batch_size,
        "--accumulation-steps", args.accumulation_steps, "--workers", args.workers, "--amp", args.amp,
        *recipe["model"],
    ]  # fmt: skip
    run_stage(
        timings,
        "model",
        "model.py",
        "--data",
        prepared,
        "--out",
        work,
        *flags,
        *training_length(recipe, flags, prepared, args),
    )
    analysis_args = [
        "--model", work / "best_model.pth", "--data", prepared / "test",
        "--history", work / "training_history.json", "--out", results,
    ]  # fmt: skip
    run_stage(timings, "analysis", "analysis.py", *analysis_args)
    test_metrics = json.loads((results / "metrics.json").read_text())
    tta_metrics = None
    if args.tta:
        run_stage(timings, "analysis_tta", "analysis.py", *analysis_args[:-1], work / "results_tta", "--tta")
        tta_metrics = json.loads((work / "results_tta" / "metrics.json").read_text())
    app_check = check_app(
        work / "best_model.pth", results / "predictions.csv", prepared / "test", args.app_images
    )
    return {
        "recipe": name,
        "metrics": test_metrics,
        "tta_metrics": tta_metrics,
        "timings_s": timings,
        "app": app_check,
        "history": json.loads((work / "training_history.json").read_text()),
    }


def training_length(recipe, flags, prepared, args):
    """--epochs, or for a recipe with a budget the epochs that fit it and --time-budget."""
    if not recipe["budget"]:
        return ["--epochs", args.epochs]
    flags = [str(flag) for flag in flags]
    costs = budget.measure_costs(prepared / "train", [flags], args.batch_size, args.workers)
    counts = [sum(1 for _ in (prepared / split).iterdir()) for split in ("train", "val")]
    epochs = budget.epochs_within(flags, PLAN_SHARE * 60 * args.budget, costs, *counts)
    planned = budget.training_seconds(budget.recipe_settings(flags), epochs, costs, *counts)
    print(f"{epochs} epochs fit {args.budget:g} minutes (planned {planned / 60:.1f} min)", flush=True)
    return ["--epochs", epochs, "--patience", epochs, "--time-budget", args.budget]


def check_app(checkpoint, predictions_csv, test_folder, count):
    """Serve the checkpoint with app.py and compare its answers with analysis.py's predictions."""
    with open(predictions_csv, newline="") as file:
        predictions = list(csv.DictReader(file))[:count]
    differences = []
    with app_harness.running_server(checkpoint) as (url, _):
        for row in predictions:
            status, answer, _ = app_harness.post_file(url, (test_folder / row["file"]).read_bytes())
            if status != 200:
                sys.exit(f"app.py answered {status} for {row['file']}: {answer}")
            differences.append(abs(answer["probability"] - float(row["probability"])))
    return {"images": len(differences), "max_probability_difference": max(differences, default=None)}


def interval(figures, key):
    low_high = figures.get("confidence_intervals_95", {}).get(key)
    return f"[{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else "n/a"


def number(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"


def report_lines(outcomes, args):
    lines = [
        f"HAM10000 (ham10000_300, {args.data}), lesion-grouped 70/20/10 split, "
        f"batch {args.batch_size} x {args.accumulation_steps}, CPU {cpu_description()}, training precision "
        f"{outcomes[0]['history']['amp']} (--amp {args.amp}); recipes with a budget train "
        f"{args.budget:g} minutes, the others at most {args.epochs} epochs",
        "",
        "| recipe | backbone, weights | test ROC AUC [95% CI] | sensitivity | specificity | threshold "
        "| epochs (best) | sizes | training min | prepdata s | model s | analysis s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for outcome in outcomes:
        figures, timings = outcome["metrics"], outcome["timings_s"]
        epochs, settings = outcome["history"]["epochs"], outcome["history"]["settings"]
        sizes = "-".join(str(epoch.get("image_size", "?")) for epoch in epochs)
        lines.append(
            f"| {outcome['recipe']} | {settings.get('arch', 'efficientnet_v2_s')}, {settings['weights']} "
            f"| {number(figures.get('roc_auc'))} {interval(figures, 'roc_auc')} "
            f"| {number(figures.get('sensitivity'))} {interval(figures, 'sensitivity')} "
            f"| {number(figures.get('specificity'))} {interval(figures, 'specificity')} "
            f"| {number(figures.get('threshold'))} | {len(epochs)} ({outcome['history'].get('best_epoch')}) "
            f"| {sizes} | {sum(epoch['seconds'] for epoch in epochs) / 60:.1f} "
            f"| {timings['prepdata']:.0f} | {timings['model']:.0f} | {timings['analysis']:.0f} |"
        )
    lines += paired_lines(outcomes, args)
    for outcome in outcomes:
        app = outcome["app"]
        lines.append(
            f"{outcome['recipe']}: app.py answered {app['images']} test images; largest probability "
            f"difference from analysis.py: {number(app['max_probability_difference'], 4)}"
        )
        if outcome["tta_metrics"]:
            tta_auc = number(outcome["tta_metrics"].get("roc_auc"))
            lines.append(f"{outcome['recipe']}: with --tta, test ROC AUC {tta_auc}")
    return lines


def test_predictions(outcome, args):
    """{file: (label, probability)} of a recipe's test predictions (analysis.py's predictions.csv)."""
    with open(args.work / outcome["recipe"] / "results" / "predictions.csv", newline="") as file:
        return {row["file"]: (int(row["label"]), float(row["probability"])) for row in csv.DictReader(file)}


def paired_lines(outcomes, args):
    """Each recipe against the first on the same test images (a paired bootstrap), and the AUC of
    the two rankings averaged (their ranks, so that neither scale dominates)."""
    lines = []
    first = test_predictions(outcomes[0], args)
    for outcome in outcomes[1:]:
        other = test_predictions(outcome, args)
        files = sorted(first.keys() & other.keys())
        labels = np.array([first[name][0] for name in files])
        ours, theirs = (np.array([scored[name][1] for name in files]) for scored in (first, other))
        low, high = metrics.auc_difference_interval(labels, theirs, ours)
        gain = metrics.roc_auc(labels, theirs) - metrics.roc_auc(labels, ours)
        averaged = scipy.stats.rankdata(ours) + scipy.stats.rankdata(theirs)
        lines.append(
            f"{outcome['recipe']} against {outcomes[0]['recipe']} on the same {len(files)} test images: "
            f"AUC {gain:+.3f}, paired 95% interval [{low:+.3f}, {high:+.3f}]; the two rankings "
            f"averaged: AUC {metrics.roc_auc(labels, averaged):.3f}"
        )
    return lines


def start_run(args):
    """Check the data and create the working folder; returns the start time."""
    if not (args.data / "GroundTruth.csv").is_file():
        sys.exit(f"{args.data}: no GroundTruth.csv here (see ../shared/data/README.md)")
    args.work.mkdir(parents=True, exist_ok=True)
    return time.perf_counter()


def finish_report(lines, start, path):
    """Add the total wall time, print the report and write it to `path`."""
    minutes = (time.perf_counter() - start) / 60
    lines.append(f"total wall time: {minutes:.1f} min on {cli.available_cores()} cores")
    print("\n" + "\n".join(lines))
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    start = start_run(args)
    labels_csv = limited_csv(args.data, args.work, args.limit)
    outcomes = [run_recipe(name, args, labels_csv) for name in args.recipes]
    finish_report(report_lines(outcomes, args), start, args.work / "quality_report.md")
    (args.work / "quality.json").write_text(json.dumps(outcomes, indent=2))
    if args.docs:
        args.docs.mkdir(parents=True, exist_ok=True)
        for name in DOCS_PLOTS:
            shutil.copyfile(args.work / args.recipes[0] / "results" / name, args.docs / name)


if __name__ == "__main__":
    main()
