"""Training data: train/'s images with their targets (melanoma, or each diagnosis), the
reproducible online augmentation, progressive resizing, validation's deterministic loader, and
one-line errors for images a loader worker could not read."""

import functools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms

import lesion_labels
import prepared
import scoring
from backbones import IMAGENET_MEAN, IMAGENET_STD, backbone_named
from errors import ImageError, UserError
from image_input import load_image


def eval_transform(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The one deterministic transform used to score images (validation, analysis, the app)."""
    return transforms.Compose(
        [
            transforms.Resize((image_size, image_size), antialias=True),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


class SkinLesionDataset(torch.utils.data.Dataset):
    """Any folder of `mel_*` / `nomel_*` images; the class is the file-name prefix."""

    def __init__(self, folder, transform):
        self.samples = prepared.list_prepared_images(folder)
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


def batches_with_readable_errors(loader):
    """The loader's batches; an unreadable image stops the run with the image's one-line message.

    A DataLoader worker re-raises an ImageError with the worker's whole traceback as its message;
    the last line of that traceback is `<module>.<class>: <the message>`, the class's own name
    wherever it lives (images.py's subclasses too).
    """
    try:
        yield from loader
    except ImageError as error:
        last_line = str(error).strip().splitlines()[-1]
        raised_as = f"{type(error).__module__}.{type(error).__qualname__}: "
        raise type(error)(last_line.removeprefix(raised_as)) from None


# Independent random streams derived from --seed (see `derived_seed`).
AUGMENTATION_STREAM, TRAINING_STREAM = 1, 2


def derived_seed(*numbers):
    """A well-mixed 63-bit seed from a tuple of non-negative integers."""
    return int(np.random.SeedSequence(numbers).generate_state(1, np.uint64)[0] >> 1)


class RandomQuarterTurn:
    """Rotate by a random multiple of 90 degrees: a lesion has no 'up', and a quarter turn of a
    square image neither cuts anything off nor fills corners with black."""

    TURNS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)

    def __call__(self, image):
        turn = self.TURNS[int(torch.randint(len(self.TURNS), ()))]
        return image if turn is None else image.transpose(turn)


@functools.lru_cache(maxsize=64)  # one per (size, strength) of a run: built once per worker
def train_transform(image_size, augmentation="ours", strength=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Online training augmentation; it adds nothing real images lack (no black-filled corners).

    Both start from the eval transform's square resize, so lesions keep the proportions they will
    have when scored. Ours leaves hue alone: colour (blue-white veil, red, brown) is a melanoma
    clue, and PIL's hue shift costs more than the rest of the augmentation together. Its
    `strength` in [0, 1] (progressive resizing: weak on small images, full at the final size, as
    EfficientNetV2's progressive learning does) takes the smallest crop from 80% to 50% of the
    image and the colour jitter from 0.1 to 0.2. `mean` and `std` are the backbone's.
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
            transforms.Normalize(mean, std),
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
        backbone = backbone_named(self.args.arch)
        strength = augmentation_strength(self.args, size)
        transform = train_transform(size, self.args.augmentation, strength, backbone.mean, backbone.std)
        with torch.random.fork_rng(devices=[]):  # leave the caller's random stream untouched
            torch.manual_seed(derived_seed(self.args.seed, AUGMENTATION_STREAM, epoch, index))
            return transform(load_image(self.images.paths[index])), self.targets[index]


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
    images = SkinLesionDataset(Path(args.data) / "train", transform=None)
    if len(set(images.labels)) < 2:
        raise UserError(f"{args.data}/train: needs both mel_ and nomel_ images to learn anything")
    # drop_last=False pads each process's share to the same length: DDP needs equal step counts.
    sampler = EpochTaggedSampler(images, runtime.world_size, runtime.rank, shuffle=True, seed=args.seed)
    dataset = ReproducibleAugmentation(images, head.targets(images.paths, images.labels), args)
    return make_loader(dataset, args, runtime, sampler)


@dataclass
class Head:
    """The classifier's outputs: melanoma or not (`diagnoses` None), or one output per diagnosis
    of train/ (sorted codes, 'mel' among them); `by_file` maps each training file to its code."""

    diagnoses: list | None = None
    by_file: dict = field(default_factory=dict)

    @property
    def size(self):
        return len(self.diagnoses) if self.diagnoses else len(lesion_labels.CLASS_NAMES)

    @property
    def melanoma_index(self):
        return scoring.melanoma_output({"diagnoses": self.diagnoses})

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
        """The file name decides melanoma, as in every stage (lesion_labels.diagnosis_for)."""
        return lesion_labels.diagnosis_for(label, self.by_file.get(Path(path).name))

    def metadata(self):
        return {"targets": self.targets_name, "diagnoses": self.diagnoses}


def choose_head(args, runtime):
    """The head --targets asks for, when manifest.csv records enough diagnoses for it: at least
    two other than melanoma among train/'s non-melanoma images (else a two-class head, with a
    notice). Images without a recorded diagnosis learn an 'unknown' output of their own."""
    if args.targets == "melanoma":
        return Head()
    manifest = Path(args.data) / prepared.MANIFEST_FILE
    by_file = {}
    if manifest.is_file():
        by_file = {
            row.file: row.diagnosis for row in prepared.read_manifest(manifest) if row.split == "train"
        }
    images = prepared.list_prepared_images(Path(args.data) / "train")
    head = Head(by_file=by_file)
    found = Counter(head.diagnosis(path, label) for path, label in images)
    others = set(found) - {lesion_labels.MELANOMA_DIAGNOSIS, lesion_labels.UNKNOWN_DIAGNOSIS}
    if len(others) < 2:
        source = f"{manifest} records" if manifest.is_file() else f"there is no {manifest}, so it records"
        runtime.log(
            f"Note: --targets diagnosis needs at least two diagnoses besides melanoma in train/, and "
            f"{source} {len(others)}: training melanoma against the rest (--targets melanoma)."
        )
        return Head()
    head.diagnoses = sorted(found)
    unknown = found.get(lesion_labels.UNKNOWN_DIAGNOSIS, 0)
    runtime.log(
        f"Diagnosis head: {', '.join(f'{name} {found[name]}' for name in head.diagnoses)} training images"
        + (f" ({unknown} without a recorded diagnosis learn 'unknown')" if unknown else "")
        + "."
    )
    return head


def eval_loader(folder, args, runtime):
    """Deterministic loader of this process's share (no padding, so no image counts twice)."""
    backbone = backbone_named(args.arch)
    images = SkinLesionDataset(folder, eval_transform(args.image_size, backbone.mean, backbone.std))
    if runtime.world_size > 1:
        images = Subset(images, range(runtime.rank, len(images), runtime.world_size))
    return make_loader(images, args, runtime)


def check_data_folder(data):
    """A prepared tree with images in train/ and val/ (test/ may be empty), or a one-line error."""
    data = Path(data)
    if not data.is_dir():
        raise UserError(f"{data}: no such folder (run prepdata.py first, or pass --data)")
    for split in ("train", "val"):
        SkinLesionDataset(data / split, transform=None)  # a missing or empty split fails here
