"""Stage 1: a label CSV and a folder of images in, a clean, balanced, leak-free prepared tree out.

    python prepdata.py            # GroundTruth.csv + images/ -> prepared_dataset/

Writes `prepared_dataset/{train,val,test}/` holding `mel_<id>.jpg` / `nomel_<id>.jpg` (plus
augmented `mel_aug_<id>_<k>.jpg` in train only) and `prepared_dataset/manifest.csv`. The split is
seeded, stratified by label and grouped by lesion; only the training split is balanced. The tree
is built in a hidden folder beside `--out` and renamed into place at the very end.
"""

import argparse
import hashlib
import multiprocessing
import os
import random
import secrets
import shutil
import signal
import sys
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, JpegImagePlugin
from tqdm import tqdm

import cli
import errors
import image_input
import label_csv
import lesion_labels
import prepared

# 4:3 dermoscopy images stored at 512x384 keep a 384-pixel short side: training at 384 pixels
# never upsamples, while every epoch decodes 27% fewer pixels than at 600x450 (and camera-sized
# photos become small files).
DEFAULT_MAX_SIDE = 512
# For sources that are not RGB JPEGs (PNG, TIFF, greyscale JPEG); JPEG sources keep their own
# quantisation tables so augmented copies compress like the originals they sit beside.
FALLBACK_JPEG_QUALITY = 95
# Reflection, never a constant (black) fill: black corners appear on real images only where the
# dermatoscope vignettes, so black-filled augmentations would teach "dark corners = melanoma".
REFLECT = cv2.BORDER_REFLECT_101


@dataclass(frozen=True)
class Record:
    image_id: str
    label: int
    lesion_id: str | None = None
    source: Path | None = None
    diagnosis: str = lesion_labels.UNKNOWN_DIAGNOSIS
    age: str = ""  # age, sex and body site as the metadata records them ('' when it does not)
    sex: str = ""
    localization: str = ""


class SplitFractions(argparse.Action):
    """--split TRAIN VAL TEST: three fractions, none negative, that sum to 1."""

    def __call__(self, parser, namespace, values, option_string=None):
        if any(value < 0 for value in values) or abs(sum(values) - 1) > 1e-6:
            shown = " ".join(map(str, values))
            raise argparse.ArgumentError(self, f"need three fractions >= 0 summing to 1, not {shown}")
        setattr(namespace, self.dest, values)


def get_args_parser():
    parser = cli.ArgumentParser(
        description="Prepare a split, balanced mel_/nomel_ image tree from a label CSV and an image folder.",
    )
    add = parser.add_argument
    add(
        "--csv",
        metavar="PATH",
        type=Path,
        default=Path("GroundTruth.csv"),
        help="labels: one-hot ground truth with a MEL column (ISIC 2018/2019, Kaggle HAM10000) "
        "or HAM10000 metadata with image_id and dx columns (default: GroundTruth.csv)",
    )
    add(
        "--images",
        metavar="FOLDER",
        type=Path,
        default=Path("images"),
        help="folder holding <image id>.jpg (or .png, ...) for each CSV row; never modified "
        "(default: images)",
    )
    add(
        "--metadata",
        metavar="PATH",
        type=Path,
        default=None,
        help="HAM10000-style metadata CSV with lesion_id and image_id, so that no lesion lands in "
        "two splits (default: HAM10000_metadata.csv or metadata.csv beside --csv, when present)",
    )
    add(
        "--out",
        metavar="FOLDER",
        type=Path,
        default=Path("prepared_dataset"),
        help="output folder (default: prepared_dataset)",
    )
    add("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    add(
        "--split",
        type=float,
        nargs=3,
        action=SplitFractions,
        default=(0.7, 0.2, 0.1),
        metavar=("TRAIN", "VAL", "TEST"),
        help="fractions of the images for train, val and test, summing to 1; zeros are allowed, "
        "e.g. 0 0 1 to score a new data set (default: 0.7 0.2 0.1)",
    )
    add(
        "--seed",
        metavar="N",
        type=cli.non_negative_int,
        default=42,
        help="seed of the split and of the augmentation (default: 42)",
    )
    balance = parser.add_mutually_exclusive_group()
    balance.add_argument(
        "--balance-ratio",
        metavar="RATIO",
        type=cli.positive_float,
        default=1.0,
        help="augment training melanomas until melanoma = RATIO x non-melanoma (default: 1.0)",
    )
    balance.add_argument(
        "--no-balance", action="store_true", help="write no augmented copies (train keeps its imbalance)"
    )
    add(
        "--max-side",
        metavar="N",
        type=cli.non_negative_int,
        default=DEFAULT_MAX_SIDE,
        help="shrink images whose longer side exceeds N pixels; 0 keeps every image at full size "
        f"(default: {DEFAULT_MAX_SIDE}, which keeps a 384-pixel short side on 4:3 images)",
    )
    add(
        "--workers",
        metavar="N",
        type=cli.positive_int,
        default=cli.available_cores(),
        help="processes that decode, augment and write images; 1 runs in this process "
        "(default: all cores, here %(default)s)",
    )
    return parser


