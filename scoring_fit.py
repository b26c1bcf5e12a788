"""Fitting what scoring needs beyond the weights (the producer of what scoring.ScoringRules
reads): the calibration, the decision threshold on the calibrated scale, the out-of-distribution
score and the image-quality limits, fitted on the best checkpoint as the app runs it and stored in
it; then the checkpoint is exported for the serving engine. `model.py --fit-scoring-only` runs this
alone."""

from pathlib import Path

import numpy as np
import scipy.special
import torch
from sklearn.covariance import LedoitWolf
from sklearn.linear_model import LogisticRegression

import checkpoints
import engine
import export
import metrics
import onnx_file
import prepared
import scoring
from backbones import backbone_named
from image_input import QUALITY_STATISTICS
from lesion_labels import CLASS_NAMES, MELANOMA, NON_MELANOMA
from metrics import choose_threshold

MIN_IMAGES_TO_CALIBRATE = 10  # of each class in val/: fewer make Platt scaling a guess


def fit_calibration(labels, log_odds):
    """(Platt scaling of the melanoma log-odds fitted on validation, None) or (None, why not).

    The loss is class-weighted (a 50% melanoma prior), so the raw probability overstates
    melanoma at HAM10000's real share of about 11%; a slope and an intercept on the log-odds fix
    both the prior and over- or under-confidence. Isotonic regression is not used: its steps
    tie images that the network ranks apart, which changes the AUC."""
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    if counts.min() < MIN_IMAGES_TO_CALIBRATE:
        return None, (
            f"not calibrated: val/ has {counts[MELANOMA]} melanomas and "
            f"{counts[NON_MELANOMA]} other lesions, and calibration needs "
            f"{MIN_IMAGES_TO_CALIBRATE} of each"
        )
    # A weak penalty keeps the slope finite when validation happens to be perfectly separated.
    fit = LogisticRegression(C=1e4).fit(log_odds[:, None], labels)
    slope, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    if slope <= 0:
        return None, "not calibrated: on val/ the network does not rank melanomas above other lesions"
    calibration = {
        "method": "platt",
        "slope": slope,
        "intercept": intercept,
        "n_images": int(len(labels)),
        "melanoma_share": float(np.mean(labels == MELANOMA)),
        "rule": "Platt scaling of the melanoma log-odds, fitted on the validation split: the probability "
        "is the chance of melanoma at the validation split's melanoma share",
    }
    return calibration, None


def fit_ood(train, val_stage_means, flag_rate, stages):
    """What the out-of-distribution score needs (`scoring.ood_scores`): for each stage, the class
    means and the inverse of the shared covariance of the original training images' stage means,
    and the validation distance that `flag_rate` of validation images exceed (the stage's unit);
    then the threshold on the largest of those, again exceeded by `flag_rate` of validation."""
    fitted = [fit_ood_stage(stage, train, val_stage_means[stage], flag_rate) for stage in stages]
    as_scored = {"stages": [scoring.as_arrays(stage) for stage in fitted]}
    threshold = float(np.quantile(scoring.ood_scores(val_stage_means, as_scored), 1 - flag_rate))
    return {
        "method": "mahalanobis",
        "stages": fitted,
        "threshold": threshold,
        "flag_rate": float(flag_rate),
        "n_train_images": int(len(train.labels)),
        "rule": f"flagged when, at one of the network's stages {', '.join(map(str, stages))}, the "
        f"Mahalanobis distance to the original training images is larger than for all but "
        f"{flag_rate:.0%} of validation images",
    }


def fit_ood_stage(stage, train, val_means, flag_rate):
    features = train.stage_means[stage]
    classes = np.unique(train.labels)
    class_means = np.stack([features[train.labels == label].mean(axis=0) for label in classes])
    centred = features - class_means[np.searchsorted(classes, train.labels)]
    # Ledoit-Wolf shrinkage: a usable inverse even with fewer images than feature dimensions.
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    distances = scoring.mahalanobis_distances(val_means, class_means, precision)
    return {
        "stage": int(stage),
        "class_means": torch.tensor(class_means, dtype=torch.float32),
        "precision": torch.tensor(precision, dtype=torch.float32),
        "scale": float(np.quantile(distances, 1 - flag_rate)),
    }


def fit_quality_limits(facts):
    """Limits of the image-quality warnings: percentiles of the training images' statistics."""
    values = {name: np.array([image[name] for image in facts]) for name in QUALITY_STATISTICS}
    low, high = scoring.QUALITY_PERCENTILE, 100 - scoring.QUALITY_PERCENTILE
    return {
        "limits": {
            "sharpness_min": float(np.percentile(values["sharpness"], low)),
            "brightness_min": float(np.percentile(values["brightness"], low)),
            "brightness_max": float(np.percentile(values["brightness"], high)),
            "contrast_min": float(np.percentile(values["contrast"], low)),
        },
        "n_images": len(facts),
        "rule": f"a warning below the {low}st percentile (or above the {high}th) of the original "
        "training images' sharpness (variance of the Laplacian), brightness and contrast",
    }


