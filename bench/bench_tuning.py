"""Recipe tuning on the validation split, at equal wall time: how bench_quality.py's "ours" was chosen.

Prepares ../shared/data/ham10000_300 (the same seeded, lesion-grouped split as bench_quality.py,
train/ imbalanced), measures what an epoch costs on this machine (bench/budget.py), then trains
model.py once per candidate with as many epochs as fit the same training budget (and
--time-budget as the guard), and scores each candidate's best checkpoint on validation with
analysis.py. Test images are never scored here: the test/ folder is emptied before training.

    python bench/bench_tuning.py                          # every candidate, 13 minutes each
    python bench/bench_tuning.py --budget 3 --limit 1500  # a quick run of the same code
    python bench/bench_tuning.py --candidates diagnosis --reuse
    python bench/bench_tuning.py --work bench_runs/tuning40 --budget 37.2 --baseline progressive \
        --candidates progressive small_progressive balanced_progressive    # the third round
    python bench/bench_tuning.py --work bench_runs/tuning_lite0 --budget 20 --baseline lite0 \
        --candidates lite0 lite0_short_warmup lite0_176                    # the fourth round

The rule of the second round (options over --baseline baseline), fixed before the runs: an option
joins the recipe when the candidate that switches it on alone beats the baseline's validation ROC
AUC by more than TIE_MARGIN; a tie keeps the simpler recipe (the option off). With --candidates
all as well, "all" replaces that union when it beats both the union's best single candidate and
the baseline by the same margin. The rule of the third round (alternatives to bench_quality.py's
ours, --baseline progressive, at its 40-minute budget), fixed before the runs: the best candidate
that beats the baseline by more than TIE_MARGIN replaces it; otherwise the baseline stays. The
printed noise band is each candidate's 95% bootstrap interval, and the paired bootstrap interval
of its AUC minus the baseline's on the same validation images. The fourth round (fine-tuning
EfficientNet-Lite0 from the ImageNet weights its pip package ships, on the balanced train/, against
model.py's fine-tuning defaults of the time, --baseline lite0) follows the third round's rule;
its two finalists then ran again with --seed 2, and the first seed's winner stays unless the
other's mean validation AUC over both seeds beats its own by more than TIE_MARGIN. The sixth
round (issue 20's untried candidates: the learning rate, class-weighted originals, the backbone at
a lower rate) runs against the chosen --baseline lite0_short_warmup with the same two rules.
"""

import argparse
import csv
import json
import shutil
from pathlib import Path

from bench_quality import DATA, ROOT, add_amp_argument, finish_report, limited_csv, run_stage, start_run
from budget import epochs_within, measure_costs, recipe_settings, training_seconds

import metrics

