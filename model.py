"""Train the melanoma classifier: fine-tune EfficientNetV2-S on a prepared tree, then test it.

    python model.py --data prepared_dataset --out .
    torchrun --nproc_per_node=4 model.py --data prepared_dataset     # several GPUs, one machine

Writes into --out: `best_model.pth` (whenever validation improves), `last_checkpoint.pth` (each
epoch, everything `--resume` needs) and `training_history.json`; once training ends,
`best_model.onnx` (the same network for the serving engine); then scores the best checkpoint on
the test split at the decision threshold it stores (chosen on the validation split).
"""

import argparse
import copy
import functools
import json
import math
import os
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.special
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from sklearn.covariance import LedoitWolf
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import classification_report
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms
from tqdm import tqdm

import common
import metrics

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
    "targets": "melanoma",
    "ema_decay": 0.0,
    "progressive_from": 0,
    "time_budget": 0,
}

# Independent random streams derived from --seed (see `derived_seed`).
AUGMENTATION_STREAM, TRAINING_STREAM = 1, 2


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
    value = common.non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (0 turns the average off), not {text}")
    return value


def get_args_parser():
    parser = common.ArgumentParser(
        description="Fine-tune EfficientNetV2-S to tell melanoma from other lesions (model.py).",
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
    add("--epochs", type=common.positive_int, default=10, help="most epochs to train")
    add("--batch-size", type=common.positive_int, default=32, help="images per micro-batch (per process)")
    add("--accumulation-steps", type=common.positive_int, default=4, help="micro-batches per optimiser step")
    add(
        "--patience",
        type=common.positive_int,
        default=3,
        help="stop after this many epochs without improvement",
    )
    add("--image-size", type=common.positive_int, default=common.DEFAULT_IMAGE_SIZE, help="square input size")
    add("--lr", type=common.positive_float, default=3e-4, help="peak AdamW learning rate")
    add("--weight-decay", type=common.non_negative_float, default=0.05, help="AdamW weight decay")
    add(
        "--schedule",
        choices=("cosine", "plateau"),
        default="cosine",
        help="cosine: linear warm-up then cosine decay per step; plateau: x0.1 after 2 flat epochs",
    )
    add(
        "--warmup-epochs",
        type=common.non_negative_float,
        default=1.0,
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
        type=common.non_negative_int,
        default=0,
        metavar="PX",
        help="progressive resizing: train the first epoch at PX pixels, growing linearly (in steps "
        "of 16) to --image-size at the last epoch, with augmentation strength growing alike (0: off)",
    )
    add(
        "--time-budget",
        type=common.non_negative_float,
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
        type=common.fraction,
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
        type=common.non_negative_int,
        default=min(4, common.available_cores()),
        help="data-loading processes per training process (0 loads in the training process)",
    )
    add(
        "--seed",
        type=common.non_negative_int,
        default=42,
        help="seed of the initial head, data order, augmentation, dropout",
    )
    add("--resume", action="store_true", help=f"continue the run saved in OUT/{LAST_CHECKPOINT}")
    add(
        "--ood-flag-rate",
        type=common.fraction,
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
    """Parse twice when a preset is named: its values become the defaults, explicit flags win."""
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    return args


def explicit_settings(args, parser):
    """The settings whose value differs from its default, i.e. those given on the command line."""
    return {name: value for name, value in vars(args).items() if value != parser.get_default(name)}


def settings_for_resume(args, parser, saved):
    """The interrupted run's settings; this command line may change only CHANGEABLE_ON_RESUME."""
    merged = {**SETTINGS_BEFORE_THEY_EXISTED, **saved}
    for name, value in explicit_settings(args, parser).items():
        if name in CHANGEABLE_ON_RESUME:
            merged[name] = value
        elif saved.get(name) != value:
            flag = "--" + name.replace("_", "-")
            raise common.UserError(
                f"--resume keeps the interrupted run's settings, which had {flag} {saved.get(name)} "
                f"(not {value}); drop {flag} or start a new run in another --out"
            )
    return argparse.Namespace(**merged)


# --- processes, devices, seeds ---------------------------------------------------------------


@dataclass
class Runtime:
    """Where this process trains, and its place among torchrun's processes."""

    device: torch.device
    amp_dtype: torch.dtype | None
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self):
        return self.rank == 0

    def log(self, message):
        if self.is_main:
            print(message, flush=True)


def start_runtime(args):
    """Choose device and precision; join torchrun's process group when there is one."""
    device = common.choose_device(args.device)
    amp_dtype = common.choose_amp_dtype(device, args.amp)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    runtime = Runtime(device, amp_dtype, rank, world_size)
    if device.type == "cpu" and args.device == "auto":
        runtime.log("Note: no CUDA GPU found, training on the CPU (slow; see the README for GPUs).")
    runtime.log(
        f"Training on {device.type} in {common.amp_name(amp_dtype)}, {world_size} process(es), "
        f"{args.batch_size} x {args.accumulation_steps} accumulated images per step and process."
    )
    return runtime


def stop_runtime(runtime):
    if runtime.world_size > 1:
        dist.destroy_process_group()


def derived_seed(*numbers):
    """A well-mixed 63-bit seed from a tuple of non-negative integers."""
    return int(np.random.SeedSequence(numbers).generate_state(1, np.uint64)[0] >> 1)


# --- data --------------------------------------------------------------------------------------


class RandomQuarterTurn:
    """Rotate by a random multiple of 90 degrees: a lesion has no 'up', and a quarter turn of a
    square image neither cuts anything off nor fills corners with black."""

    TURNS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)

    def __call__(self, image):
        turn = self.TURNS[int(torch.randint(len(self.TURNS), ()))]
        return image if turn is None else image.transpose(turn)


