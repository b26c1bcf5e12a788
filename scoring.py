"""The answer for one image, from the network's outputs (DESIGN.md, "The answer for one image"):
the calibrated melanoma probability, the label at the stored threshold, whether the model can
judge the image (the out-of-distribution score) and quality warnings. Torch-free: the app and
predict.py serve an .onnx file without torch. What it reads from a checkpoint is fitted by
scoring_fit.py.
"""

import numpy as np

from lesion_labels import CLASS_NAMES, MELANOMA, MELANOMA_DIAGNOSIS, NON_MELANOMA


def melanoma_output(meta):
    """The network output that is melanoma: MELANOMA of a two-class head (every checkpoint
    before diagnosis heads), or the 'mel' output of a diagnosis head."""
    diagnoses = meta.get("diagnoses")
    return diagnoses.index(MELANOMA_DIAGNOSIS) if diagnoses else MELANOMA


def melanoma_log_odds(logits, melanoma_index=MELANOMA):
    """log(p / (1 - p)) of the softmax melanoma probability p, computed without rounding to 0 or 1;
    `melanoma_index` is the melanoma output (`melanoma_output`). With a diagnosis head, p is the
    softmax probability of the melanoma diagnosis and 1 - p the sum of all the others'.

    NumPy's logaddexp rather than SciPy's special functions: importing scipy.special costs the
    serving process memory (docs/measurements.md) for three lines of arithmetic."""
    logits = np.asarray(logits, dtype=np.float64)
    others = np.logaddexp.reduce(np.delete(logits, melanoma_index, axis=1), axis=1)
    return logits[:, melanoma_index] - others


def melanoma_probability(logits, calibration=None, melanoma_index=MELANOMA):
    """The melanoma probability shown to people, from a batch of logits."""
    return shown_probability(melanoma_log_odds(logits, melanoma_index), calibration)


def shown_probability(log_odds, calibration=None):
    """The one place a melanoma log-odds becomes the probability shown to people.

    With a calibration (Platt scaling, fitted on the validation split), the log-odds are scaled
    and shifted: the probability then means the chance of melanoma among images like the
    validation split's, at its melanoma share. The slope is positive, so the ranking (and with
    the threshold mapped alike, every decision) stays the same."""
    log_odds = np.asarray(log_odds, dtype=np.float64)
    if calibration is not None:
        log_odds = calibration["slope"] * log_odds + calibration["intercept"]
    return np.exp(-np.logaddexp(0.0, -log_odds))  # 1 / (1 + e^-x), without overflow


def mahalanobis_distances(features, class_means, precision):
    """Squared Mahalanobis distance of each feature vector to the nearest class mean, under the
    classes' shared covariance (given as its inverse, `precision`)."""
    distances = []
    for mean in class_means:
        centred = features - mean
        distances.append(np.einsum("nd,de,ne->n", centred, precision, centred, optimize=True))
    return np.min(distances, axis=0)


def ood_scores(stage_means, ood):
    """Out-of-distribution score of each image (Lee et al., 2018, with their feature ensemble):
    at each of the checkpoint's stages, the Mahalanobis distance of the stage mean to the
    training images, in units of its own validation percentile; the score is the largest.
    Above 1 at one stage already means: less like the training images than most validation
    images are, there."""
    return np.max(
        [
            mahalanobis_distances(stage_means[stage["stage"]], stage["class_means"], stage["precision"])
            / stage["scale"]
            for stage in ood["stages"]
        ],
        axis=0,
    )


# Quality limits are percentiles of the training images' statistics (scoring_fit.py fits them).
QUALITY_PERCENTILE = 1
QUALITY_WARNINGS = {
    "sharpness_min": "the image looks blurred (less sharp than 99% of the training images)",
    "brightness_min": "the image is very dark (darker than 99% of the training images)",
    "brightness_max": "the image is very bright (brighter than 99% of the training images)",
    "contrast_min": "the image has very little contrast (less than 99% of the training images)",
}
NOT_A_LESION = "does not look like a dermoscopic image of a skin lesion"
# Smaller than the model's input, or more elongated than this, is scored with a warning.
MAX_ASPECT_RATIO = 3.0