# On top of every candidate: random initialisation and the peak learning rate chosen by the
# previous round of tuning for it (1e-3 with half an epoch of warm-up; docs/measurements.md).
COMMON = ["--weights", "none", "--lr", "1e-3", "--warmup-epochs", "0.5"]
OFF = {"targets": ["--targets", "melanoma"], "ema": ["--ema-decay", "0"], "progressive": [], "small": []}
ON = {
    "targets": ["--targets", "diagnosis"],
    # A horizon of about 200 optimiser steps: about one epoch of the 5,600 training images at batch 32.
    "ema": ["--ema-decay", "0.995"],
    # EfficientNetV2's progressive learning at the CPU budget: 96 px growing to 160 px.
    "progressive": ["--progressive-from", "96", "--image-size", "160"],
    # Third round: more, smaller epochs in the same time: 64 px growing to 128 px.
    "small": ["--progressive-from", "64", "--image-size", "128"],
}
# Not a model.py flag: the candidate trains on a train/ balanced 1:1 with augmented melanoma
# copies (prepdata.py without --no-balance), as the original recipe does; model.py's class weights
# are then 1:1, so the loss is plain cross-entropy.
BALANCED = "balanced"
OPTION_ORDER = ("targets", "ema", "progressive", "small")
CANDIDATES = {
    "baseline": set(),  # bench_quality's previous "ours": two classes, fixed 128 px, no average
    "diagnosis": {"targets"},
    "ema": {"ema"},
    "progressive": {"progressive"},
    "all": {"targets", "ema", "progressive"},
    # Third round, against "progressive" (bench_quality.py's ours) at its 40-minute budget:
    "small_progressive": {"small"},
    "balanced_progressive": {"progressive", BALANCED},
}
# Fourth round: each candidate's whole model.py flags. The baseline's one-epoch warm-up is model.py's
# default of the time: at a budget of one or two epochs the learning rate barely decays.
LITE0 = ["--arch", "efficientnet_lite0", "--weights", "imagenet", "--lr", "3e-4"]
CHOSEN_LITE0 = [*LITE0, "--image-size", "224", "--warmup-epochs", "0.2"]  # lite0_short_warmup, chosen
FINE_TUNING = {
    "lite0": [*LITE0, "--image-size", "224", "--warmup-epochs", "1"],
    "lite0_short_warmup": CHOSEN_LITE0,
    # Two epochs instead of one in 20 minutes.
    "lite0_176": [*LITE0, "--image-size", "176", "--warmup-epochs", "0.2"],
    # Fifth, against the chosen lite0_short_warmup: every diagnosis as a target, melanoma read off
    # the softmax (a tie from random initialisation in the second round).
    "lite0_diagnosis": [*CHOSEN_LITE0, "--targets", "diagnosis"],
    # Sixth round, issue 20's untried candidates against lite0_short_warmup: a third of its learning
    # rate (the later --lr wins in argparse; a loop outside the project peaked at epoch 1 at 3e-4);
    "lite0_low_lr": [*CHOSEN_LITE0, "--lr", "1e-4"],
    # the original images with the loss weighted by inverse class frequency instead of augmented
    # melanoma copies: about half the images per epoch, so more epochs in the same time;
    "lite0_originals": [*CHOSEN_LITE0, "--class-weights", "balanced"],
    # the pretrained backbone at a tenth of the head's rate.
    "lite0_backbone_tenth": [*CHOSEN_LITE0, "--backbone-lr-scale", "0.1"],
}
CLASS_WEIGHTED = "class-weighted originals"
CANDIDATES |= {name: {BALANCED} for name in FINE_TUNING}
CANDIDATES["lite0_originals"] = {CLASS_WEIGHTED}
DEFAULT_CANDIDATES = ["baseline", "diagnosis", "ema", "progressive"]
TIE_MARGIN = 0.005
# Every candidate trains its planned epochs; --time-budget only stops a run that other work on
# the machine slows down past twice its plan (its measured time is in the table either way).
GUARD = 2.0
BASELINE = "baseline"


def candidate_flags(name, image_size):
    if name in FINE_TUNING:
        return FINE_TUNING[name]
    options = CANDIDATES[name]
    flags = ["--image-size", str(image_size)]
    for option in OPTION_ORDER:
        flags += ON[option] if option in options else OFF[option]
    return [*COMMON, *flags]  # a later --image-size (progressive) wins in argparse


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=DATA, help="folder with GroundTruth.csv, metadata, images/"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "bench_runs" / "tuning", help="working folder")
    parser.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=DEFAULT_CANDIDATES)
    parser.add_argument("--budget", type=float, default=13.0, help="training minutes per candidate")
    parser.add_argument(
        "--baseline",
        choices=list(CANDIDATES),
        default=BASELINE,
        help="the candidate the others are compared with",
    )
    parser.add_argument("--image-size", type=int, default=128, help="size of the fixed-size candidates")
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch size")
    parser.add_argument("--workers", type=int, default=2, help="loader workers")
    add_amp_argument(parser, "candidate")
    parser.add_argument(
        "--seed",
        type=int,
        default=42,
        help="model.py's --seed for every candidate (run-to-run noise); the split is always the same",
    )
    parser.add_argument("--limit", type=int, default=0, help="use only the first N CSV rows (0: all)")
    parser.add_argument(
        "--reuse", action="store_true", help="keep a candidate's finished run instead of training it again"
    )
    return parser


def prepare(args):
    """{balanced: prepared tree} for the candidates' train/ kinds, each with test/ emptied: no test
    figure is ever seen here. The split is the same (seeded); only train/'s copies differ."""
    kinds = {BALANCED in CANDIDATES[name] for name in args.candidates}
    return {balanced: prepare_tree(args, balanced) for balanced in sorted(kinds)}