@functools.lru_cache(maxsize=64)  # one per (size, strength) of a run: built once per worker
def train_transform(image_size, augmentation="ours", strength=1.0):
    """Online training augmentation; it adds nothing real images lack (no black-filled corners).

    Both start from the eval transform's square resize, so lesions keep the proportions they will
    have when scored. Ours leaves hue alone: colour (blue-white veil, red, brown) is a melanoma
    clue, and PIL's hue shift costs more than the rest of the augmentation together. Its
    `strength` in [0, 1] (progressive resizing: weak on small images, full at the final size, as
    EfficientNetV2's progressive learning does) takes the smallest crop from 80% to 50% of the
    image and the colour jitter from 0.1 to 0.2.
    """
    square = transforms.Resize((image_size, image_size), antialias=True)
    if augmentation == "original":
        geometry = [square]
        colour = transforms.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1)
    else:
        smallest_crop, jitter = 0.8 - 0.3 * strength, 0.1 + 0.1 * strength
        geometry = [
            square,
            transforms.RandomResizedCrop(image_size, scale=(smallest_crop, 1.0), antialias=True),
        ]
        colour = transforms.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter)
    return transforms.Compose(
        [
            *geometry,
            transforms.RandomHorizontalFlip(),
            RandomQuarterTurn(),  # with the flip: all 8 orientations of the square
            colour,
            transforms.ToTensor(),
            transforms.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD),
        ]
    )


class EpochTaggedSampler(DistributedSampler):
    """A DistributedSampler (with one process too) yielding (epoch, index) keys for
    `ReproducibleAugmentation`: persistent workers never see the epoch otherwise."""

    def __iter__(self):
        return ((self.epoch, index) for index in super().__iter__())


def epoch_image_size(args, epoch):
    """The training size of `epoch` (0-based): --image-size, or under --progressive-from a size
    growing linearly from that one at the first epoch to --image-size at the last, in steps of
    16 pixels (EfficientNetV2's progressive learning)."""
    if not args.progressive_from or args.epochs == 1 or epoch >= args.epochs - 1:
        return args.image_size
    share = epoch / (args.epochs - 1)
    size = args.progressive_from + share * (args.image_size - args.progressive_from)
    return max(16, 16 * round(size / 16))


def augmentation_strength(args, size):
    """1 at --image-size; under progressive resizing, from 0 at the first size up to 1."""
    if not args.progressive_from or args.progressive_from == args.image_size:
        return 1.0
    share = (size - args.progressive_from) / (args.image_size - args.progressive_from)
    return float(min(1.0, max(0.0, share)))


class ReproducibleAugmentation(Dataset):
    """train/'s images with their training targets, augmented for the epoch. Each image's random
    augmentation depends only on (seed, epoch, index), and its size (progressive resizing) only
    on the epoch: a resumed run, and any number of loader workers or processes, get the same
    augmented version of each image."""

    def __init__(self, images, targets, args):
        self.images, self.targets, self.args = images, targets, args

    @property
    def labels(self):
        return self.images.labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        epoch, index = key
        size = epoch_image_size(self.args, epoch)
        transform = train_transform(size, self.args.augmentation, augmentation_strength(self.args, size))
        with torch.random.fork_rng(devices=[]):  # leave the caller's random stream untouched
            torch.manual_seed(derived_seed(self.args.seed, AUGMENTATION_STREAM, epoch, index))
            return transform(common.load_image(self.images.paths[index])), self.targets[index]