@cli.exits_on_user_error
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    check_paths(args)
    try:
        prepare(args)
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} was left as it was", file=sys.stderr)
        sys.exit(130)


def prepare(args):
    records, lesions_known = read_records(args)
    # Resolved, so that a symlinked --out is rebuilt where it points (on that disk), link kept.
    out = args.out.resolve()
    temporary = sibling_folder(out, "partial")
    try:
        temporary.mkdir(parents=True)
    except OSError as error:
        raise errors.UserError(f"{args.out}: cannot create the output folder ({error.strerror})") from None
    try:
        records = stage_images(records, temporary / "staging", args)
        splits = split_records(records, args.split, args.seed)
        manifest = place_originals(splits, temporary)
        manifest += write_augmented_copies(splits["train"], temporary / "train", args)
        prepared.write_manifest(temporary / prepared.MANIFEST_FILE, manifest)
        move_into_place(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    print_summary(manifest, lesions_known)
    print(f"Wrote {len(manifest)} images and {prepared.MANIFEST_FILE} to {args.out}")


# --- checking the command line -----------------------------------------------------------------


def check_paths(args):
    if not args.csv.is_file():
        raise errors.UserError(f"{args.csv}: label CSV not found (pass --csv PATH)")
    if not args.images.is_dir():
        raise errors.UserError(f"{args.images}: images folder not found (pass --images FOLDER)")
    if args.metadata is not None and not args.metadata.is_file():
        raise errors.UserError(f"{args.metadata}: metadata CSV not found")
    if args.out.exists() and not args.out.is_dir():
        raise errors.UserError(f"{args.out}: exists and is not a folder")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        raise errors.UserError(f"{args.out}: folder exists and is not empty (pass --overwrite to replace it)")
    out = args.out.resolve()
    for source in (args.csv, args.images, args.metadata):
        if source is not None and overlaps(out, source.resolve()):
            raise errors.UserError(f"--out {args.out} overlaps the input {source}; choose another --out")


def overlaps(a, b):
    return a == b or a in b.parents or b in a.parents


# --- reading labels and lesion ids ------------------------------------------------------------


def read_records(args):
    """The labelled images that have a file (with their lesion ids), and whether lesions are known."""
    columns, rows = label_csv.read_csv_rows(args.csv)
    labels = label_csv.unique_labels(label_csv.labelled_rows(args.csv, columns, rows))
    lesions = label_csv.lesion_ids(args, columns, rows)
    diagnoses = label_csv.diagnoses_of(args, columns, rows)
    facts = label_csv.recorded_facts(args, columns, rows)
    files = find_image_files(args.images)
    missing = sorted(image_id for image_id in labels if image_id not in files)
    label_csv.report_ids(
        "Missing images", missing, f"of {len(labels)} in {args.csv.name} not in {args.images}: skipped"
    )
    records = [
        Record(
            image_id,
            label,
            lesions.get(image_id),
            files[image_id],
            lesion_labels.diagnosis_for(label, diagnoses.get(image_id)),
            **facts.get(image_id, {}),
        )
        for image_id, label in sorted(labels.items())
        if image_id in files
    ]
    if not records:
        raise errors.UserError(
            f"none of the {len(labels)} images of {args.csv} is in {args.images} "
            "(looked for <image>.jpg, <image>.png, ...)"
        )
    unlabelled = len(files.keys() - labels.keys())
    if unlabelled:
        print(f"Ignored {unlabelled} image(s) in {args.images} that {args.csv.name} does not label.")
    if lesions:
        label_csv.report_ids(
            "No lesion id",
            [record.image_id for record in records if not record.lesion_id],
            "image(s): each is a group of its own",
        )
    return records, bool(lesions)


def find_image_files(folder):
    """{file stem: path} of the image files directly inside `folder` (first suffix wins)."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in image_input.IMAGE_SUFFIXES and path.is_file():
            files.setdefault(path.stem, path)
    return files


# --- stage 1: decode every image once, shrink it, keep it in a staging folder -----------------


def stage_images(records, staging, args):
    """Decode each image fully (so corrupt and truncated files are caught), write it to `staging`
    at most --max-side pixels, and return the records whose image could be read."""
    staging.mkdir()
    tasks = [(record.source, staging / f"{record.image_id}.jpg", args.max_side) for record in records]
    read_errors = dict(run_in_parallel(stage_image, tasks, args.workers, "decode"))
    unreadable = sorted(error for error in read_errors.values() if error)
    if unreadable:
        print(f"Unreadable images: {len(unreadable)} skipped:")
        print("\n".join(f"  {error}" for error in unreadable))
    if len(unreadable) == len(records):
        raise errors.UserError(f"none of the {len(records)} images could be read (see the list above)")
    return [
        replace(record, source=staging / f"{record.image_id}.jpg")
        for record in records
        if not read_errors[record.source]
    ]


def stage_image(task):
    """(source, None) once written, or (source, the reason it cannot be read)."""
    source, target, max_side = task
    try:
        image = image_input.load_image(source, min_size=max_side or None)
    except errors.ImageError as error:
        return source, str(error)
    with Image.open(source) as header:
        fits = not max_side or max(header.size) <= max_side
        if fits and header.format == "JPEG":
            shutil.copyfile(source, target)  # already decoded above; no re-encoding loss
            return source, None
        options = jpeg_options(header)
    if max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    image.save(target, "JPEG", **options)
    return source, None


def jpeg_options(opened):
    """Save options that encode like `opened`: its quantisation tables and chroma subsampling
    for an RGB JPEG (so copies carry the same compression artefacts), else a high quality."""
    if opened.format == "JPEG" and opened.mode == "RGB":
        options = {"qtables": opened.quantization}
        sampling = JpegImagePlugin.get_sampling(opened)
        return options if sampling < 0 else {**options, "subsampling": sampling}
    return {"quality": FALLBACK_JPEG_QUALITY}


# --- the split ---------------------------------------------------------------------------------


def split_records(records, fractions, seed):
    """{split: records}, stratified by label and grouped by lesion (an image without a lesion id
    is a group of its own). Within each class the groups are ordered by a seeded hash and laid
    along [0, 1); a group goes to the split whose fraction interval holds its midpoint."""
    groups = defaultdict(list)
    for record in records:
        key = ("lesion", record.lesion_id) if record.lesion_id else ("image", record.image_id)
        groups[key].append(record)
    splits = {name: [] for name in prepared.SPLITS}
    for label in (lesion_labels.MELANOMA, lesion_labels.NON_MELANOMA):
        keys = [key for key, members in groups.items() if group_label(members) == label]
        keys.sort(key=lambda key: stable_hash(seed, *key))
        total = sum(len(groups[key]) for key in keys)
        done = 0
        for key in keys:
            size = len(groups[key])
            splits[split_at((done + size / 2) / total, fractions)].extend(groups[key])
            done += size
    return {name: sorted(members, key=lambda record: record.image_id) for name, members in splits.items()}


def group_label(members):
    """A lesion with any melanoma image counts as melanoma, for stratification."""
    return max(record.label for record in members)


def split_at(position, fractions):
    """The split whose share of [0, 1) holds `position`; float rounding at the very end falls
    into the last split that has a share."""
    upper_bounds = np.cumsum(fractions) / sum(fractions)
    for name, upper in zip(prepared.SPLITS, upper_bounds, strict=True):
        if position < upper:
            return name
    return [name for name, fraction in zip(prepared.SPLITS, fractions, strict=True) if fraction > 0][-1]


def stable_hash(*parts):
    """A 64-bit integer from `parts`, the same on every machine and Python version (unlike hash())."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


# --- writing the tree --------------------------------------------------------------------------


def place_originals(splits, tree):
    """Move each staged image to `<split>/<mel_|nomel_><id>.jpg`; their manifest rows."""
    manifest = []
    for name, records in splits.items():
        (tree / name).mkdir()
        for record in records:
            file = prepared.prepared_filename(record.label, record.image_id)
            os.rename(record.source, tree / name / file)
            manifest.append(manifest_row(name, file, record, augmented=False))
    (tree / "staging").rmdir()
    return manifest


def manifest_row(split, file, record, augmented):
    return prepared.ManifestRow(
        split,
        file,
        record.label,
        record.image_id,
        record.lesion_id,
        augmented,
        record.diagnosis,
        record.age,
        record.sex,
        record.localization,
    )


def write_augmented_copies(train, folder, args):
    """Augment training melanomas until melanoma = ratio x non-melanoma; their manifest rows."""
    melanomas = [record for record in train if record.label == lesion_labels.MELANOMA]
    non_melanoma = len(train) - len(melanomas)
    wanted = 0 if args.no_balance else round(args.balance_ratio * non_melanoma) - len(melanomas)
    if wanted <= 0:
        return []
    if not melanomas:
        print("Cannot balance: the training split holds no melanoma image to augment.")
        return []
    copies = {record.image_id: [] for record in melanomas}
    for number in range(wanted):  # round robin: every melanoma gets copies 0, 1, ... in turn
        copies[melanomas[number % len(melanomas)].image_id].append(number // len(melanomas))
    tasks, manifest = [], []
    for record in melanomas:
        files = {
            index: prepared.prepared_filename(record.label, record.image_id, index)
            for index in copies[record.image_id]
        }
        if files:
            source = folder / prepared.prepared_filename(record.label, record.image_id)
            tasks.append(
                (source, record.image_id, {index: folder / file for index, file in files.items()}, args.seed)
            )
            manifest += [manifest_row("train", file, record, augmented=True) for file in files.values()]
    for _ in run_in_parallel(augment_image, tasks, args.workers, "augment"):
        pass  # the workers write the files; only their completion matters here
    return manifest


def augment_image(task):
    """Write the augmented copies of one image. Each copy's randomness comes from (seed, image id,
    copy index) alone, so any number of workers in any order writes the same bytes."""
    source, image_id, targets, seed = task
    pixels = np.asarray(image_input.load_image(source))
    with Image.open(source) as header:
        options = jpeg_options(header)
    pipeline = augmentation(square=pixels.shape[0] == pixels.shape[1])
    for index, target in targets.items():
        copy_seed = stable_hash(seed, image_id, index)
        # One generator shared by all transforms; set_random_seed would give every transform
        # the same stream, so that e.g. both flips would always fire together.
        pipeline.set_random_state(np.random.default_rng(copy_seed), random.Random(copy_seed))
        Image.fromarray(pipeline(image=pixels)["image"]).save(target, "JPEG", **options)
    return source


@lru_cache(maxsize=2)
def augmentation(square):
    """The original project's augmentation set, in the albumentations 2.x API, with reflection
    fill. 90-degree turns only for square images: a turned 4:3 image would become the only
    portrait images in the set, another artefact real melanomas lack."""
    # Imported here, in the processes that augment: albumentations imports torch whenever it is
    # installed, and nothing else prepdata.py does needs it.
    import albumentations as A

    quarter_turns = [A.RandomRotate90(p=0.5)] if square else []
    return A.Compose(
        [
            *quarter_turns,
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Affine(
                translate_percent=(-0.0625, 0.0625),
                scale=(0.9, 1.1),
                rotate=(-45, 45),
                border_mode=REFLECT,
                p=0.5,
            ),
            A.OneOf(
                [
                    A.OpticalDistortion(distort_limit=0.1, border_mode=REFLECT),
                    A.GridDistortion(distort_limit=0.2, border_mode=REFLECT),
                    A.ElasticTransform(alpha=30, sigma=6, border_mode=REFLECT),
                ],
                p=0.3,
            ),
            A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=0.3),
            A.CLAHE(clip_limit=2.0, p=0.2),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.3),
        ]
    )