def prepare_tree(args, balanced):
    prepared = args.work / ("prepared_balanced" if balanced else "prepared")
    if not (args.reuse and (prepared / "manifest.csv").is_file()):
        run_stage(
            {}, "prepdata", "prepdata.py",
            "--csv", limited_csv(args.data, args.work, args.limit), "--images", args.data / "images",
            "--metadata", args.data / "HAM10000_metadata.csv", "--out", prepared, "--overwrite",
            *([] if balanced else ["--no-balance"]),
        )  # fmt: skip
    shutil.rmtree(prepared / "test")
    (prepared / "test").mkdir()
    return prepared


def tree_of(name, trees):
    return trees[BALANCED in CANDIDATES[name]]


def image_count(folder):
    return sum(1 for _ in folder.iterdir())


def plan(args, trees):
    """{candidate: (flags, epochs, planned seconds)} for the same budget, from measured costs."""
    flags = {
        name: [*candidate_flags(name, args.image_size), "--amp", args.amp, "--seed", args.seed]
        for name in args.candidates
    }
    # Seconds per image do not depend on which train/ they are read from.
    costs = measure_costs(
        next(iter(trees.values())) / "train", list(flags.values()), args.batch_size, args.workers
    )
    plans = {}
    for name, candidate in flags.items():
        prepared = tree_of(name, trees)
        counts = image_count(prepared / "train"), image_count(prepared / "val")
        epochs = epochs_within(candidate, 60 * args.budget, costs, *counts)
        planned = training_seconds(recipe_settings(candidate), epochs, costs, *counts)
        plans[name] = (candidate, epochs, planned)
        print(f"{name}: {epochs} epochs, planned {planned / 60:.1f} min")
    return plans


def train_candidate(name, plan_of, args, trees):
    flags, epochs, planned = plan_of
    prepared = tree_of(name, trees)
    out = args.work / name
    if not (args.reuse and (out / "val_analysis" / "predictions.csv").is_file()):
        run_stage(
            {}, "model", "model.py", "--data", prepared, "--out", out, *flags, "--epochs", epochs,
            "--batch-size", args.batch_size, "--accumulation-steps", 1, "--workers", args.workers,
            "--patience", epochs, "--time-budget", round(GUARD * args.budget, 2),
        )  # fmt: skip
        run_stage(
            {}, "analysis", "analysis.py", "--model", out / "best_model.pth", "--data", prepared / "val",
            "--out", out / "val_analysis",
        )  # fmt: skip
    history = json.loads((out / "training_history.json").read_text())
    return {
        "candidate": name,
        "flags": flags,
        "planned_epochs": epochs,
        "planned_s": planned,
        "history": history,
        "predictions": read_predictions(out / "val_analysis" / "predictions.csv"),
    }


def read_predictions(path):
    """{file: (label, uncalibrated probability)}: the ranking, as training validated it."""
    with open(path, newline="") as file:
        return {
            row["file"]: (int(row["label"]), float(row["probability_uncalibrated"]))
            for row in csv.DictReader(file)
        }


def paired_auc_difference(candidate, baseline):
    """The 95% paired bootstrap interval of AUC(candidate) - AUC(baseline) on the same images."""
    files = sorted(baseline)
    return metrics.auc_difference_interval(
        [baseline[file][0] for file in files],
        [candidate[file][1] for file in files],
        [baseline[file][1] for file in files],
    )


def auc_with_interval(predictions):
    labels = [label for label, _ in predictions.values()]
    scores = [score for _, score in predictions.values()]
    # The threshold only matters to the sensitivity and specificity intervals, not used here.
    interval = metrics.bootstrap_intervals(labels, scores, 0.5, resamples=1000, seed=0)["roc_auc"]
    return metrics.roc_auc(labels, scores), interval


def chosen_options(outcomes):
    """The options of the recipe by the second round's rule (module docstring; needs "baseline")."""
    by_name = {outcome["candidate"]: outcome["auc"] for outcome in outcomes}
    baseline = by_name[BASELINE]
    singles = [name for name in by_name if len(CANDIDATES[name]) == 1]
    winners = [name for name in singles if by_name[name] > baseline + TIE_MARGIN]
    options = set().union(*(CANDIDATES[name] for name in winners))
    best_single = max([baseline, *(by_name[name] for name in winners)])
    if "all" in by_name and by_name["all"] > best_single + TIE_MARGIN:
        options = CANDIDATES["all"]
    return sorted(options)