def make_loader(dataset, args, runtime, sampler=None):
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=runtime.device.type == "cuda",
        persistent_workers=args.workers > 0,
    )


def train_loader(args, runtime, head):
    images = common.SkinLesionDataset(Path(args.data) / "train", transform=None)
    if len(set(images.labels)) < 2:
        raise common.UserError(f"{args.data}/train: needs both mel_ and nomel_ images to learn anything")
    # drop_last=False pads each process's share to the same length: DDP needs equal step counts.
    sampler = EpochTaggedSampler(images, runtime.world_size, runtime.rank, shuffle=True, seed=args.seed)
    dataset = ReproducibleAugmentation(images, head.targets(images.paths, images.labels), args)
    return make_loader(dataset, args, runtime, sampler)


# --- what the head learns: melanoma or not, or every diagnosis ------------------------------------


@dataclass
class Head:
    """The classifier's outputs: melanoma or not (`diagnoses` None), or one output per diagnosis
    of train/ (sorted codes, 'mel' among them); `by_file` maps each training file to its code."""

    diagnoses: list | None = None
    by_file: dict = field(default_factory=dict)

    @property
    def size(self):
        return len(self.diagnoses) if self.diagnoses else len(common.CLASS_NAMES)

    @property
    def melanoma(self):
        return common.melanoma_output({"diagnoses": self.diagnoses})

    @property
    def targets_name(self):
        return "diagnosis" if self.diagnoses else "melanoma"

    def targets(self, paths, labels):
        """Each training image's target: its label, or the index of its diagnosis."""
        if not self.diagnoses:
            return list(labels)
        return [
            self.diagnoses.index(self.diagnosis(path, label))
            for path, label in zip(paths, labels, strict=True)
        ]

    def diagnosis(self, path, label):
        """The file name decides melanoma, as in every stage (common.diagnosis_for)."""
        return common.diagnosis_for(label, self.by_file.get(Path(path).name))

    def metadata(self):
        return {"targets": self.targets_name, "diagnoses": self.diagnoses}


def choose_head(args, runtime):
    """The head --targets asks for, when manifest.csv records enough diagnoses for it: at least
    two other than melanoma among train/'s non-melanoma images (else a two-class head, with a
    notice). Images without a recorded diagnosis learn an 'unknown' output of their own."""
    if args.targets == "melanoma":
        return Head()
    manifest = Path(args.data) / common.MANIFEST_FILE
    by_file = {}
    if manifest.is_file():
        by_file = {row.file: row.diagnosis for row in common.read_manifest(manifest) if row.split == "train"}
    images = common.list_prepared_images(Path(args.data) / "train")
    head = Head(by_file=by_file)
    found = Counter(head.diagnosis(path, label) for path, label in images)
    others = set(found) - {common.MELANOMA_DIAGNOSIS, common.UNKNOWN_DIAGNOSIS}
    if len(others) < 2:
        source = f"{manifest} records" if manifest.is_file() else f"there is no {manifest}, so it records"
        runtime.log(
            f"Note: --targets diagnosis needs at least two diagnoses besides melanoma in train/, and "
            f"{source} {len(others)}: training melanoma against the rest (--targets melanoma)."
        )
        return Head()
    head.diagnoses = sorted(found)
    unknown = found.get(common.UNKNOWN_DIAGNOSIS, 0)
    runtime.log(
        f"Diagnosis head: {', '.join(f'{name} {found[name]}' for name in head.diagnoses)} training images"
        + (f" ({unknown} without a recorded diagnosis learn 'unknown')" if unknown else "")
        + "."
    )
    return head


def eval_loader(folder, args, runtime):
    """Deterministic loader of this process's share (no padding, so no image counts twice)."""
    images = common.SkinLesionDataset(folder, common.eval_transform(args.image_size))
    if runtime.world_size > 1:
        images = Subset(images, range(runtime.rank, len(images), runtime.world_size))
    return make_loader(images, args, runtime)


def check_data_folder(data):
    data = Path(data)
    if not data.is_dir():
        raise common.UserError(f"{data}: no such folder (run prepdata.py first, or pass --data)")
    for split in ("train", "val"):
        common.SkinLesionDataset(data / split, transform=None)  # a missing or empty split fails here


def has_test_split(data):
    return (Path(data) / "test").is_dir() and bool(common.list_prepared_images(Path(data) / "test"))


