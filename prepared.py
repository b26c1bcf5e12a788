"""The prepared tree (DESIGN.md, "Prepared tree"): `{train,val,test}/` of `mel_*`/`nomel_*` images,
whose file-name prefix is their class, and `manifest.csv`, one row per written file. prepdata.py
writes it; training, analysis.py and the benchmarks read it. Torch-free."""

import csv
import os
from pathlib import Path
from typing import NamedTuple

from errors import UserError
from image_input import IMAGE_SUFFIXES
from lesion_labels import MELANOMA, NON_MELANOMA, UNKNOWN_DIAGNOSIS

SPLITS = ("train", "val", "test")
MANIFEST_FILE = "manifest.csv"
FILE_PREFIX = {MELANOMA: "mel_", NON_MELANOMA: "nomel_"}


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


# --- manifest.csv -----------------------------------------------------------------------


class ManifestRow(NamedTuple):
    """One written image: where it is, its label, the image it came from, that image's lesion, and
    what the metadata says about it (age in years, sex, body site; '' when not recorded)."""

    split: str
    file: str
    label: int
    source_image: str
    lesion_id: str | None
    augmented: bool
    diagnosis: str = UNKNOWN_DIAGNOSIS  # lower-case code (HAM10000's dx), for model.py --targets diagnosis
    age: str = ""
    sex: str = ""
    localization: str = ""


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
    """One row; a manifest written before diagnoses were recorded has none ('unknown'), one
    written before age, sex and body site were recorded has them as ''."""
    return ManifestRow(
        split=row["split"],
        file=row["file"],
        label={"1": MELANOMA, "0": NON_MELANOMA}[row["label"]],
        source_image=row["source_image"],
        lesion_id=row["lesion_id"],
        augmented={"yes": True, "no": False}[row["augmented"]],
        diagnosis=(row.get("diagnosis") or UNKNOWN_DIAGNOSIS).strip().lower(),
        age=(row.get("age") or "").strip(),
        sex=(row.get("sex") or "").strip().lower(),
        localization=(row.get("localization") or "").strip().lower(),
    )
