"""What the four stages share: labels, file names, images, the model, checkpoints, devices.

Nothing stage-specific lives here. Every stage reads image size, normalisation and the
decision threshold from the checkpoint (see docs/design.md), through the helpers below.
"""

import argparse
import csv
import datetime
import functools
import io
import itertools
import json
import os
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.special
import torch
import torchvision
from PIL import Image, ImageFile, ImageOps
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision import transforms
from tqdm import tqdm

from scoring import (
    ONNX_INPUT,
    ONNX_METADATA_KEY,
    CheckpointError,
    ImageError,
    UserError,
    class_activation_maps,
    file_sha256,
    model_input,
)

# --- labels and the prepared-tree file convention ------------------------------------------

MELANOMA, NON_MELANOMA = 1, 0
CLASS_NAMES = ("Non-Melanoma", "Melanoma")  # index = label
FILE_PREFIX = {MELANOMA: "mel_", NON_MELANOMA: "nomel_"}
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


def label_from_filename(name):
    """1 for `mel_*`, 0 for `nomel_*`, None for any other file."""
    name = os.path.basename(name)
    if not name.lower().endswith(IMAGE_SUFFIXES):
        return None
    if name.startswith(FILE_PREFIX[MELANOMA]):
        return MELANOMA
    if name.startswith(FILE_PREFIX[NON_MELANOMA]):
        return NON_MELANOMA
    return None


def prepared_filename(label, image_id, augmented_index=None, suffix=".jpg"):
    """`mel_ISIC_1.jpg`, `nomel_ISIC_2.jpg`, or `mel_aug_ISIC_1_3.jpg` for an augmented copy."""
    if augmented_index is None:
        return f"{FILE_PREFIX[label]}{image_id}{suffix}"
    return f"{FILE_PREFIX[label]}aug_{image_id}_{augmented_index}{suffix}"


def is_augmented_filename(name):
    return os.path.basename(name).startswith(tuple(f"{p}aug_" for p in FILE_PREFIX.values()))


# --- the prepared tree's manifest.csv (written by prepdata.py, read by analysis.py) ---------

SPLITS = ("train", "val", "test")
MANIFEST_FILE = "manifest.csv"


class ManifestRow(NamedTuple):
    """One written image: where it is, its label, the image it came from, and that image's lesion."""

    split: str
    file: str
    label: int
    source_image: str
    lesion_id: str | None
    augmented: bool


MANIFEST_COLUMNS = ManifestRow._fields


def write_manifest(path, rows):
    """manifest.csv: the rows in split order (train, val, test), by file name within a split;
    labels as 1/0, an unknown lesion as an empty field, augmented as yes/no."""
    order = {split: index for index, split in enumerate(SPLITS)}
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for row in sorted(rows, key=lambda row: (order[row.split], row.file)):
            augmented = "yes" if row.augmented else "no"
            writer.writerow(row._replace(lesion_id=row.lesion_id or "", augmented=augmented))