# --- scores ------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Per-image results of one pass over a split: true label, melanoma probability, loss."""

    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    probabilities: np.ndarray = field(default_factory=lambda: np.zeros(0))
    losses: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def add(self, labels, probabilities, losses):
        self.labels = np.concatenate([self.labels, np.asarray(labels, dtype=int)])
        self.probabilities = np.concatenate([self.probabilities, np.asarray(probabilities, dtype=float)])
        self.losses = np.concatenate([self.losses, np.asarray(losses, dtype=float)])

    def loss(self):
        return float(self.losses.mean())

    def accuracy_at_half(self):
        """Accuracy at probability 0.5, the training-time figure; the stored threshold is chosen
        only for the best epoch, and the checkpoint's val_metrics report accuracy there."""
        return metrics.accuracy(self.labels, self.probabilities, 0.5)

    def auc(self):
        return metrics.roc_auc(self.labels, self.probabilities)


def gather_scores(scores, runtime):
    """All processes' scores, in every process (so all of them take the same decisions)."""
    if runtime.world_size == 1:
        return scores
    parts = [None] * runtime.world_size
    dist.all_gather_object(parts, scores)
    gathered = Scores()
    for part in parts:
        gathered.add(part.labels, part.probabilities, part.losses)
    return gathered


def score_split(model, loader, device, melanoma, description="Scoring", show_progress=True):
    """Uncalibrated scores of a split (during training there is no calibration yet), in fp32;
    `melanoma` is the head's melanoma output."""
    model = getattr(model, "module", model).eval()  # the bare model: no DDP collectives while scoring
    scores = Scores()
    for images, labels in tqdm(loader, description, leave=False, disable=not show_progress):
        logits = common.network_outputs(model, images, device)[0]
        probabilities = common.melanoma_probability(logits, melanoma=melanoma)
        labels = labels.numpy()
        scores.add(labels, probabilities, metrics.cross_entropy(labels, probabilities))
    return scores


def choose_threshold(labels, probabilities, setting="auto", target_sensitivity=0.9):
    """(threshold, the rule in plain words), from validation scores only."""
    if setting != "auto":
        return float(setting), f"fixed at {setting:g}, not chosen on data (--threshold or --preset)"
    melanoma = np.sort(np.asarray(probabilities)[np.asarray(labels) == common.MELANOMA])[::-1]
    if not len(melanoma):
        return 0.5, "0.5, because the validation split has no melanoma to set a sensitivity target on"
    # The k-th highest melanoma score catches k melanomas; the tolerance absorbs 0.9 * 10 = 9.000001.
    needed = max(1, math.ceil(target_sensitivity * len(melanoma) - 1e-9))
    rule = f"the highest threshold with validation sensitivity >= {target_sensitivity:g}"
    return float(melanoma[needed - 1]), rule


# --- what scoring needs beyond the weights (fitted on the best checkpoint) ---------------------

MIN_IMAGES_TO_CALIBRATE = 10  # of each class in val/: fewer make Platt scaling a guess


def fit_calibration(labels, log_odds):
    """(Platt scaling of the melanoma log-odds fitted on validation, None) or (None, why not).

    The loss is class-weighted (a 50% melanoma prior), so the raw probability overstates
    melanoma at HAM10000's real share of about 11%; a slope and an intercept on the log-odds fix
    both the prior and over- or under-confidence. Isotonic regression is not used: its steps
    tie images that the network ranks apart, which changes the AUC."""
    counts = np.bincount(labels, minlength=len(common.CLASS_NAMES))
    if counts.min() < MIN_IMAGES_TO_CALIBRATE:
        return None, (
            f"not calibrated: val/ has {counts[common.MELANOMA]} melanomas and "
            f"{counts[common.NON_MELANOMA]} other lesions, and calibration needs "
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
        "melanoma_share": float(np.mean(labels == common.MELANOMA)),
        "rule": "Platt scaling of the melanoma log-odds, fitted on the validation split: the probability "
        "is the chance of melanoma at the validation split's melanoma share",
    }
    return calibration, None


# The stages whose mean output the out-of-distribution score reads (EfficientNetV2-S has 8).
# What tells a dermoscopic image from a photo of anything else is mostly colour and texture,
# which the early stages encode; the last stages of a network trained to tell melanoma from other
# lesions keep what separates those and squeeze everything else together. Measured on the quality
# benchmark's network (docs/trust.md): the last stage alone flagged 55% of non-lesion pictures,
# stages 1-3 together 96%, each at 5% of validation images.
OOD_STAGES = (1, 2, 3)


