"""What the answer for an image needs besides the network, without torch: labels, decoding images
from outside, the network's input, the scoring rules, heat maps, files written whole, command
lines, and the serving engine's file format.

app.py and predict.py import only this (and engine.py) when they serve an .onnx file;
common.py re-exports all of it for the stages that use torch.
"""

import argparse
import functools
import hashlib
import io
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps


class UserError(Exception):
    """Bad input from the person running a command: shown as one line, exit code 2."""


class ImageError(UserError):
    """An image that cannot be decoded safely."""


class CheckpointError(UserError):
    """A model file that cannot be loaded."""


ONNX_INPUT = "images"
ONNX_METADATA_KEY = "skin_lesion_classification"  # metadata_props entry: the checkpoint's metadata as JSON


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def model_input(image, meta):
    """A decoded RGB PIL image as the network's normalised input, (3, S, S) float32: what
    `common.checkpoint_transform` computes with torchvision (Resize on a PIL image is Pillow's
    antialiased bilinear resize; ToTensor divides by 255; Normalize subtracts and divides in float32)."""
    return normalised(squared(image, meta["image_size"]), meta)


def model_input_and_facts(image, meta):
    """(model_input, image_facts) of a decoded image from one resize: the app and predict.py
    need both, and the resize of a large photo is the costly part of each."""
    square = squared(image, meta["image_size"])
    return normalised(square, meta), facts_of_square(image, square)


def squared(image, size):
    """The image squeezed to size x size: what the network sees and the quality statistics measure."""
    return image.resize((size, size), Image.Resampling.BILINEAR)


def normalised(square, meta):
    pixels = np.asarray(square, dtype=np.float32)
    mean = np.asarray(meta["mean"], dtype=np.float32)
    std = np.asarray(meta["std"], dtype=np.float32)
    return ((pixels / np.float32(255) - mean) / std).transpose(2, 0, 1)


def class_activation_maps(feature_maps, classifier_weight, labels, size):
    """Each image's heat map for its label, (N, size, size) floats in [0, 1], from the last
    feature maps (N, C, h, w) and the classifier's weights (classes, C).

    The network ends in global average pooling and one linear layer, so Grad-CAM's channel
    weights (the label's logit's gradient, averaged over the map) are that label's row of the
    linear layer divided by h * w, and Grad-CAM is relu(sum_c w_c * A_c): the class activation
    map. Scaled to [0, 1] and resized to the input size as pytorch_grad_cam does (the constant
    1 / (h * w) drops out in the scaling)."""
    weights = np.asarray(classifier_weight, dtype=np.float32)[list(labels)]
    maps = np.maximum(np.einsum("nc,nchw->nhw", weights, feature_maps), 0)
    return np.stack([resized(scaled_to_unit(one_map), size) for one_map in maps])


def scaled_to_unit(values):
    values = values - values.min()
    return values / (1e-7 + values.max())


def resized(values, size):
    """A float map resized with bilinear interpolation to size x size."""
    return np.asarray(
        Image.fromarray(values.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR)
    )


MELANOMA, NON_MELANOMA = 1, 0
CLASS_NAMES = ("Non-Melanoma", "Melanoma")  # index = label
# A diagnosis head (model.py --targets diagnosis) has one output per diagnosis code of train/
# (HAM10000's dx: akiec, bcc, bkl, df, mel, nv, vasc); its melanoma output is this one.
MELANOMA_DIAGNOSIS = "mel"
UNKNOWN_DIAGNOSIS = "unknown"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCH = "efficientnet_v2_s"
DEFAULT_IMAGE_SIZE = 384

# Decompression bombs: refuse anything over 64 megapixels (a 50 MP camera fits) before it is
# decoded. Pillow raises only above twice its limit (it warns below), so load_image checks too.
MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False


# --- images ----------------------------------------------------------------------------------


def load_image(source, min_size=None):
    """Decode an image file (path or binary file object) into an upright 8-bit RGB PIL image.

    The whole image is decoded here, so truncated and corrupt files fail now, with an
    ImageError, not later inside a DataLoader worker. `min_size` lets JPEG decode at a reduced
    scale (never below min_size on either side): a 3000x2000 photo then costs about as much
    as a small one.
    """
    name = source if isinstance(source, (str, os.PathLike)) else "upload"
    try:
        with Image.open(source) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError
            if min_size and image.format == "JPEG":
                image.draft("RGB", (min_size, min_size))
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: image has more than {MAX_IMAGE_PIXELS:,} pixels") from None
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    except Image.UnidentifiedImageError:  # its own text names the file object's memory address
        raise ImageError(f"{name}: not a readable image (no image format recognised)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{name}: not a readable image ({error})") from None


