"""Recipe tuning on the validation split: how bench_quality.py's "ours" settings were chosen.

Prepares ../shared/data/ham10000_300 (the same seeded, lesion-grouped split as bench_quality.py;
train/ imbalanced, and balanced with augmented copies for the candidates that ask), trains
model.py once per candidate setting, and prints each candidate's validation ROC AUC per epoch,
and with --tta the validation AUC of its best
checkpoint under test-time augmentation. Test images are never scored here: the test/ folder of
the prepared trees is emptied before training.

    python bench/bench_tuning.py                        # every candidate: about 12 min each on 2 cores
    python bench/bench_tuning.py --candidates lr1e-3 --reuse

Validation has about 1,600 images of which about 180 are melanoma, so AUC differences below
about 0.02 are within noise; prefer the simpler or cheaper setting when candidates are that close.
"""

import argparse
import json
import shutil
from pathlib import Path

from bench_quality import DATA, ROOT, finish_report, limited_csv, run_stage, start_run

# model.py flags of each candidate, on top of the common ones (random init, --image-size,
# --epochs, batch size). The default lr 3e-4 suits fine-tuning ImageNet weights; from random
# initialisation a larger step may be needed, which is what these candidates measure.
CANDIDATES = {
    "default": [],
    "lr1e-3": ["--lr", "1e-3", "--warmup-epochs", "0.5"],
    "lr2e-3": ["--lr", "2e-3", "--warmup-epochs", "0.5"],
    "lr1e-3_unweighted": ["--lr", "1e-3", "--warmup-epochs", "0.5", "--class-weights", "none"],
    "lr1e-3_balanced": ["--lr", "1e-3", "--warmup-epochs", "0.5"],
    "lr1e-3_160px": ["--lr", "1e-3", "--warmup-epochs", "0.5", "--image-size", "160"],
}
# Candidates trained on prepdata's balanced train/ (melanoma copies up to 1:1) instead of the
# imbalanced one. They, and those at a larger --image-size, train for fewer epochs, so that each
# candidate costs about the same time.
BALANCED = {"lr1e-3_balanced"}


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=DATA, help="folder with GroundTruth.csv, metadata, images/"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "bench_runs" / "tuning", help="working folder")
    parser.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--image-size", type=int, default=128, help="training size")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per candidate")
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch size")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N CSV rows (0: all)")
    parser.add_argument(
        "--tta", action="store_true", help="also score validation with test-time augmentation"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="keep a candidate's finished run instead of training it again"
    )
    return parser


def prepare(args, balanced):
    """The prepared tree: train/ imbalanced, or balanced with augmented melanoma copies."""
    prepared = args.work / ("prepared_balanced" if balanced else "prepared")
    if not (args.reuse and (prepared / "manifest.csv").is_file()):
        run_stage(
            {}, "prepdata", "prepdata.py",
            "--csv", limited_csv(args.data, args.work, args.limit), "--images", args.data / "images",
            "--metadata", args.data / "HAM10000_metadata.csv", "--out", prepared, "--overwrite",
            *([] if balanced else ["--no-balance"]),
        )  # fmt: skip
    # model.py scores test/ at the end of a run: empty it, so that no test figure is ever seen
    # while choosing (the split itself stays bench_quality.py's).
    shutil.rmtree(prepared / "test")
    (prepared / "test").mkdir()
    return prepared


def train_images(prepared):
    return sum(1 for _ in (prepared / "train").iterdir())


def candidate_epochs(name, args, trees):
    """args.epochs, scaled down for a larger train/ or image size to about the same compute."""
    flags, scale = CANDIDATES[name], 1.0
    if name in BALANCED:
        scale *= train_images(trees[False]) / train_images(trees[True])
    if "--image-size" in flags:
        scale *= (args.image_size / int(flags[flags.index("--image-size") + 1])) ** 2
    return max(1, round(args.epochs * scale))


def finished(history_path, epochs):
    """A run of `epochs` epochs that trained them all or stopped early on its own."""
    if not history_path.is_file():
        return False
    history = json.loads(history_path.read_text())
    done, settings = len(history["epochs"]), history["settings"]
    stopped_early = history["best_epoch"] is not None and done - history["best_epoch"] >= settings["patience"]
    return settings["epochs"] == epochs and (done == epochs or stopped_early)


def train_candidate(name, args, trees):
    out, timings = args.work / name, {}
    prepared, epochs = trees[name in BALANCED], candidate_epochs(name, args, trees)
    if not (args.reuse and finished(out / "training_history.json", epochs)):
        run_stage(
            timings, "model", "model.py",
            "--data", prepared, "--out", out, "--weights", "none", "--image-size", args.image_size,
            "--epochs", epochs, "--batch-size", args.batch_size, "--accumulation-steps", 1,
            *CANDIDATES[name],
        )  # fmt: skip
    history = json.loads((out / "training_history.json").read_text())
    aucs = [epoch["val_auc"] for epoch in history["epochs"]]
    outcome = {
        "candidate": name,
        "best_epoch": history["best_epoch"],
        "val_auc": aucs,
        "epochs": len(aucs),
        "train_s": sum(epoch["seconds"] for epoch in history["epochs"]),
    }
    if args.tta:
        run_stage(
            timings, "tta", "analysis.py", "--model", out / "best_model.pth", "--data", prepared / "val",
            "--out", out / "val_tta", "--tta", "--bootstrap", 200,
        )  # fmt: skip
        outcome["val_auc_tta"] = json.loads((out / "val_tta" / "metrics.json").read_text())["roc_auc"]
    return outcome


def report_lines(outcomes, args):
    lines = [
        f"validation split of ham10000_300, random init, {args.image_size} px, {args.epochs} epochs "
        f"(fewer for a balanced train/ or a larger size, for the same compute), batch {args.batch_size}",
        "",
        "| candidate | train/ | model.py flags | epochs | val AUC per epoch | best | with --tta | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for outcome in outcomes:
        per_epoch = " ".join("n/a" if auc is None else f"{auc:.3f}" for auc in outcome["val_auc"])
        best = outcome["val_auc"][outcome["best_epoch"] - 1]
        tta = outcome.get("val_auc_tta")
        lines.append(
            f"| {outcome['candidate']} | {'balanced' if outcome['candidate'] in BALANCED else 'imbalanced'} "
            f"| `{' '.join(CANDIDATES[outcome['candidate']]) or '(defaults)'}` | {outcome['epochs']} "
            f"| {per_epoch} | {best:.3f} | {'n/a' if tta is None else f'{tta:.3f}'} "
            f"| {outcome['train_s']:.0f} |"
        )
    return lines


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    start = start_run(args)
    kinds = [False, True] if any(name in BALANCED for name in args.candidates) else [False]
    trees = {balanced: prepare(args, balanced) for balanced in kinds}
    outcomes = [train_candidate(name, args, trees) for name in args.candidates]
    finish_report(report_lines(outcomes, args), start, args.work / "tuning_report.md")


if __name__ == "__main__":
    main()
