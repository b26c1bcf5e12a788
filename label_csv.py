"""The label files prepdata.py reads (DESIGN.md, "Input CSVs"): a one-hot ground truth (ISIC
2018 / Kaggle HAM10000, ISIC 2019) or HAM10000's metadata, and the metadata beside it for lesion
ids, diagnoses, age, sex and body site. Each problem found is reported in one line. Torch-free."""

import csv
import os
from collections import Counter, defaultdict

import errors
import image_input
import lesion_labels
import subgroups

METADATA_NAMES = ("HAM10000_metadata.csv", "metadata.csv")
SHOWN_NAMES = 5  # how many ids a report line lists before "..."
# Diagnosis columns of a one-hot ground truth: ISIC 2018 / Kaggle HAM10000 (akiec) and ISIC 2019
# (ak, scc, unk). Lower-case, as read_csv_rows gives the header.
ONE_HOT_DIAGNOSES = ("mel", "nv", "bcc", "akiec", "ak", "bkl", "df", "vasc", "scc", "unk")


def read_csv_rows(path):
    """(lower-case column names, [(line number, {column: stripped value})]).

    Tolerates a UTF-8 BOM, CRLF line ends, blank lines and spaces around names and values.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            lines = [
                (number, fields)
                for number, fields in enumerate(csv.reader(file), 1)
                if "".join(fields).strip()
            ]
    except (UnicodeDecodeError, csv.Error) as error:
        raise errors.UserError(f"{path}: not a readable CSV file ({error})") from None
    if not lines:
        raise errors.UserError(f"{path}: empty CSV file")
    if len(lines) == 1:
        raise errors.UserError(f"{path}: CSV has a header but no rows")
    columns = [name.strip().lower() for name in lines[0][1]]
    rows = [
        (number, {name: value.strip() for name, value in zip(columns, fields, strict=False)})
        for number, fields in lines[1:]
    ]
    return set(columns), rows


def labelled_rows(path, columns, rows):
    """[(image id, label)] from a one-hot ground truth (MEL) or HAM10000 metadata (dx)."""
    if {"image", "mel"} <= columns:
        labelled = [
            (line, row.get("image", ""), one_hot_label(row.get("mel", ""), path, line)) for line, row in rows
        ]
    elif {"image_id", "dx"} <= columns:
        labelled = [
            (line, row.get("image_id", ""), int(row.get("dx", "").lower() == "mel")) for line, row in rows
        ]
    else:
        raise errors.UserError(
            f"{path}: no label column (need image + MEL of a one-hot ground truth, or image_id + dx "
            f"of HAM10000 metadata); found: {', '.join(sorted(columns))}"
        )
    for line, image_id, _ in labelled:
        if not image_id:
            raise errors.UserError(f"{path} line {line}: no image id")
    return [(strip_image_suffix(image_id), label) for _, image_id, label in labelled]


def one_hot_label(value, path, line):
    try:
        number = float(value)
    except ValueError:
        number = None
    if number not in (0.0, 1.0):
        raise errors.UserError(f"{path} line {line}: MEL value {value!r} is not 0 or 1")
    return lesion_labels.MELANOMA if number == 1.0 else lesion_labels.NON_MELANOMA


def unique_labels(labelled):
    """{image id: label}; a repeated id is reported once, and dropped when its rows disagree."""
    found, rows_per_id = defaultdict(set), Counter()
    for image_id, label in labelled:
        found[image_id].add(label)
        rows_per_id[image_id] += 1
    repeated = sorted(image_id for image_id, count in rows_per_id.items() if count > 1)
    conflicting = sorted(image_id for image_id, labels in found.items() if len(labels) > 1)
    report_ids("Duplicate ids", repeated, "listed more than once: each is used once")
    report_ids("Conflicting labels", conflicting, "labelled both melanoma and not: skipped")
    return {image_id: labels.pop() for image_id, labels in found.items() if len(labels) == 1}


def strip_image_suffix(image_id):
    """Some CSVs write `ISIC_1.jpg` where others write `ISIC_1`."""
    stem, suffix = os.path.splitext(image_id)
    return stem if suffix.lower() in image_input.IMAGE_SUFFIXES else image_id


def lesion_ids(args, columns, rows):
    """{image id: lesion id} from --metadata, the label CSV itself, or a metadata file beside it."""
    path = args.metadata or (args.csv if "lesion_id" in columns else metadata_beside(args.csv))
    if path is None:
        print(
            f"No lesion ids: no {' or '.join(METADATA_NAMES)} beside {args.csv} (name one with --metadata). "
            "Images are split one by one, so images of one lesion may land in different splits."
        )
        return {}
    if path != args.csv:
        columns, rows = read_csv_rows(path)
    image_column = "image_id" if "image_id" in columns else "image"
    if not {"lesion_id", image_column} <= columns:
        raise errors.UserError(f"{path}: lesion ids need lesion_id and image_id (or image) columns")
    print(f"Lesion ids from {path}: all images of one lesion go to the same split.")
    return {
        strip_image_suffix(row[image_column]): row["lesion_id"]
        for _, row in rows
        if row.get("lesion_id") and row.get(image_column)
    }


def diagnoses_of(args, columns, rows):
    """{image id: diagnosis code} from the label CSV's one-hot columns or dx, else from the
    metadata's dx; {} when no source has them (every image's diagnosis is then 'unknown')."""
    one_hot = [name for name in ONE_HOT_DIAGNOSES if name in columns and name != "mel"]
    if one_hot:
        return {image_id(row): one_hot_diagnosis(row, ["mel", *one_hot]) for _, row in rows}
    if "dx" in columns:
        return {image_id(row): row.get("dx", "").lower() for _, row in rows}
    path = args.metadata or metadata_beside(args.csv)
    if path is None or path == args.csv:
        return {}
    columns, rows = read_csv_rows(path)
    return {image_id(row): row.get("dx", "").lower() for _, row in rows} if "dx" in columns else {}


def recorded_facts(args, columns, rows):
    """{image id: {age, sex, localization}} from the label CSV when it records them (HAM10000's
    metadata as --csv), else from the metadata file; {} when neither does."""
    path = args.csv
    if not subgroups.has_facts(columns):
        path = args.metadata or metadata_beside(args.csv)
        if path is None or path == args.csv:
            return {}
        columns, rows = read_csv_rows(path)
        if not subgroups.has_facts(columns):
            return {}
    facts = {}
    for line, row in rows:
        try:
            facts[image_id(row)] = subgroups.recorded_facts(row)
        except ValueError as error:
            raise errors.UserError(f"{path} line {line}: {error}") from None
    print(f"Age, sex and body site from {path}.")
    return facts


def image_id(row):
    return strip_image_suffix(row.get("image_id") or row.get("image", ""))


def one_hot_diagnosis(row, names):
    """The one column holding 1 (ISIC's 'unk' is an unknown diagnosis); none or several: unknown."""
    marked = [name for name in names if row.get(name, "") in ("1", "1.0")]
    return marked[0] if len(marked) == 1 and marked[0] != "unk" else lesion_labels.UNKNOWN_DIAGNOSIS


def metadata_beside(csv_path):
    found = [csv_path.parent / name for name in METADATA_NAMES if (csv_path.parent / name).is_file()]
    return found[0] if found else None


def report_ids(title, ids, explanation):
    if ids:
        shown = ", ".join(ids[:SHOWN_NAMES]) + (", ..." if len(ids) > SHOWN_NAMES else "")
        print(f"{title}: {len(ids)} {explanation} ({shown})")