def fit_ood(train, val_stage_means, flag_rate, stages=OOD_STAGES):
    """What the out-of-distribution score needs (`common.ood_scores`): for each stage, the class
    means and the inverse of the shared covariance of the original training images' stage means,
    and the validation distance that `flag_rate` of validation images exceed (the stage's unit);
    then the threshold on the largest of those, again exceeded by `flag_rate` of validation."""
    fitted = [fit_ood_stage(stage, train, val_stage_means[stage], flag_rate) for stage in stages]
    scoring = {"stages": [common.as_arrays(stage) for stage in fitted]}
    threshold = float(np.quantile(common.ood_scores(val_stage_means, scoring), 1 - flag_rate))
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
    distances = common.mahalanobis_distances(val_means, class_means, precision)
    return {
        "stage": int(stage),
        "class_means": torch.tensor(class_means, dtype=torch.float32),
        "precision": torch.tensor(precision, dtype=torch.float32),
        "scale": float(np.quantile(distances, 1 - flag_rate)),
    }


def fit_quality_limits(facts):
    """Limits of the image-quality warnings: percentiles of the training images' statistics."""
    values = {name: np.array([image[name] for image in facts]) for name in common.QUALITY_STATISTICS}
    low, high = common.QUALITY_PERCENTILE, 100 - common.QUALITY_PERCENTILE
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
    weights, meta = common.load_checkpoint(best_path, device)
    model = common.fold_batch_norms(copy.deepcopy(weights))  # the network as the app runs it
    print(f"Fitting calibration, out-of-distribution score and quality limits for {best_path}.")
    data = Path(args.data)
    score = functools.partial(
        common.score_dataset, model, device=device, batch_size=args.batch_size, workers=args.workers
    )
    train = score(common.ScoringDataset(data / "train", meta, originals_only=True), description="Train")
    val = score(common.ScoringDataset(data / "val", meta), description="Validation")
    log_odds = common.melanoma_log_odds(val.logits, common.melanoma_output(meta))
    calibration, not_calibrated = fit_calibration(val.labels, log_odds)
    raw = common.shown_probability(log_odds)
    calibrated = common.shown_probability(log_odds, calibration)
    # The same rule on both scales picks the same validation image as the threshold, so the
    # calibrated threshold makes exactly the decisions the uncalibrated one makes.
    raw_threshold, rule = choose_threshold(val.labels, raw, args.threshold, args.target_sensitivity)
    threshold, _ = choose_threshold(val.labels, calibrated, args.threshold, args.target_sensitivity)
    if args.threshold != "auto" and calibration is not None:
        threshold = float(common.shown_probability(scipy.special.logit(raw_threshold), calibration))
    meta.update(
        threshold=threshold,
        threshold_rule=rule,
        threshold_uncalibrated=raw_threshold,
        calibration=calibration and {**calibration, **calibration_change(val.labels, raw, calibrated)},
        not_calibrated=not_calibrated,
        ood=fit_ood(train, val.stage_means, args.ood_flag_rate),
        quality=fit_quality_limits(train.facts),
    )
    common.save_checkpoint(best_path, weights, meta)
    print(describe_scoring_rules(meta, val.labels))
    onnx_path = common.export_onnx(best_path, common.onnx_path_beside(best_path))
    print(f"Serving engine's network written to {onnx_path}")
    return meta


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


def validation_metrics(scores, threshold):
    """The checkpoint's val_metrics: decisions at the stored threshold, ranking, loss."""
    _, at_threshold = metrics.metrics_at_threshold(scores.labels, scores.probabilities, threshold)
    return {
        "auc": scores.auc(),
        "loss": scores.loss(),
        **{name: at_threshold[name] for name in ("accuracy", "sensitivity", "specificity")},
    }


# --- training ----------------------------------------------------------------------------------


def accumulation_groups(num_samples, batch_size, accumulation_steps):
    """Images in each optimiser step's group of micro-batches; the epoch's last group may be short."""
    sizes = [min(batch_size, num_samples - start) for start in range(0, num_samples, batch_size)]
    return [sum(sizes[i : i + accumulation_steps]) for i in range(0, len(sizes), accumulation_steps)]