def read_manifest(path):
    """The ManifestRows of a manifest.csv (an unknown lesion comes back as '')."""
    try:
        with open(path, newline="", encoding="utf-8") as file:
            return [parsed_manifest_row(row) for row in csv.DictReader(file)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{path}: not a readable manifest ({error})") from None
    except (KeyError, ValueError) as error:
        raise UserError(
            f"{path}: expected columns {','.join(MANIFEST_COLUMNS)} with label 1/0 and augmented "
            f"yes/no ({error})"
        ) from None


def parsed_manifest_row(row):
    return ManifestRow(
        split=row["split"],
        file=row["file"],
        label={"1": MELANOMA, "0": NON_MELANOMA}[row["label"]],
        source_image=row["source_image"],
        lesion_id=row["lesion_id"],
        augmented={"yes": True, "no": False}[row["augmented"]],
    )


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


def eval_transform(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The one deterministic transform used to score images (validation, analysis, the app)."""
    return transforms.Compose(
        [
            transforms.Resize((image_size, image_size), antialias=True),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def checkpoint_transform(meta):
    return eval_transform(meta["image_size"], meta["mean"], meta["std"])


def list_prepared_images(folder):
    """Sorted (path, label) pairs of the `mel_`/`nomel_` images directly inside `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    pairs = []
    for path in sorted(folder.iterdir()):
        label = label_from_filename(path.name)
        if label is not None and path.is_file():
            pairs.append((path, label))
    return pairs


class SkinLesionDataset(torch.utils.data.Dataset):
    """Any folder of `mel_*` / `nomel_*` images; the class is the file-name prefix."""

    def __init__(self, folder, transform):
        self.samples = list_prepared_images(folder)
        if not self.samples:
            raise UserError(f"{folder}: no mel_*/nomel_* images in this folder")
        self.transform = transform

    @property
    def labels(self):
        return [label for _, label in self.samples]

    @property
    def paths(self):
        return [path for path, _ in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return self.transform(load_image(path)), label


class ScoringDataset(SkinLesionDataset):
    """A folder of `mel_`/`nomel_` images scored as the app scores an upload: the checkpoint's
    transform, plus each image's `image_facts` (as a tensor in IMAGE_FACTS order)."""

    def __init__(self, folder, meta, originals_only=False):
        super().__init__(folder, checkpoint_transform(meta))
        if originals_only:  # augmented copies are not images the model will ever be shown
            self.samples = [sample for sample in self.samples if not is_augmented_filename(sample[0])]
        self.image_size = meta["image_size"]

    def __getitem__(self, index):
        path, label = self.samples[index]
        image = load_image(path, min_size=self.image_size)  # decoded as the app decodes an upload
        facts = image_facts(image, self.image_size)
        return self.transform(image), torch.tensor([facts[name] for name in IMAGE_FACTS]), label


# --- the model -------------------------------------------------------------------------------


class WeightsUnavailable(UserError):
    pass


class SkinLesionModel(nn.Module):
    """torchvision EfficientNetV2-S with a two-class head (the dropout before it is kept).

    The backbone sits in the attribute `efficientnet`, as in the original project, so its
    bare state_dicts still load (see `load_checkpoint`).
    """

    def __init__(self, weights="none", dropout=0.2):
        super().__init__()
        self.efficientnet = torchvision.models.efficientnet_v2_s()
        if weights != "none":
            self.efficientnet.load_state_dict(imagenet_state_dict(weights))
        in_features = self.efficientnet.classifier[1].in_features
        self.efficientnet.classifier = nn.Sequential(
            nn.Dropout(p=dropout, inplace=True), nn.Linear(in_features, len(CLASS_NAMES))
        )

    def forward(self, x):
        return self.efficientnet(x)


def imagenet_state_dict(weights):
    """ImageNet weights for the backbone: 'imagenet' (torchvision cache or download) or a file."""
    if weights == "imagenet":
        source = torchvision.models.EfficientNet_V2_S_Weights.IMAGENET1K_V1
        try:
            return source.get_state_dict(progress=False, check_hash=True)
        except Exception as error:  # urllib, socket and hash errors all mean "not available"
            hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(source.url).name
            raise WeightsUnavailable(
                f"ImageNet weights are not in the cache and could not be downloaded ({error}); "
                f"place {source.url} at {hub}, pass --weights PATH, or train from scratch "
                f"with --weights none"
            ) from None
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailable(f"{path}: weights file not found (or use --weights imagenet|none)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsUnavailable(f"{path}: not a torchvision EfficientNetV2-S state_dict ({error})") from None


def model_for_inference(model, device):
    """Eval mode, on `device`, channels_last (faster convolutions on CPU and GPU)."""
    return model.to(device, memory_format=torch.channels_last).eval()


# --- devices and mixed precision -------------------------------------------------------------


def choose_device(name="auto"):
    """'auto' picks CUDA when present; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from None


def cpu_has_native_bf16():
    """AMX or AVX512-BF16: bf16 autocast is then much faster than fp32 on the CPU."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def choose_amp_dtype(device, amp="auto"):
    """The autocast dtype for `--amp auto|bf16|fp16|off`; None means full fp32."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise UserError("--amp fp16 needs a CUDA GPU; on the CPU use --amp bf16 or off")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def autocast(device, amp_dtype):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def amp_name(amp_dtype):
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]


def fold_batch_norms(model):
    """Fold each eval-mode BatchNorm2d into the Conv2d just before it, in place (inference only).

    The same function with fewer operations: on 2 cores the 384-px forward pass went from about
    102 to 83 ms, and probabilities move by float rounding only. Returns the model."""
    for module in list(model.modules()):
        for (conv_name, conv), (norm_name, norm) in itertools.pairwise(list(module.named_children())):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(module, norm_name, nn.Identity())
    return model


def load_scoring_model(path, device="cpu"):
    """`load_checkpoint` with batch norms folded: the network analysis and the app both score.

    On CUDA it also turns TF32 off for the rest of the process: cuDNN's default TF32
    convolutions moved predict.py's probabilities by up to 0.0066 from the CPU's on the bundled
    sample (an H200, a random-weight network with real batch-norm statistics), and the stored
    threshold must mean the same on every device."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    model, meta = load_checkpoint(path, device)
    return fold_batch_norms(model), meta


def forward_with_stages(network, x):
    """(logits, each stage's output averaged over the image, the last stage's output) of a
    torchvision EfficientNet: the one forward pass that both torch scoring and the ONNX export run."""
    stage_means = []
    for stage in network.features:
        x = stage(x)
        stage_means.append(x.mean(dim=(2, 3)))
    logits = network.classifier(torch.flatten(network.avgpool(x), 1))
    return logits, stage_means, x


@torch.inference_mode()
def network_outputs(model, images, device):
    """(logits, stage means) of a normalised batch (N, 3, H, W), as float64 arrays.

    The stage means are each stage's output (`features[i]`) averaged over the image, one
    (N, channels) array per stage; the last one is what the classifier's linear layer reads.
    One forward pass gives the answer and what the out-of-distribution score reads. Always
    fp32: bf16 moved a trained checkpoint's probabilities by up to 0.011 on 1,604 HAM10000
    validation images (over the 0.01 rule), and every consumer must score alike for the stored
    threshold to mean the same thing everywhere.
    """
    logits, stage_means, _ = scoring_outputs(model, images, device)
    return logits, stage_means


@torch.inference_mode()
def scoring_outputs(model, images, device):
    """`network_outputs` plus the last stage's output (N, C, h, w) as float32, for the heat map."""
    network = getattr(model, "module", model).efficientnet
    x = images.to(device, non_blocking=True, memory_format=torch.channels_last)
    logits, stage_means, feature_maps = forward_with_stages(network, x)
    return (
        as_float64(logits),
        [as_float64(means) for means in stage_means],
        feature_maps.float().cpu().numpy(),
    )


class TorchNetwork:
    """A checkpoint scored by torch (`load_scoring_model`), answering as engine.OnnxEngine does:
    for a checkpoint without its exported network, or CUDA without ONNX Runtime's CUDA provider."""

    engine = "torch"

    def __init__(self, checkpoint_path, device="cpu", threads=None):
        if threads:
            torch.set_num_threads(threads)
        self.device = choose_device(device)
        self.model, self.meta = load_scoring_model(checkpoint_path, self.device)
        self.classifier_weight = self.model.efficientnet.classifier[-1].weight.detach().cpu().numpy()
        self.threads = torch.get_num_threads()

    def batch(self, images):
        return np.stack([model_input(image, self.meta) for image in images])

    def outputs(self, batch):
        return scoring_outputs(self.model, torch.from_numpy(batch), self.device)

    def heatmaps(self, feature_maps, labels):
        return class_activation_maps(feature_maps, self.classifier_weight, labels, self.meta["image_size"])


def as_float64(tensor):
    return tensor.double().cpu().numpy()


def dihedral_views(images):
    """The 8 flips/rotations of a batch of square images: nothing is cropped or filled in."""
    for oriented in (images, images.flip(-1)):
        for quarter_turns in range(4):
            yield torch.rot90(oriented, quarter_turns, dims=(-2, -1))


@dataclass
class ScoredImages:
    """A scored folder, in dataset order: labels, logits, stage means (one array per stage, as
    `network_outputs` gives them), image facts."""

    labels: np.ndarray
    logits: np.ndarray
    stage_means: list
    facts: list


def score_dataset(model, dataset, device, batch_size=32, workers=0, tta=False, description="Scoring"):
    """Run a ScoringDataset through the network. With `tta`, the logits are the mean over the 8
    flips/rotations of each image; the stage means always come from the image as it is."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda"
    )
    parts = {"labels": [], "logits": [], "stage_means": [], "facts": []}
    with tqdm(
        total=len(dataset), unit="img", desc=description, disable=not show_progress(), leave=False
    ) as progress:
        for images, facts, labels in batches_with_readable_errors(loader):
            logits, stage_means = batch_outputs(model, images, device, tta)
            parts["labels"].append(labels.numpy())
            parts["logits"].append(logits)
            parts["stage_means"].append(stage_means)
            parts["facts"] += [dict(zip(IMAGE_FACTS, row.tolist(), strict=True)) for row in facts]
            progress.update(len(images))
    return ScoredImages(
        np.concatenate(parts["labels"]),
        np.concatenate(parts["logits"]),
        [np.concatenate(stage) for stage in zip(*parts["stage_means"], strict=True)],
        parts["facts"],
    )


def batch_outputs(model, images, device, tta=False):
    """`network_outputs` of a batch; with `tta`, the logits are the mean over its 8 views."""
    if not tta:
        return network_outputs(model, images, device)
    images = images.to(device, non_blocking=True)  # once, not once per view
    views = [network_outputs(model, view, device) for view in dihedral_views(images)]
    return np.mean([logits for logits, _ in views], axis=0), views[0][1]  # view 0: the image as it is


def batches_with_readable_errors(loader):
    """The loader's batches; an unreadable image stops the run with the image's one-line message.

    A DataLoader worker re-raises an ImageError with the worker's whole traceback as its message;
    the last line of that traceback is `common.ImageError: <the message>`.
    """
    try:
        yield from loader
    except ImageError as error:
        last_line = str(error).strip().splitlines()[-1]
        raise ImageError(last_line.removeprefix("common.ImageError: ")) from None


# --- from the network's outputs to the answer for one image ------------------------------------
# What scoring needs beyond the weights is fitted on the best checkpoint by model.py and stored
# in it (see `ScoringRules`); an older checkpoint has none of it, and every stage says so.


def melanoma_log_odds(logits):
    """log(p / (1 - p)) of the softmax melanoma probability p, computed without rounding to 0 or 1."""
    log_p = scipy.special.log_softmax(np.asarray(logits, dtype=np.float64), axis=1)
    others = scipy.special.logsumexp(np.delete(log_p, MELANOMA, axis=1), axis=1)
    return log_p[:, MELANOMA] - others


def melanoma_probability(logits, calibration=None):
    """The melanoma probability shown to people, from a batch of logits."""
    return shown_probability(melanoma_log_odds(logits), calibration)


def shown_probability(log_odds, calibration=None):
    """The one place a melanoma log-odds becomes the probability shown to people.

    With a calibration (Platt scaling, fitted on the validation split), the log-odds are scaled
    and shifted: the probability then means the chance of melanoma among images like the
    validation split's, at its melanoma share. The slope is positive, so the ranking (and with
    the threshold mapped alike, every decision) stays the same."""
    if calibration is not None:
        log_odds = calibration["slope"] * np.asarray(log_odds) + calibration["intercept"]
    return scipy.special.expit(log_odds)


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
    grey = np.asarray(image.convert("L").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)
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
        return melanoma_probability(logits, self.calibration)

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
    """A heat map mask ((H, W) floats in [0, 1]) laid over the decoded PIL image (its aspect kept, at most
    HEATMAP_MAX_SIDE a side), as the bytes of a PNG file."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    shown = image.copy()
    shown.thumbnail((HEATMAP_MAX_SIDE, HEATMAP_MAX_SIDE))
    # The model saw the image squeezed to a square: stretching the mask back undoes that.
    mask = np.asarray(Image.fromarray(mask).resize(shown.size, Image.Resampling.BILINEAR))
    overlay = show_cam_on_image(np.asarray(shown, dtype=np.float32) / 255, mask, use_rgb=True)
    png = io.BytesIO()
    Image.fromarray(overlay).save(png, format="PNG")
    return png.getvalue()


# --- checkpoints -----------------------------------------------------------------------------


def checkpoint_metadata(
    image_size=DEFAULT_IMAGE_SIZE,
    threshold=0.5,
    weights="none",
    epoch=None,
    val_metrics=None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    **extra,
):
    """The plain metadata stored beside the weights (DESIGN.md, "Checkpoint").

    `extra` adds further plain values (str, numbers, lists, dicts), e.g. the threshold rule.
    """
    return {
        "arch": ARCH,
        "class_names": list(CLASS_NAMES),
        "image_size": int(image_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "threshold": float(threshold),
        "weights": str(weights),
        "epoch": epoch,
        "val_metrics": dict(val_metrics or {}),
        "trained_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)},
        **extra,
    }


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


def atomic_torch_save(obj, path):
    """torch.save to a temporary file beside `path`, then rename: never a half-written file."""
    with atomic_output(path) as file:
        torch.save(obj, file)


def atomic_write_text(path, text):
    """Write a text file (JSON, CSV, a report) atomically, like `atomic_torch_save`."""
    with atomic_output(path, "w") as file:
        file.write(text)


def save_checkpoint(path, model, meta):
    """Write `best_model.pth`: the model's state_dict plus the metadata of `checkpoint_metadata`."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    atomic_torch_save({**meta, "model_state": state}, path)


def load_checkpoint(path, device="cpu"):
    """(model in eval mode on `device`, metadata) from a checkpoint or an original bare state_dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: checkpoint not found (train first with model.py, or pass --model PATH)"
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__})") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: not a checkpoint (expected a dict, found {type(saved).__name__})")
    if "model_state" in saved:
        meta = {key: value for key, value in saved.items() if key != "model_state"}
        state = saved["model_state"]
    else:
        meta = {
            **checkpoint_metadata(),
            "weights": "unknown (original project state_dict)",
            "trained_at": None,
        }
        state = original_state_dict_to_ours(saved)
    model = SkinLesionModel()
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise CheckpointError(
            f"{path}: weights do not fit EfficientNetV2-S with 2 classes ({first_line})"
        ) from None
    return model_for_inference(model, device), meta


def original_state_dict_to_ours(state):
    """The original head was a single Linear (`classifier.weight`); ours is Dropout + Linear."""
    renamed = {}
    for name, tensor in state.items():
        for part in ("weight", "bias"):
            if name == f"efficientnet.classifier.{part}":
                name = f"efficientnet.classifier.1.{part}"
        renamed[name] = tensor
    return renamed


# --- the serving engine's network: best_model.onnx ---------------------------------------------


class ScoringGraph(nn.Module):
    """The folded scoring network as the ONNX graph computes it: logits, every stage's mean over
    the image (what the out-of-distribution score reads), and the last stage's output (what the
    heat map is drawn from), all from one forward pass."""

    def __init__(self, model):
        super().__init__()
        self.network = getattr(model, "module", model).efficientnet

    def forward(self, images):
        logits, stage_means, last_feature_map = forward_with_stages(self.network, images)
        return logits, *stage_means, last_feature_map

    def output_names(self):
        return [
            "logits",
            *(f"stage_mean_{index}" for index in range(len(self.network.features))),
            "last_feature_map",
        ]


def onnx_path_beside(checkpoint_path):
    """Where the engine's network of a checkpoint lives: best_model.pth -> best_model.onnx."""
    return Path(checkpoint_path).with_suffix(".onnx")


def export_onnx(checkpoint_path, onnx_path):
    """Write the checkpoint's scoring network (`load_scoring_model`) as an ONNX graph, atomically:
    input `images` (N, 3, S, S) normalised, the batch dimension dynamic; outputs
    `ScoringGraph.output_names()`. The checkpoint's metadata, the classifier's weights (the heat
    map's channel weights) and the checkpoint file's SHA-256 go into the file's metadata_props."""
    model, meta = load_scoring_model(checkpoint_path)
    graph = ScoringGraph(model).eval()
    size = meta["image_size"]
    # The dynamo exporter (torch's default and recommended one); a batch of 2 as the example,
    # since torch.export specialises a dimension of size 1.
    program = torch.onnx.export(
        graph,
        (torch.zeros(2, 3, size, size),),
        input_names=[ONNX_INPUT],
        output_names=graph.output_names(),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    classifier = graph.network.classifier[-1]
    onnx_meta = {
        **meta,
        "classifier_weight": classifier.weight.detach().tolist(),
        "checkpoint_sha256": file_sha256(checkpoint_path),
    }
    proto = program.model_proto
    proto.metadata_props.add(key=ONNX_METADATA_KEY, value=json.dumps(onnx_meta, default=plain_value))
    with atomic_output(onnx_path) as file:
        file.write(proto.SerializeToString())
    return Path(onnx_path)


def plain_value(value):
    """A tensor or an array as nested lists, for json.dumps (the checkpoint stores tensors)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


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
