"""Train the melanoma classifier: fine-tune a backbone (EfficientNetV2-S by default, or
EfficientNet-Lite0 whose ImageNet weights install with pip) on a prepared tree, then test it.

    python model.py --data prepared_dataset --out .
    torchrun --nproc_per_node=4 model.py --data prepared_dataset     # several GPUs, one machine

Writes into --out: `best_model.pth` (whenever validation improves), `last_checkpoint.pth` (each
epoch, everything `--resume` needs) and `training_history.json`; once training ends,
`best_model.onnx` (the same network for the serving engine); then scores the best checkpoint on
the test split at the decision threshold it stores (chosen on the validation split).
"""

import argparse
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import backbones
import checkpoints
import cli
import devices
import errors
import evaluation
import files
import metrics
import prepared
import scoring_fit
import training
import training_data

BEST_CHECKPOINT = "best_model.pth"
LAST_CHECKPOINT = "last_checkpoint.pth"
HISTORY_FILE = "training_history.json"

# `--preset original`: the original project's recipe expressed with this code, for comparisons.
# Flags given on the command line still win over a preset.
PRESETS = {
    "original": {
        "augmentation": "original",
        "lr": 1e-3,
        "weight_decay": 1e-5,
        "schedule": "plateau",
        "monitor": "loss",
        "class_weights": "none",
        "threshold": 0.5,
        "targets": "melanoma",
        "ema_decay": 0.0,
        "progressive_from": 0,
    }
}

# What `--resume` may change: where things are and how fast they run, never what is computed.
CHANGEABLE_ON_RESUME = ("data", "out", "workers", "device", "resume", "ood_flag_rate", "time_budget")

# A run interrupted before these settings existed resumed as it was trained: without them.
SETTINGS_BEFORE_THEY_EXISTED = {
    "arch": backbones.DEFAULT_ARCH,
    "targets": "melanoma",
    "ema_decay": 0.0,
    "progressive_from": 0,
    "time_budget": 0,
    "backbone_lr_scale": 1.0,
}


# --- command line ----------------------------------------------------------------------------