def fit_scoring_rules(best_path, args, device):
    """Fit what scoring needs beyond the weights on the best checkpoint, as the app will run it,
    and store it there: calibration (val/), the decision threshold on the calibrated scale, the
    out-of-distribution score (original train/ images; threshold on val/), quality limits. Then
    export it, rules included, as best_model.onnx beside it for the serving engine."""
    weights, meta = checkpoints.load_checkpoint(best_path, device)
    network = checkpoints.TorchNetwork(best_path, device)  # the network as the app runs it
    print(f"Fitting calibration, out-of-distribution score and quality limits for {best_path}.")
    data = Path(args.data)
    train = score_split(network, data / "train", args, originals_only=True, description="Train")
    val = score_split(network, data / "val", args, description="Validation")
    log_odds = scoring.melanoma_log_odds(val.logits, scoring.melanoma_output(meta))
    calibration, not_calibrated = fit_calibration(val.labels, log_odds)
    raw = scoring.shown_probability(log_odds)
    calibrated = scoring.shown_probability(log_odds, calibration)
    # The same rule on both scales picks the same validation image as the threshold, so the
    # calibrated threshold makes exactly the decisions the uncalibrated one makes.
    raw_threshold, rule = choose_threshold(val.labels, raw, args.threshold, args.target_sensitivity)
    threshold, _ = choose_threshold(val.labels, calibrated, args.threshold, args.target_sensitivity)
    if args.threshold != "auto" and calibration is not None:
        threshold = float(scoring.shown_probability(scipy.special.logit(raw_threshold), calibration))
    meta.update(
        threshold=threshold,
        threshold_rule=rule,
        threshold_uncalibrated=raw_threshold,
        calibration=calibration and {**calibration, **calibration_change(val.labels, raw, calibrated)},
        not_calibrated=not_calibrated,
        ood=fit_ood(train, val.stage_means, args.ood_flag_rate, backbone_named(meta["arch"]).ood_stages),
        quality=fit_quality_limits(train.facts),
    )
    checkpoints.save_checkpoint(best_path, weights, meta)
    print(describe_scoring_rules(meta, val.labels))
    onnx_path = export.export_onnx(best_path, onnx_file.path_beside(best_path))
    print(f"Serving engine's network written to {onnx_path}")
    return meta


def score_split(network, folder, args, originals_only=False, description="Scoring"):
    """A split scored by the engine's one loop (engine.score_files); `originals_only` leaves out
    augmented copies, which are not images the model will ever be shown."""
    samples = prepared.list_prepared_images(folder)
    if originals_only:
        samples = [(path, label) for path, label in samples if not prepared.is_augmented_filename(path)]
    paths, labels = zip(*samples, strict=True)
    return engine.score_files(network, paths, labels, args.batch_size, args.workers, description=description)


def describe_scoring_rules(meta, val_labels):
    calibration = meta["calibration"]
    if calibration is None:
        calibrated = meta["not_calibrated"]
    else:
        before, after = (calibration[f"val_expected_calibration_error_{t}"] for t in ("before", "after"))
        calibrated = (
            f"calibrated on {calibration['n_images']} validation images (melanoma share "
            f"{calibration['melanoma_share']:.1%}): ECE {before:.3f} -> {after:.3f}"
        )
    quality = meta["quality"]["limits"]
    return (
        f"Probability: {calibrated}. Threshold {meta['threshold']:.4f} on the shown probability "
        f"({meta['threshold_uncalibrated']:.4f} before calibration; {meta['threshold_rule']}).\n"
        f"Out-of-distribution: flags {meta['ood']['flag_rate']:.0%} of {len(val_labels)} validation "
        f"images (score above {meta['ood']['threshold']:.1f}), fitted on {meta['ood']['n_train_images']} "
        f"original training images.\n"
        f"Quality limits: sharpness >= {quality['sharpness_min']:.1f}, brightness "
        f"{quality['brightness_min']:.1f} to {quality['brightness_max']:.1f}, "
        f"contrast >= {quality['contrast_min']:.1f}."
    )


def calibration_change(labels, raw, calibrated):
    before, after = metrics.calibration_metrics(labels, raw), metrics.calibration_metrics(labels, calibrated)
    return {f"val_{name}_before": before[name] for name in before} | {
        f"val_{name}_after": after[name] for name in after
    }