@dataclass
class Trainer:
    """One model's optimisation: accumulated steps, mixed precision, an optional per-step schedule,
    an optional moving average of the weights. `melanoma` is the head's melanoma output: the
    loader's targets are labels or diagnoses, and the scores are always melanoma or not."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    amp_dtype: torch.dtype | None = None
    accumulation_steps: int = 1
    class_weights: torch.Tensor | None = None
    step_scheduler: LambdaLR | None = None
    scaler: torch.amp.GradScaler = None
    memory_format: torch.memory_format = torch.channels_last  # faster convolutions on CPU and GPU
    melanoma: int = common.MELANOMA
    ema: AveragedModel | None = None

    def __post_init__(self):
        if self.scaler is None:
            # Only fp16 needs loss scaling; a disabled scaler passes everything straight through.
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def train_one_epoch(self, loader, description="Training", show_progress=True):
        """One pass over `loader`. Each micro-batch's summed loss is divided by the number of images
        in its accumulation group, so every step follows the mean loss of exactly the images it saw
        (batch 8 x 4 steps like batch 32 x 1), and a short last group is applied, not dropped."""
        self.model.train()
        groups = accumulation_groups(len(loader.sampler), loader.batch_size, self.accumulation_steps)
        scores = Scores()
        bar = tqdm(loader, description, disable=not show_progress)
        for index, (images, targets) in enumerate(bar):
            group = index // self.accumulation_steps
            ends_group = index + 1 == min((group + 1) * self.accumulation_steps, len(loader))
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            targets = targets.to(self.device, non_blocking=True)
            with self.gradient_sync(ends_group):
                with common.autocast(self.device, self.amp_dtype):
                    logits = self.model(images)
                losses = F.cross_entropy(logits.float(), targets, weight=self.class_weights, reduction="none")
                self.scaler.scale(losses.sum() / groups[group]).backward()
            if ends_group:
                self.step()
            probabilities = torch.softmax(logits.detach().float(), dim=1)[:, self.melanoma]
            labels = (targets == self.melanoma).long()
            scores.add(labels.cpu(), probabilities.cpu(), losses.detach().cpu())
            bar.set_postfix(
                loss=f"{scores.loss():.4f}", acc_at_half=f"{100 * scores.accuracy_at_half():.1f}%"
            )
        return scores

    def gradient_sync(self, ends_group):
        """DDP averages gradients across processes only on the micro-batch that ends a group."""
        if ends_group or not isinstance(self.model, DistributedDataParallel):
            return nullcontext()
        return self.model.no_sync()

    def step(self):
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.step_scheduler is not None:
            self.step_scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(getattr(self.model, "module", self.model))


def class_weights(labels, mode, device, head):
    """Inverse frequency of melanoma and non-melanoma in train/ ('balanced'), mean weight 1 over
    the images: a no-op on balanced training data. A diagnosis head gives every non-melanoma
    output the non-melanoma weight, so melanoma against the rest keeps the balance of a
    two-class head and the other diagnoses keep their natural shares among the rest."""
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=len(common.CLASS_NAMES))
    binary = len(labels) / (len(counts) * counts)
    weights = np.full(head.size, binary[common.NON_MELANOMA])
    weights[head.melanoma] = binary[common.MELANOMA]
    return torch.tensor(weights, dtype=torch.float32, device=device)


def weight_average(args, model):
    """The exponential moving average of the weights (--ema-decay), batch-norm statistics
    included, on the model's device; None when turned off."""
    if not args.ema_decay:
        return None
    model = getattr(model, "module", model)
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay), use_buffers=True)


def warmup_cosine(warmup_steps, total_steps):
    """LR factor per optimiser step: linear warm-up (a new random head must not wreck the
    pretrained backbone with large early steps), then cosine decay to 0 at the last epoch."""

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_model(args, runtime, resume_state, head):
    """The model on its device; under DDP only rank 0 loads pretrained weights (DDP copies them)."""
    torch.manual_seed(args.seed)  # the new head starts the same in every run with this seed
    weights = args.weights if runtime.is_main and resume_state is None else "none"
    model = common.SkinLesionModel(weights=weights, num_classes=head.size)
    if resume_state is not None:
        model.load_state_dict(resume_state["model_state"])
    model = model.to(runtime.device, memory_format=torch.channels_last)
    if runtime.world_size > 1:
        device_ids = [runtime.device] if runtime.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
    return model


def make_optimizer(parameters, device, lr, weight_decay):
    """AdamW, fused into one kernel on the devices torch fuses it for: on the 2-core AMD EPYC a
    step over EfficientNetV2-S's 21M parameters takes 14 ms fused against 46 ms (a few percent
    of a training step at 64 px; docs/measurements.md)."""
    fused = True if device.type in ("cpu", "cuda") else None
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused)