def threshold_setting(text):
    """'auto' (chosen on validation) or a fixed probability in [0, 1]."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a number in [0, 1], not {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], not {text}")
    return value


def ema_decay(text):
    """A decay in [0, 1): 0 turns the average off, 1 would never move from the first weights."""
    value = cli.non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (0 turns the average off), not {text}")
    return value


def get_args_parser():
    parser = cli.ArgumentParser(
        description="Fine-tune an ImageNet backbone to tell melanoma from other lesions (model.py).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--data", default="prepared_dataset", help="prepared tree holding train/, val/ and test/")
    add("--out", default=".", help="folder for best_model.pth, last_checkpoint.pth, training_history.json")
    add(
        "--preset",
        choices=sorted(PRESETS),
        help="start from the original project's recipe "
        "(plain cross-entropy, AdamW lr 1e-3, reduce-on-plateau on val loss, fixed resize, threshold "
        "0.5); flags given explicitly still win",
    )
    add("--epochs", type=cli.positive_int, default=10, help="most epochs to train")
    add("--batch-size", type=cli.positive_int, default=32, help="images per micro-batch (per process)")
    add("--accumulation-steps", type=cli.positive_int, default=4, help="micro-batches per optimiser step")
    add(
        "--patience",
        type=cli.positive_int,
        default=3,
        help="stop after this many epochs without improvement",
    )
    add(
        "--arch",
        choices=sorted(backbones.BACKBONES),
        default=backbones.DEFAULT_ARCH,
        help="backbone: efficientnet_v2_s (ImageNet weights downloaded once by torchvision) or "
        "efficientnet_lite0 (ImageNet weights installed with pip: no download)",
    )
    add(
        "--image-size",
        type=cli.positive_int,
        help="square input size; when not given, the backbone's own (384 for efficientnet_v2_s, "
        "224 for efficientnet_lite0)",
    )
    add("--lr", type=cli.positive_float, default=3e-4, help="peak AdamW learning rate")
    add(
        "--backbone-lr-scale",
        type=cli.positive_float,
        default=1.0,
        help="the backbone's learning rate as a share of --lr, the new head's (1: one rate for all)",
    )
    add("--weight-decay", type=cli.non_negative_float, default=0.05, help="AdamW weight decay")
    add(
        "--schedule",
        choices=("cosine", "plateau"),
        default="cosine",
        help="cosine: linear warm-up then cosine decay per step; plateau: x0.1 after 2 flat epochs",
    )
    add(
        "--warmup-epochs",
        type=cli.non_negative_float,
        # Chosen on validation, fine-tuning EfficientNet-Lite0 from ImageNet at equal wall time:
        # a fifth of an epoch beat a whole one, which left a 1-epoch budget no decay at all
        # (docs/measurements.md, fourth round).
        default=0.2,
        help="warm-up length of the cosine schedule",
    )
    add(
        "--monitor",
        choices=("auc", "loss"),
        default="auc",
        help="validation metric for the best checkpoint and early stopping",
    )
    add(
        "--class-weights",
        choices=("balanced", "none"),
        default="balanced",
        help="balanced: weight the loss by inverse class frequency of train/ (no effect on balanced data)",
    )
    add(
        "--targets",
        choices=("melanoma", "diagnosis"),
        # On validation at equal wall time (docs/measurements.md) the diagnosis head tied with the
        # two-class head, so the default is the simpler one.
        default="melanoma",
        help="melanoma: a two-class head; diagnosis: one output per diagnosis in train/ (manifest.csv), "
        "the melanoma probability being the melanoma output's softmax probability (falls back to "
        "melanoma, with a notice, when the tree records fewer than two other diagnoses)",
    )
    add(
        "--ema-decay",
        type=ema_decay,
        # Off by default: at the CPU benchmark's budget it validated worse than the weights it
        # averages and costs a validation pass per epoch (docs/measurements.md).
        default=0.0,
        help="exponential moving average of the weights, updated every optimiser step with this "
        "decay; validated beside the weights each epoch, and saved as the best checkpoint when it is "
        "better (0: off)",
    )
    add(
        "--progressive-from",
        type=cli.non_negative_int,
        default=0,
        metavar="PX",
        help="progressive resizing: train the first epoch at PX pixels, growing linearly (in steps "
        "of 16) to --image-size at the last epoch, with augmentation strength growing alike (0: off)",
    )
    add(
        "--time-budget",
        type=cli.non_negative_float,
        default=0,
        metavar="MINUTES",
        help="end training cleanly before an epoch that would end after this many minutes of "
        "training (estimated from the last epoch), then fit, export and test as usual (0: no limit)",
    )
    add(
        "--augmentation",
        choices=("ours", "original"),
        default="ours",
        help="ours: random-resized crop, flips, quarter turns, mild colour jitter; original: fixed "
        "resize, flips, quarter turns, the original's stronger colour jitter",
    )
    add(
        "--threshold",
        type=threshold_setting,
        default="auto",
        help="decision threshold: 'auto' picks it on validation (see --target-sensitivity), or a number",
    )
    add(
        "--target-sensitivity",
        type=cli.fraction,
        default=0.9,
        help="with --threshold auto: the highest threshold catching this share of validation melanomas",
    )
    add("--weights", default="imagenet", help="initial backbone weights: imagenet, none or a .pth file")
    add("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    add(
        "--amp",
        choices=("auto", "bf16", "fp16", "off"),
        default="auto",
        help="mixed precision; auto: bf16 on GPUs that have it (else fp16) and on CPUs with AMX/AVX512-BF16",
    )
    add(
        "--workers",
        type=cli.non_negative_int,
        default=min(4, cli.available_cores()),
        help="data-loading processes per training process (0 loads in the training process)",
    )
    add(
        "--seed",
        type=cli.non_negative_int,
        default=42,
        help="seed of the initial head, data order, augmentation, dropout",
    )
    add("--resume", action="store_true", help=f"continue the run saved in OUT/{LAST_CHECKPOINT}")
    add(
        "--ood-flag-rate",
        type=cli.fraction,
        default=0.05,
        help="share of real validation images the 'cannot judge this image' flag may catch; "
        "its threshold is set on val/ to flag exactly this share",
    )
    add(
        "--fit-scoring-only",
        action="store_true",
        help=f"no training: fit calibration, the out-of-distribution score and the quality limits for "
        f"OUT/{BEST_CHECKPOINT} (e.g. one trained before they existed, or the original project's), "
        "then score test/",
    )
    return parser


def parse_args(parser, argv):
    """Parse twice when a preset is named: its values become the defaults, explicit flags win.
    An image size not given is the backbone's own."""
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    args.image_size = args.image_size or backbones.BACKBONES[args.arch].image_size
    return args