def chosen_candidate(outcomes, baseline):
    """The third round's rule (module docstring): the best candidate that beats `baseline` by more
    than TIE_MARGIN replaces it; otherwise the baseline stays."""
    by_name = {outcome["candidate"]: outcome["auc"] for outcome in outcomes}
    best = max(by_name, key=by_name.get)
    return best if by_name[best] > by_name[baseline] + TIE_MARGIN else baseline


def choice_line(outcomes, baseline):
    if baseline == BASELINE:
        return f"options chosen by the rule: {', '.join(chosen_options(outcomes)) or 'none'}"
    return f"recipe chosen by the rule: {chosen_candidate(outcomes, baseline)}"


def weights_of(outcomes):
    fine_tuned = any(outcome["candidate"] in FINE_TUNING for outcome in outcomes)
    return "ImageNet weights (efficientnet_lite0, from pip)" if fine_tuned else "random init"


def report_lines(outcomes, args):
    lines = [
        f"validation split of ham10000_300, {weights_of(outcomes)}, {args.budget:g} training minutes "
        f"per candidate (epochs planned from costs measured in this run), batch {args.batch_size}, "
        f"--amp {args.amp}, seed {args.seed}; an option is chosen when it beats the baseline by more "
        f"than {TIE_MARGIN}",
        "",
        "| candidate | options | epochs (planned) | sizes | val AUC per epoch (EMA) | best val AUC [95% CI] "
        "| minus baseline [paired 95% CI] | train s (planned) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for outcome in outcomes:
        epochs = outcome["history"]["epochs"]
        per_epoch = " ".join(
            f"{epoch['val_auc']:.3f}" + (f" ({epoch['ema_val_auc']:.3f})" if "ema_val_auc" in epoch else "")
            for epoch in epochs
        )
        sizes = "-".join(str(epoch["image_size"]) for epoch in epochs)
        low, high = outcome["interval"]
        difference = outcome.get("difference")
        versus = (
            "-"
            if difference is None
            else f"{difference[0]:+.3f} [{difference[1][0]:+.3f}, {difference[1][1]:+.3f}]"
        )
        lines.append(
            f"| {outcome['candidate']} | {', '.join(sorted(CANDIDATES[outcome['candidate']])) or 'none'} "
            f"| {len(epochs)}/{outcome['planned_epochs']} | {sizes} | {per_epoch} "
            f"| {outcome['auc']:.3f} [{low:.3f}, {high:.3f}] | {versus} "
            f"| {sum(epoch['seconds'] for epoch in epochs):.0f} ({outcome['planned_s']:.0f}) |"
        )
    cut = [outcome["candidate"] for outcome in outcomes if outcome["history"].get("stopped_by_time_budget")]
    if cut:
        # A run its guard ended trained fewer epochs than planned: not at equal wall time.
        lines.append(f"\nended by the guard before their planned epochs, so not comparable: {', '.join(cut)}")
    if any(outcome["candidate"] == args.baseline for outcome in outcomes) and args.baseline not in cut:
        lines.append("\n" + choice_line(outcomes, args.baseline))
    return lines


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    start = start_run(args)
    trees = prepare(args)
    plans = plan(args, trees)
    outcomes = [train_candidate(name, plans[name], args, trees) for name in args.candidates]
    baseline = next((outcome for outcome in outcomes if outcome["candidate"] == args.baseline), None)
    for outcome in outcomes:
        outcome["auc"], outcome["interval"] = auc_with_interval(outcome["predictions"])
        if baseline is not None and outcome is not baseline:
            difference = outcome["auc"] - auc_with_interval(baseline["predictions"])[0]
            outcome["difference"] = (
                difference,
                paired_auc_difference(outcome["predictions"], baseline["predictions"]),
            )
    finish_report(report_lines(outcomes, args), start, args.work / "tuning_report.md")
    for outcome in outcomes:
        del outcome["predictions"]
    (args.work / "tuning.json").write_text(json.dumps(outcomes, indent=2, default=list))


if __name__ == "__main__":
    main()