def move_into_place(temporary, out):
    """Swap the finished tree in with renames: `out` is either the old tree or the whole new one."""
    if out.exists():
        old = sibling_folder(out, "old")
        os.replace(out, old)
        os.replace(temporary, out)
        shutil.rmtree(old)
    else:
        os.replace(temporary, out)


def sibling_folder(out, purpose):
    """A hidden, unused name beside `out` (same file system, so renames are atomic)."""
    return out.parent / f".{out.name}.{purpose}-{secrets.token_hex(4)}"


# --- parallel work -----------------------------------------------------------------------------


def run_in_parallel(function, tasks, workers, description):
    """Yield function(task) for every task, in any order, with a progress bar (shown on a
    terminal only, so logs stay clean); workers == 1 runs in this process."""
    workers = max(1, min(workers, len(tasks)))
    if workers == 1:
        single_threaded_opencv()
    # Spawned, not forked: forking a process that already runs threads (torch's, a server's,
    # pytest's) can copy a held lock into the child and hang it.
    spawn = multiprocessing.get_context("spawn")
    pool = spawn.Pool(workers, initializer=start_worker) if workers > 1 else nullcontext()
    with (
        pool,
        tqdm(total=len(tasks), desc=description, unit="img", disable=not cli.show_progress()) as bar,
    ):
        # Small chunks keep the bar moving and the cores evenly loaded.
        chunk = max(1, min(16, len(tasks) // (workers * 8)))
        results = (
            pool.imap_unordered(function, tasks, chunksize=chunk) if workers > 1 else map(function, tasks)
        )
        for result in results:
            bar.update()
            yield result


def start_worker():
    # The main process handles Ctrl-C (it removes the partial tree); workers just stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    single_threaded_opencv()


def single_threaded_opencv():
    # Parallelism comes from processes; OpenCV threads on top of them only contend for cores.
    cv2.setNumThreads(1)


def print_summary(manifest, lesions_known):
    print(
        f"\n{'split':<6} {'images':>7} {'lesions':>8} {'melanoma':>9} {'non-melanoma':>13} {'augmented':>10}"
    )
    for name in prepared.SPLITS:
        rows = [row for row in manifest if row.split == name]
        originals = [row for row in rows if not row.augmented]
        lesions = len({row.lesion_id or row.source_image for row in originals}) if lesions_known else "-"
        melanoma = sum(row.label == lesion_labels.MELANOMA for row in rows)
        augmented = len(rows) - len(originals)
        print(
            f"{name:<6} {len(rows):>7} {lesions:>8} {melanoma:>9} {len(rows) - melanoma:>13} {augmented:>10}"
        )
    originals = Counter(row.diagnosis for row in manifest if row.split == "train" and not row.augmented)
    print(
        "Diagnoses of train/ (original images): "
        + ", ".join(f"{name} {count}" for name, count in sorted(originals.items()))
    )


if __name__ == "__main__":
    main()