def typed_settings(argv):
    """The settings typed on the command line `argv`, with their values: a second parse in which
    no flag has a default, so a flag typed with its default value counts as typed too."""
    parser = get_args_parser()
    for action in parser._actions:  # argparse lists a parser's flags nowhere public
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def settings_for_resume(typed, saved):
    """The interrupted run's settings; the `typed` settings may change only CHANGEABLE_ON_RESUME."""
    merged = {**SETTINGS_BEFORE_THEY_EXISTED, **saved}
    for name, value in typed.items():
        if name in CHANGEABLE_ON_RESUME:
            merged[name] = value
        elif saved.get(name) != value:
            flag = "--" + name.replace("_", "-")
            raise errors.UserError(
                f"--resume keeps the interrupted run's settings, which had {flag} {saved.get(name)} "
                f"(not {value}); drop {flag} or start a new run in another --out"
            )
    return argparse.Namespace(**merged)


def validation_metrics(scores, threshold):
    """The checkpoint's val_metrics: decisions at the stored threshold, ranking, loss."""
    _, at_threshold = metrics.metrics_at_threshold(scores.labels, scores.probabilities, threshold)
    return {
        "auc": scores.auc(),
        "loss": scores.loss(),
        **{name: at_threshold[name] for name in ("accuracy", "sensitivity", "specificity")},
    }


# --- training ----------------------------------------------------------------------------------


def resolve_monitor(args, val_labels, runtime):
    """'val_auc' when asked for and defined; a validation split of one class falls back to loss."""
    if args.monitor == "auc" and len(set(val_labels)) == 2:
        return "val_auc"
    if args.monitor == "auc":
        runtime.log(
            "Note: the validation split holds one class only, so AUC is undefined: monitoring val loss."
        )
    return "val_loss"


def improved(value, best, monitor):
    if best is None:
        return True
    return value > best if monitor == "val_auc" else value < best


@dataclass
class Progress:
    """What survives an interruption besides the weights and optimiser (see `last_checkpoint`)."""

    history: dict
    epoch: int = 0  # epochs completed
    best_value: float | None = None
    epochs_without_improvement: int = 0
    stopped_early: bool = False


def new_history(monitor, runtime, args):
    return {
        "monitor": monitor,
        "best_epoch": None,
        "amp": devices.amp_name(runtime.amp_dtype),
        "device": runtime.device.type,
        "settings": vars(args),
        "stopped_by_time_budget": False,
        "epochs": [],
    }


def epoch_record(epoch, train, val, lr, seconds, train_seconds, image_size, ema_val=None):
    """One epoch's figures; val_* are the weights', ema_val_* their moving average's."""
    record = {
        "epoch": epoch,
        "image_size": image_size,
        "train_loss": train.loss(),
        "train_accuracy_at_0.5": train.accuracy_at_half(),
        "train_auc": train.auc(),
        "val_loss": val.loss(),
        "val_accuracy_at_0.5": val.accuracy_at_half(),
        "val_auc": val.auc(),
        "lr": lr,
        "seconds": round(seconds, 2),
        "train_seconds": round(train_seconds, 2),
    }
    if ema_val is not None:
        record |= {"ema_val_loss": ema_val.loss(), "ema_val_auc": ema_val.auc()}
    return record