def to_rgb(image):
    """Convert any Pillow mode (CMYK, greyscale, palette, 16-bit, alpha) to 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        image = Image.fromarray((array * (255.0 / peak)).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels carry no skin; put them on white, the usual page background.
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


# --- images from outside: what the app and predict.py accept, by one rule -----------------------

# The formats decoded on purpose, recognised by their first bytes, never by the file name or
# the Content-Type a client claims. (WebP is RIFF....WEBP, checked in `detect_format`.)
MAGIC_NUMBERS = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
}
ALLOWED_FORMATS_TEXT = "JPEG, PNG, WebP, BMP or TIFF"

# Smaller than this there is no lesion to see: refused. Smaller than the model's input size,
# or very elongated, is scored with a warning (size_warnings).
MIN_IMAGE_SIDE = 32


class UnsupportedImageFormat(ImageError):
    """A file in none of the formats decoded on purpose (the app answers it with a 415)."""


def detect_format(head):
    """The allowed format named by the first bytes of a file, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for name, prefixes in MAGIC_NUMBERS.items():
        if head.startswith(prefixes):
            return name
    return None


def decode_image_bytes(data, image_size):
    """The image held in `data` (a whole file's bytes), decoded as `load_image` does (JPEGs at
    a reduced scale, never below `image_size`), if the model will score it: an allowed format by
    its first bytes, within the pixel limit, at least MIN_IMAGE_SIDE pixels a side.

    Raises UnsupportedImageFormat or ImageError with the reason in the words the app answers."""
    if not data:
        raise ImageError("the uploaded file is empty")
    if detect_format(data[:16]) is None:
        raise UnsupportedImageFormat(f"unsupported file type: send a {ALLOWED_FORMATS_TEXT} image")
    image = load_image(io.BytesIO(data), min_size=image_size)
    if min(image.size) < MIN_IMAGE_SIDE:
        raise ImageError(
            f"image too small ({image.width}x{image.height}): each side needs {MIN_IMAGE_SIDE}+ pixels"
        )
    return image


# --- from the network's outputs to the answer for one image ------------------------------------
# What scoring needs beyond the weights is fitted on the best checkpoint by model.py and stored
# in it (see `ScoringRules`); an older checkpoint has none of it, and every stage says so.


def melanoma_output(meta):
    """The network output that is melanoma: MELANOMA of a two-class head (every checkpoint
    before diagnosis heads), or the 'mel' output of a diagnosis head."""
    diagnoses = meta.get("diagnoses")
    return diagnoses.index(MELANOMA_DIAGNOSIS) if diagnoses else MELANOMA


def melanoma_log_odds(logits, melanoma=MELANOMA):
    """log(p / (1 - p)) of the softmax melanoma probability p, computed without rounding to 0 or 1;
    `melanoma` is the melanoma output (`melanoma_output`). With a diagnosis head, p is the
    softmax probability of the melanoma diagnosis and 1 - p the sum of all the others'.

    NumPy's logaddexp rather than SciPy's special functions: importing scipy.special costs the
    serving process about 16 MB of memory, for three lines of arithmetic."""
    logits = np.asarray(logits, dtype=np.float64)
    others = np.logaddexp.reduce(np.delete(logits, melanoma, axis=1), axis=1)
    return logits[:, melanoma] - others


def melanoma_probability(logits, calibration=None, melanoma=MELANOMA):
    """The melanoma probability shown to people, from a batch of logits."""
    return shown_probability(melanoma_log_odds(logits, melanoma), calibration)


def heatmap_outputs(logits, labels, meta):
    """The output whose heat map explains each image's label: the label itself for a two-class
    head; for a diagnosis head, the melanoma output for a melanoma label, else the most likely
    other diagnosis (the lesion the network took it for)."""
    melanoma = melanoma_output(meta)
    if not meta.get("diagnoses"):
        return [int(label) for label in labels]
    others = np.asarray(logits, dtype=np.float64).copy()
    others[:, melanoma] = -np.inf
    return [
        melanoma if label == MELANOMA else int(np.argmax(row))
        for label, row in zip(labels, others, strict=True)
    ]


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


# What the answer needs to know of the decoded image besides its pixels: its size, and the
# statistics behind the quality warnings, measured on the grey image at the model's input size
# (so that a camera photo and a small dermoscopic crop are judged at the scale the model sees).
QUALITY_STATISTICS = ("sharpness", "brightness", "contrast")
IMAGE_FACTS = ("width", "height", *QUALITY_STATISTICS)