def build_trainer(args, runtime, model, loader, head):
    optimizer = make_optimizer(model.parameters(), runtime.device, args.lr, args.weight_decay)
    step_scheduler = None
    if args.schedule == "cosine":
        steps_per_epoch = len(
            accumulation_groups(len(loader.sampler), args.batch_size, args.accumulation_steps)
        )
        warmup_steps = max(1, round(args.warmup_epochs * steps_per_epoch))
        step_scheduler = LambdaLR(optimizer, warmup_cosine(warmup_steps, args.epochs * steps_per_epoch))
    labels = np.asarray(loader.dataset.labels)
    return Trainer(
        model,
        optimizer,
        runtime.device,
        runtime.amp_dtype,
        args.accumulation_steps,
        class_weights(labels, args.class_weights, runtime.device, head),
        step_scheduler,
        melanoma=head.melanoma,
        ema=weight_average(args, model),
    )


def plateau_scheduler(args, trainer, monitor):
    """The original's schedule: LR x0.1 once the monitored metric has not improved for 2 epochs."""
    if args.schedule != "plateau":
        return None
    return ReduceLROnPlateau(
        trainer.optimizer, mode="max" if monitor == "val_auc" else "min", factor=0.1, patience=2
    )


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
        "amp": common.amp_name(runtime.amp_dtype),
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
    threshold, rule = choose_threshold(
        val_scores.labels, val_scores.probabilities, args.threshold, args.target_sensitivity
    )
    meta = common.checkpoint_metadata(
        image_size=args.image_size,
        threshold=threshold,
        weights=args.weights,
        epoch=epoch,
        val_metrics=validation_metrics(val_scores, threshold),
        threshold_rule=rule,
        monitor=monitor,
        training_amp=common.amp_name(amp_dtype),
        settings=vars(args),
        saved_weights=selected,
        **head.metadata(),
    )
    common.save_checkpoint(out / BEST_CHECKPOINT, network, meta)