def better_weights(record, monitor):
    """'ema' when the moving average validated better than the weights this epoch, else 'weights'."""
    ema_value = record.get(f"ema_{monitor}")
    if ema_value is None or record[monitor] is None:
        return "weights"
    return "ema" if improved(ema_value, record[monitor], monitor) else "weights"


def summary_line(record, epochs, is_best):
    auc = "n/a" if record["val_auc"] is None else f"{record['val_auc']:.4f}"
    ema = ""
    if "ema_val_auc" in record:
        ema_auc = "n/a" if record["ema_val_auc"] is None else f"{record['ema_val_auc']:.4f}"
        ema = f"EMA Val Loss: {record['ema_val_loss']:.4f}, EMA Val AUC: {ema_auc}, "
    saved = f" (best so far: saved {BEST_CHECKPOINT}, {record['selected']})" if is_best else ""
    return (
        f"Epoch [{record['epoch']}/{epochs}] {record['image_size']}px - "
        f"Train Loss: {record['train_loss']:.4f}, "
        f"Train Accuracy@0.5: {100 * record['train_accuracy_at_0.5']:.2f}%, "
        f"Val Loss: {record['val_loss']:.4f}, Val Accuracy@0.5: {100 * record['val_accuracy_at_0.5']:.2f}%, "
        f"Val AUC: {auc}, {ema}LR: {record['lr']:.2e}, {record['seconds']:.0f}s{saved}"
    )


def save_best(args, network, head, val_scores, epoch, out, monitor, amp_dtype, selected):
    """Write best_model.pth from `network`: the weights, or their moving average (`selected`)."""
    threshold, rule = metrics.choose_threshold(
        val_scores.labels, val_scores.probabilities, args.threshold, args.target_sensitivity
    )
    meta = checkpoints.checkpoint_metadata(
        arch=args.arch,
        image_size=args.image_size,
        threshold=threshold,
        weights=args.weights,
        epoch=epoch,
        val_metrics=validation_metrics(val_scores, threshold),
        threshold_rule=rule,
        monitor=monitor,
        training_amp=devices.amp_name(amp_dtype),
        settings=vars(args),
        saved_weights=selected,
        **head.metadata(),
    )
    checkpoints.save_checkpoint(out / BEST_CHECKPOINT, network, meta)


def save_last_checkpoint(path, args, trainer, plateau, progress):
    """Everything --resume needs. No RNG state: every random stream is re-derived from
    (seed, epoch, process, image), so the next epoch draws the same numbers either way."""
    model = getattr(trainer.model, "module", trainer.model)
    checkpoints.atomic_torch_save(
        {
            "args": vars(args),
            "model_state": model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scaler": trainer.scaler.state_dict(),
            "step_scheduler": trainer.step_scheduler.state_dict() if trainer.step_scheduler else None,
            "plateau": plateau.state_dict() if plateau else None,
            "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
            "progress": vars(progress),
        },
        path,
    )


def load_last_checkpoint(path):
    missing = "nothing to resume (no last checkpoint in --out)"
    return backbones.saved_dict(path, errors.UserError, "last checkpoint", missing)


def restore(resume_state, trainer, plateau):
    trainer.optimizer.load_state_dict(resume_state["optimizer"])
    trainer.scaler.load_state_dict(resume_state["scaler"])
    if trainer.step_scheduler is not None:
        trainer.step_scheduler.load_state_dict(resume_state["step_scheduler"])
    if plateau is not None:
        plateau.load_state_dict(resume_state["plateau"])
    if trainer.ema is not None:
        trainer.ema.load_state_dict(resume_state["ema"])
    return Progress(**resume_state["progress"])