def image_facts(image, size):
    """{width, height, sharpness: variance of the Laplacian, brightness: mean grey level,
    contrast: its standard deviation} of a PIL image; grey levels 0-255 at `size` x `size`."""
    return facts_of_square(image, squared(image, size))


def facts_of_square(image, square):
    """`image_facts` of `image`, measured on `square`, the image squeezed (`squared`): the grey
    image of the squeezed one, the square the network sees (greying before the resize instead
    moves the statistics by a rounding of the grey levels only)."""
    grey = np.asarray(square.convert("L"), dtype=np.float64)
    laplacian = grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1]
    return {
        "width": image.width,
        "height": image.height,
        "sharpness": float(laplacian.var()),
        "brightness": float(grey.mean()),
        "contrast": float(grey.std()),
    }


# Quality limits are percentiles of the training images' statistics (model.py fits them).
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
        self.melanoma = melanoma_output(meta)
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
        return melanoma_probability(logits, self.calibration, self.melanoma)

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


# --- heat maps: the regions that drove the answer (the app's `?explain=1`, predict.py --heatmaps) --
# Each network computes its mask (scoring.class_activation_maps); here it is drawn.

HEATMAP_MAX_SIDE = 384


def heatmap_png(image, mask):
    """A heat map mask ((H, W) floats in [0, 1]) laid over the decoded PIL image (its aspect
    kept, at most HEATMAP_MAX_SIDE a side), half and half, as the bytes of a PNG file."""
    shown = image.copy()
    shown.thumbnail((HEATMAP_MAX_SIDE, HEATMAP_MAX_SIDE))
    # The model saw the image squeezed to a square: stretching the mask back undoes that.
    mask = np.asarray(Image.fromarray(mask).resize(shown.size, Image.Resampling.BILINEAR))
    overlay = 0.5 * jet_colours(mask) + 0.5 * np.asarray(shown, dtype=np.float32) / 255
    png = io.BytesIO()
    Image.fromarray(np.uint8(255 * overlay / overlay.max())).save(png, format="PNG")
    return png.getvalue()


def jet_colours(mask):
    """The jet colour map (blue, cyan, yellow, red) of a mask in [0, 1], as RGB in [0, 1]:
    OpenCV's COLORMAP_JET, which the heat maps were drawn with before, is this piecewise-linear
    formula on 256 levels (within half a level)."""
    levels = np.uint8(255 * np.clip(mask, 0, 1)) / 255
    return np.stack([np.clip(1.5 - np.abs(4 * levels - centre), 0, 1) for centre in (3, 2, 1)], axis=-1)


# --- files written whole or not at all ----------------------------------------------------


@contextmanager
def atomic_output(path, mode="wb"):
    """A file object on a temporary file beside `path`, renamed to `path` only when the block
    succeeds: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~current_umask())  # mkstemp's 0600 would hide outputs from other users
        with os.fdopen(handle, mode) as file:
            yield file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def current_umask():
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def atomic_write_text(path, text):
    """Write a text file (JSON, CSV, a report) atomically, like `atomic_torch_save`."""
    with atomic_output(path, "w") as file:
        file.write(text)


def onnx_path_beside(checkpoint_path):
    """Where the engine's network of a checkpoint lives: best_model.pth -> best_model.onnx."""
    return Path(checkpoint_path).with_suffix(".onnx")


# --- command lines ---------------------------------------------------------------------------


def bounded_int(text, minimum, maximum=None):
    """An argparse value: an integer from `minimum` to `maximum` (if any), or a one-line error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}: {value}")
    if maximum is not None and value > maximum:
        raise argparse.ArgumentTypeError(f"must be at most {maximum}: {value}")
    return value


def positive_int(text):
    return bounded_int(text, 1)


def non_negative_int(text):
    return bounded_int(text, 0)


def port_number(text):
    """A TCP port; 0 lets the system pick a free one. (waitress would quietly serve 70000 on 4464.)"""
    return bounded_int(text, 0, 65535)


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {text}")
    return value


def available_cores():
    """The cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (plus a --help hint), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def exits_on_user_error(main_function):
    """Decorate a stage's `main`: a UserError becomes one line on stderr and exit code 2."""

    @functools.wraps(main_function)
    def main(argv=None):
        try:
            return main_function(argv)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    return main


def show_progress(wanted=True):
    """Whether to draw a tqdm bar: only on a terminal (tqdm's `disable=None` rule), since a log file
    or a pipe would keep every redraw; `wanted=False` hides it anyway."""
    return wanted and sys.stderr is not None and sys.stderr.isatty()