def size_warnings(facts, image_size):
    """Reasons the answer may be less reliable for this image's size or shape (still scored)."""
    width, height = facts["width"], facts["height"]
    warnings = []
    if min(width, height) < image_size:
        warnings.append(
            f"the image ({width}x{height}) is smaller than the model's input "
            f"({image_size}x{image_size}) and was enlarged: the result is less reliable"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        warnings.append(
            "the image is very elongated and was squeezed into a square: the result is less reliable"
        )
    return warnings


def as_arrays(values):
    """A dict's tensors and nested lists as float64 NumPy arrays (a checkpoint stores tensors,
    the engine's ONNX file nested lists); its numbers stay as they are."""
    return {
        key: value if np.isscalar(value) else np.asarray(value, dtype=np.float64)
        for key, value in values.items()
    }


class ScoringRules:
    """A checkpoint's rules for turning the network's outputs into the answer for one image:
    the calibration, the decision threshold, the out-of-distribution score and its threshold,
    the image-quality limits. Built once per loaded checkpoint (`from_meta`); every stage
    answers through it, so the app, analysis.py and model.py's test summary agree."""

    def __init__(self, meta):
        self.image_size = meta["image_size"]
        self.melanoma_index = melanoma_output(meta)
        self.threshold = float(meta["threshold"])
        self.calibration = meta.get("calibration")
        self.quality = meta.get("quality")
        self.ood = meta.get("ood")
        if self.ood is not None:  # tensors in the checkpoint; arrays here, converted once
            self.ood = {**self.ood, "stages": [as_arrays(stage) for stage in self.ood["stages"]]}

    @property
    def can_flag(self):
        return self.ood is not None

    def probabilities(self, logits):
        return melanoma_probability(logits, self.calibration, self.melanoma_index)

    def ood_scores(self, stage_means):
        """Each image's out-of-distribution score; None for each when the checkpoint has none."""
        if self.ood is None:
            return [None] * len(stage_means[0])
        return ood_scores(stage_means, self.ood)

    def warnings(self, facts):
        """Size and quality warnings for one image's `image_facts` (quality: when fitted)."""
        warnings = size_warnings(facts, self.image_size)
        if self.quality is not None:
            limits = self.quality["limits"]
            failed = {
                "sharpness_min": facts["sharpness"] < limits["sharpness_min"],
                "brightness_min": facts["brightness"] < limits["brightness_min"],
                "brightness_max": facts["brightness"] > limits["brightness_max"],
                "contrast_min": facts["contrast"] < limits["contrast_min"],
            }
            warnings += [QUALITY_WARNINGS[name] for name, fails in failed.items() if fails]
        return warnings

    def label(self, probability):
        return MELANOMA if probability >= self.threshold else NON_MELANOMA

    def answers(self, logits, stage_means, facts):
        """The answer for each image of a batch: {label, probability, threshold, calibrated,
        reliable, reasons, ood_score, ood_threshold, warnings}, from `network_outputs` and each
        image's image_facts."""
        probabilities = self.probabilities(logits)
        ood_scores = self.ood_scores(stage_means)
        answers = []
        for one_image, probability, ood_score in zip(facts, probabilities, ood_scores, strict=True):
            answers.append(
                {
                    "label": CLASS_NAMES[self.label(probability)],
                    "probability": float(probability),
                    "threshold": self.threshold,
                    "calibrated": self.calibration is not None,
                    **self.reliability(ood_score),
                    "warnings": self.warnings(one_image),
                }
            )
        return answers

    def reliability(self, ood_score):
        """Whether the model can judge the image: reliable is None when the checkpoint cannot tell."""
        if ood_score is None:
            return {
                "reliable": None,
                "reasons": ["this checkpoint has no out-of-distribution score: flagging is not available"],
                "ood_score": None,
                "ood_threshold": None,
            }
        flagged = bool(ood_score > self.ood["threshold"])
        return {
            "reliable": not flagged,
            "reasons": [NOT_A_LESION] if flagged else [],
            "ood_score": float(ood_score),
            "ood_threshold": float(self.ood["threshold"]),
        }