def run_epoch(args, runtime, trainer, loaders, epoch):
    """Train one epoch, then score validation with the weights and with their moving average:
    (train scores, val scores, EMA val scores or None, each of all processes; seconds of training)."""
    loaders["train"].sampler.set_epoch(epoch)
    # Dropout's stream, re-derived each epoch so that a resumed run draws the same numbers.
    torch.manual_seed(
        training_data.derived_seed(args.seed, training_data.TRAINING_STREAM, epoch, runtime.rank)
    )
    description = f"Epoch {epoch + 1}/{args.epochs}"
    show_progress = cli.show_progress(runtime.is_main)  # without bars, summary_line still logs each epoch
    started = time.perf_counter()
    train = trainer.train_one_epoch(loaders["train"], description, show_progress)
    train_seconds = time.perf_counter() - started
    validate = functools.partial(
        training.score_split, loader=loaders["val"], device=runtime.device,
        melanoma_index=trainer.melanoma_index, show_progress=show_progress,
    )  # fmt: skip
    val = validate(trainer.model, description="Validating")
    ema_val = None if trainer.ema is None else validate(trainer.ema.module, description="Validating EMA")
    return (
        training.gather_scores(train, runtime),
        training.gather_scores(val, runtime),
        ema_val and training.gather_scores(ema_val, runtime),
        train_seconds,
    )


def next_epoch_overruns(args, history):
    """Whether the next epoch, estimated from the last one, would end past --time-budget minutes of
    training. Under progressive resizing the training part scales with the pixels of the next
    size; validation always runs at --image-size, so its part stays as it was."""
    epochs = history["epochs"]
    if not args.time_budget or not epochs:
        return False
    spent = sum(epoch["seconds"] for epoch in epochs)
    last = epochs[-1]
    # A history written before train_seconds was recorded: the whole epoch scales.
    training = last.get("train_seconds", last["seconds"])
    next_size = training_data.epoch_image_size(args, len(epochs))
    estimate = training * (next_size / last["image_size"]) ** 2 + last["seconds"] - training
    return spent + estimate > 60 * args.time_budget


def write_history(out, history):
    files.atomic_write_text(out / HISTORY_FILE, json.dumps(history, indent=2, allow_nan=False))


def train_model(args, runtime, resume_state=None):
    """The training loop: best checkpoint on improvement, last checkpoint every epoch, early stop,
    and a clean end before an epoch that would overrun --time-budget."""
    out = Path(args.out)
    head = training_data.choose_head(args, runtime)
    loaders = {
        "train": training_data.train_loader(args, runtime, head),
        "val": training_data.eval_loader(Path(args.data) / "val", args, runtime),
    }
    val_labels = [label for _, label in prepared.list_prepared_images(Path(args.data) / "val")]
    monitor = resolve_monitor(args, val_labels, runtime)
    model = training.build_model(args, runtime, resume_state, head)
    trainer = training.build_trainer(args, runtime, model, loaders["train"], head)
    plateau = training.plateau_scheduler(args, trainer, monitor)
    if resume_state is None:
        progress = Progress(new_history(monitor, runtime, args))
    else:
        progress = restore(resume_state, trainer, plateau)
        runtime.log(f"Resuming after epoch {progress.epoch} of {args.epochs} from {out / LAST_CHECKPOINT}.")
    while progress.epoch < args.epochs and not progress.stopped_early:
        if next_epoch_overruns(args, progress.history):
            progress.history["stopped_by_time_budget"] = True
            if runtime.is_main:
                write_history(out, progress.history)
            runtime.log(
                f"Time budget: epoch {progress.epoch + 1} would end after {args.time_budget:g} minutes "
                f"of training, so training ends after epoch {progress.epoch} of {args.epochs}."
            )
            break
        started = time.perf_counter()
        train, val, ema_val, train_seconds = run_epoch(args, runtime, trainer, loaders, progress.epoch)
        progress.epoch += 1
        lr = trainer.optimizer.param_groups[0]["lr"]
        size = training_data.epoch_image_size(args, progress.epoch - 1)
        seconds = time.perf_counter() - started
        record = epoch_record(progress.epoch, train, val, lr, seconds, train_seconds, size, ema_val)
        record["selected"] = better_weights(record, monitor)
        value = record[f"ema_{monitor}" if record["selected"] == "ema" else monitor]
        is_best = improved(value, progress.best_value, monitor)
        if is_best:
            progress.best_value, progress.epochs_without_improvement = value, 0
            progress.history["best_epoch"] = progress.epoch
            if runtime.is_main:
                network, scores = (
                    (trainer.ema.module, ema_val) if record["selected"] == "ema" else (trainer.model, val)
                )
                save_best(
                    args,
                    network,
                    head,
                    scores,
                    progress.epoch,
                    out,
                    monitor,
                    trainer.amp_dtype,
                    record["selected"],
                )
        else:
            progress.epochs_without_improvement += 1
        progress.stopped_early = progress.epochs_without_improvement >= args.patience
        if plateau is not None:
            plateau.step(value)
        progress.history["epochs"].append(record)
        if runtime.is_main:
            write_history(out, progress.history)
            save_last_checkpoint(out / LAST_CHECKPOINT, args, trainer, plateau, progress)
        runtime.log(summary_line(record, args.epochs, is_best))
        if progress.stopped_early:
            runtime.log(f"Early stopping: no better {monitor} for {args.patience} epochs.")
    return out / BEST_CHECKPOINT