def save_last_checkpoint(path, args, trainer, plateau, progress):
    """Everything --resume needs. No RNG state: every random stream is re-derived from
    (seed, epoch, process, image), so the next epoch draws the same numbers either way."""
    model = getattr(trainer.model, "module", trainer.model)
    common.atomic_torch_save(
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
    if not path.is_file():
        raise common.UserError(f"{path}: nothing to resume (no last checkpoint in --out)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise common.UserError(f"{path}: not a readable last checkpoint ({type(error).__name__})") from None


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
    torch.manual_seed(derived_seed(args.seed, TRAINING_STREAM, epoch, runtime.rank))
    description = f"Epoch {epoch + 1}/{args.epochs}"
    show_progress = common.show_progress(runtime.is_main)  # without bars, summary_line still logs each epoch
    started = time.perf_counter()
    train = trainer.train_one_epoch(loaders["train"], description, show_progress)
    train_seconds = time.perf_counter() - started
    validate = functools.partial(
        score_split, loader=loaders["val"], device=runtime.device, melanoma=trainer.melanoma,
        show_progress=show_progress,
    )  # fmt: skip
    val = validate(trainer.model, description="Validating")
    ema_val = None if trainer.ema is None else validate(trainer.ema.module, description="Validating EMA")
    return (
        gather_scores(train, runtime),
        gather_scores(val, runtime),
        ema_val and gather_scores(ema_val, runtime),
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
    next_size = epoch_image_size(args, len(epochs))
    estimate = training * (next_size / last["image_size"]) ** 2 + last["seconds"] - training
    return spent + estimate > 60 * args.time_budget


def write_history(out, history):
    common.atomic_write_text(out / HISTORY_FILE, json.dumps(history, indent=2, allow_nan=False))


def train_model(args, runtime, resume_state=None):
    """The training loop: best checkpoint on improvement, last checkpoint every epoch, early stop,
    and a clean end before an epoch that would overrun --time-budget."""
    out = Path(args.out)
    head = choose_head(args, runtime)
    loaders = {
        "train": train_loader(args, runtime, head),
        "val": eval_loader(Path(args.data) / "val", args, runtime),
    }
    val_labels = [label for _, label in common.list_prepared_images(Path(args.data) / "val")]
    monitor = resolve_monitor(args, val_labels, runtime)
    model = build_model(args, runtime, resume_state, head)
    trainer = build_trainer(args, runtime, model, loaders["train"], head)
    plateau = plateau_scheduler(args, trainer, monitor)
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
        size = epoch_image_size(args, progress.epoch - 1)
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


# --- evaluation --------------------------------------------------------------------------------


def print_test_summary(scores, threshold):
    """The test split's figures, from the same functions (metrics.py) as analysis.py's report."""
    result = metrics.evaluate(scores.labels, scores.probabilities, threshold)
    predicted = metrics.predict_labels(scores.probabilities, threshold)
    print(f"Test Accuracy: {100 * result['accuracy']:.2f}% ({result['n_images']} images)")
    print("Classification Report:")
    print(
        classification_report(
            scores.labels, predicted, labels=[0, 1], target_names=list(common.CLASS_NAMES), zero_division=0
        )
    )
    print(f"ROC AUC: {with_interval(result['roc_auc'], result['confidence_intervals_95']['roc_auc'])}")
    for name in ("sensitivity", "specificity"):
        shown = with_interval(result[name], result["wilson_intervals_95"][name])
        print(f"{name.capitalize()} at threshold {threshold:.4f}: {shown}")
    print(f"Expected calibration error: {result['expected_calibration_error']:.4f}")
    return result


def with_interval(value, interval):
    if value is None:
        return "n/a (needs images of both classes)"
    return f"{value:.4f}" + ("" if interval is None else f" (95% CI {interval[0]:.3f} to {interval[1]:.3f})")


def evaluate_best_on_test(args, device, best_path):
    """Score test/ with the best checkpoint, loaded and scored as analysis.py and the app do."""
    if not has_test_split(args.data):
        print(f"Note: {args.data}/test has no images, so there is no test evaluation.")
        return None
    model, meta = common.load_scoring_model(best_path, device)
    print(
        f"Testing {best_path} (epoch {meta['epoch']}; threshold {meta['threshold']:.4f}, "
        f"{meta['threshold_rule']})."
    )
    test = common.score_dataset(
        model, common.ScoringDataset(Path(args.data) / "test", meta), device, args.batch_size, args.workers
    )
    rules = common.ScoringRules(meta)
    flagged = [not answer["reliable"] for answer in rules.answers(test.logits, test.stage_means, test.facts)]
    print(f"Flagged as not judgeable (out of distribution): {sum(flagged)} of {len(flagged)} test images.")
    scores = Scores(test.labels, rules.probabilities(test.logits), np.zeros(len(test.labels)))
    return print_test_summary(scores, meta["threshold"])


# --- main --------------------------------------------------------------------------------------


def describe_weights(weights):
    if weights == "none":
        return "random initialisation (--weights none): expect a much weaker model than with ImageNet weights"
    return f"{weights} (ImageNet-pretrained backbone, new head)"


def threshold_rule_of_training(args, parser, meta):
    """--fit-scoring-only keeps the threshold rule the checkpoint was trained with (a fixed 0.5
    of --preset original stays 0.5), unless this command line gives one."""
    trained = {
        name: value
        for name, value in meta.get("settings", {}).items()
        if name in ("threshold", "target_sensitivity") and name not in explicit_settings(args, parser)
    }
    return argparse.Namespace(**{**vars(args), **trained})


@common.exits_on_user_error
def main(argv=None):
    parser = get_args_parser()
    args = parse_args(parser, argv)
    resume_state = None
    if args.resume:
        resume_state = load_last_checkpoint(Path(args.out) / LAST_CHECKPOINT)
        args = settings_for_resume(args, parser, resume_state["args"])
    check_data_folder(args.data)
    if args.progressive_from > args.image_size:
        raise common.UserError(
            f"--progressive-from {args.progressive_from} is larger than --image-size {args.image_size}: "
            "progressive resizing grows the images up to the scoring size"
        )
    if args.fit_scoring_only:
        device = common.choose_device(args.device)
        best_path = Path(args.out) / BEST_CHECKPOINT
        _, meta = common.load_checkpoint(best_path)
        args = threshold_rule_of_training(args, parser, meta)
        fit_scoring_rules(best_path, args, device)
        evaluate_best_on_test(args, device, best_path)
        return
    runtime = start_runtime(args)
    try:
        runtime.log(f"Weights: {describe_weights(args.weights)}.")
        best_path = train_model(args, runtime, resume_state)
        if runtime.is_main:
            fit_scoring_rules(best_path, args, runtime.device)
            evaluate_best_on_test(args, runtime.device, best_path)
    except KeyboardInterrupt:
        print(f"Interrupted: continue with --resume --out {args.out}", file=sys.stderr)
        sys.exit(130)
    finally:
        stop_runtime(runtime)


if __name__ == "__main__":
    main()