# --- main --------------------------------------------------------------------------------------


def describe_weights(args):
    if args.weights == "none":
        return f"{args.arch} from random initialisation (--weights none): expect a much weaker model"
    if args.weights == "imagenet":
        source = backbones.BACKBONES[args.arch].weights_source
        return f"{args.arch} with ImageNet weights from {source}, and a new head"
    return f"{args.arch} with the weights in {args.weights}, and a new head"


def threshold_rule_of_training(args, typed, meta):
    """--fit-scoring-only keeps the threshold rule the checkpoint was trained with (a fixed 0.5
    of --preset original stays 0.5), unless the command line types one."""
    trained = {
        name: value
        for name, value in meta.get("settings", {}).items()
        if name in ("threshold", "target_sensitivity") and name not in typed
    }
    return argparse.Namespace(**{**vars(args), **trained})


@cli.exits_on_user_error
def main(argv=None):
    args = parse_args(get_args_parser(), argv)
    typed = typed_settings(argv)
    resume_state = None
    if args.resume:
        resume_state = load_last_checkpoint(Path(args.out) / LAST_CHECKPOINT)
        args = settings_for_resume(typed, resume_state["args"])
    training_data.check_data_folder(args.data)
    if args.progressive_from > args.image_size:
        raise errors.UserError(
            f"--progressive-from {args.progressive_from} is larger than --image-size {args.image_size}: "
            "progressive resizing grows the images up to the scoring size"
        )
    if args.fit_scoring_only:
        device = devices.choose_device(args.device)
        best_path = Path(args.out) / BEST_CHECKPOINT
        _, meta = checkpoints.load_checkpoint(best_path)
        args = threshold_rule_of_training(args, typed, meta)
        scoring_fit.fit_scoring_rules(best_path, args, device)
        evaluation.evaluate_best_on_test(args, device, best_path)
        return
    runtime = devices.start_runtime(args)
    try:
        runtime.log(f"Weights: {describe_weights(args)}.")
        best_path = train_model(args, runtime, resume_state)
        if runtime.is_main:
            scoring_fit.fit_scoring_rules(best_path, args, runtime.device)
            evaluation.evaluate_best_on_test(args, runtime.device, best_path)
    except KeyboardInterrupt:
        print(f"Interrupted: continue with --resume --out {args.out}", file=sys.stderr)
        sys.exit(130)
    finally:
        devices.stop_runtime(runtime)


if __name__ == "__main__":
    main()
