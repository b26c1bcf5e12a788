"""Score new, unlabelled images with best_model.pth, exactly as app.py answers an upload.

    python predict.py lesion.jpg photos/ --out predictions.csv

One row per image: the calibrated melanoma probability, the label at the checkpoint's threshold,
whether the model can judge the image, and quality warnings. A file that cannot be scored gets a
row with the reason, and the run goes on. Research tool, not a diagnosis.
"""

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

import cli
import engine
import errors
import files
import heatmaps
import image_input
import lesion_labels
import onnx_file
import scoring

FORMATS = ("csv", "json", "jsonl")
# The fields of the app's answer for one image (scoring.ScoringRules.answers), in output order.
ANSWER_COLUMNS = (
    "probability",
    "label",
    "threshold",
    "calibrated",
    "reliable",
    "reasons",
    "ood_score",
    "ood_threshold",
    "warnings",
)
COLUMNS = ("file", *ANSWER_COLUMNS, "error")
LIST_SEPARATOR = "; "  # between a CSV cell's reasons or warnings (their texts hold commas)

EXIT_CODES = """exit codes:
  0  every image was scored
  1  some file could not be scored: its row says why (column `error`); the others were scored
  2  bad usage: a missing path, a folder without images, a missing or unreadable model;
     one line on stderr and nothing written
"""


def get_args_parser():
    parser = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "paths",
        nargs="*",
        metavar="IMAGE_OR_FOLDER",
        help="image files, and folders whose images (searched in subfolders too) are scored",
    )
    add(
        "--model",
        metavar="PATH",
        default="best_model.pth",
        help="checkpoint written by model.py, or its .onnx file; a checkpoint with the .onnx exported "
        "from it beside it is scored by ONNX Runtime (default: %(default)s)",
    )
    add(
        "--export",
        action="store_true",
        help="only export --model (a checkpoint, or the original project's state_dict) as the "
        "serving engine's network, the .onnx file beside it, and exit (no IMAGE_OR_FOLDER)",
    )
    add(
        "--out",
        metavar="PATH",
        default=None,
        help="where to write the predictions, written whole or not at all; - for standard output "
        "(default: predictions.csv, .json or .jsonl after --format)",
    )
    add(
        "--format",
        choices=FORMATS,
        default="csv",
        help="csv, json (one array) or jsonl (one object a line) (default: %(default)s)",
    )
    add(
        "--heatmaps",
        metavar="DIR",
        default=None,
        help="also write each scored image's heat map there, as the app draws it with ?explain=1 "
        "(NAME_heatmap.png; adds the column `heatmap`)",
    )
    add(
        "--batch-size",
        metavar="N",
        type=cli.positive_int,
        default=32,
        help="images per batch (default: %(default)s)",
    )
    add(
        "--workers",
        metavar="N",
        type=cli.non_negative_int,
        default=min(4, cli.available_cores()),
        help="image-decoding worker processes; 0 decodes in the main process "
        "(default: one per usable core, at most 4)",
    )
    add(
        "--device",
        metavar="NAME",
        default="auto",
        help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)",
    )
    return parser


# --- the files to score ----------------------------------------------------------------------


def image_files(paths):
    """The files to score, in order: each file as given, and each folder's images in sorted order."""
    files = []
    for path in paths:
        if Path(path).is_dir():
            files += folder_images(path)
        elif Path(path).is_file():
            files.append(path)
        elif Path(path).exists():
            raise errors.UserError(f"{path}: not a file or a folder")
        else:
            raise errors.UserError(f"{path}: no such file or folder")
    return files


def folder_images(folder):
    """The images below `folder`, found by their file-name endings (image_input.IMAGE_SUFFIXES, any
    case), sorted; hidden files and folders are skipped (such as the `._NAME.jpg` files macOS
    leaves beside copied images, which are not images). None is a user error."""
    images = []
    for path in sorted(Path(folder).rglob("*")):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if path.suffix.lower() in image_input.IMAGE_SUFFIXES and not hidden and path.is_file():
            images.append(str(path))
    if not images:
        endings = ", ".join(image_input.IMAGE_SUFFIXES)
        raise errors.UserError(f"{folder}: no images in this folder or below it (looked for {endings})")
    return images


def heatmap_destinations(files, folder):
    """Where each file's heat map goes: FOLDER/NAME_heatmap.png after the file's name without its
    ending, numbered (NAME-2_heatmap.png, ...) when files share a name."""
    folder = Path(folder)
    taken = set()
    destinations = []
    for file in files:
        stem = Path(file).stem
        name, number = f"{stem}_heatmap.png", 1
        while name.lower() in taken:  # lower case: on some file systems A.png is a.png
            number += 1
            name = f"{stem}-{number}_heatmap.png"
        taken.add(name.lower())
        destinations.append(folder / name)
    return destinations


def make_folder(folder):
    """Create the --heatmaps folder (and its parents) if need be, before the scoring starts."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise errors.UserError(
            f"{folder}: cannot make this folder for the heat maps ({error.strerror})"
        ) from None


# --- scoring ---------------------------------------------------------------------------------


def score_files(files, network, batch_size=32, workers=0, heatmaps=None):
    """The row of each file, in order: the app's answer for it, or the reason it was not scored.

    `heatmaps`: one destination per file (heatmap_destinations); each scored image's heat map
    is written there, and its row says where."""
    rules = scoring.ScoringRules(network.meta)
    image_files = engine.ImageFiles(files, network.meta, keep_images=heatmaps is not None)
    rows = []
    with tqdm(
        total=len(files), unit="img", desc="Scoring", disable=not cli.show_progress(), leave=False
    ) as progress:
        for images, items in engine.decoded_batches(image_files, batch_size, workers):
            answers = score_batch(network, rules, images, items, heatmaps)
            for item in items:
                row = file_row(files[item.index], answers.get(item.index), item.error)
                if heatmaps is not None:
                    row["heatmap"] = str(heatmaps[item.index]) if item.index in answers else None
                rows.append(row)
            progress.update(len(items))
    return rows


def score_batch(network, rules, images, items, heatmaps=None):
    """{index in the list of files: the app's answer} for each image of the batch that decoded;
    with `heatmaps`, their heat maps (from the same forward pass) are written too."""
    scored = [item for item in items if item.error is None]
    if not scored:
        return {}
    logits, stage_means, feature_maps = network.outputs(images)
    answers = rules.answers(logits, stage_means, [item.facts for item in scored])
    if heatmaps is not None:
        write_heatmaps(network, feature_maps, logits, scored, answers, heatmaps)
    return {item.index: answer for item, answer in zip(scored, answers, strict=True)}


def file_row(file, answer, error):
    """One output row: the file, then the answer's fields (None for a file not scored), then why."""
    return {"file": file, **{column: (answer or {}).get(column) for column in ANSWER_COLUMNS}, "error": error}


def write_heatmaps(network, feature_maps, logits, scored, answers, destinations):
    """The heat map of each scored image for its label, drawn as the app draws it."""
    labels = [lesion_labels.CLASS_NAMES.index(answer["label"]) for answer in answers]
    masks = network.heatmaps(feature_maps, logits, labels)
    for item, mask in zip(scored, masks, strict=True):
        with files.atomic_output(destinations[item.index]) as file:
            file.write(heatmaps.heatmap_png(item.image, mask))


# --- writing ---------------------------------------------------------------------------------


def rendered(rows, columns, output_format):
    """The whole output as text: a CSV table, a JSON array, or JSON lines."""
    if output_format == "json":
        return json.dumps(rows, indent=2) + "\n"
    if output_format == "jsonl":
        return "".join(json.dumps(row) + "\n" for row in rows)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({column: csv_cell(row[column]) for column in columns} for row in rows)
    return text.getvalue()


def csv_cell(value):
    """true/false for a yes-or-no, lists joined, empty for no value (a file not scored, or no
    out-of-distribution score in the checkpoint)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return LIST_SEPARATOR.join(value)
    return value


def write_output(text, out):
    """The whole text to the file `out`, written atomically (never half a file), or to stdout for -."""
    if out == "-":
        sys.stdout.write(text)
        return
    try:
        files.atomic_write_text(out, text)
    except OSError as error:
        raise errors.UserError(f"{out}: cannot write the predictions ({error.strerror or error})") from None


def report(rows, seconds, device, out):
    """Say which files were not scored, and how many were, on stderr (stdout may carry the
    predictions); returns the rows of the files not scored."""
    failed = [row for row in rows if row["error"] is not None]
    for row in failed:
        print(f"{row['file']}: {row['error']}", file=sys.stderr)
    scored = len(rows) - len(failed)
    print(
        f"Scored {scored:,} of {len(rows):,} images, {scored / seconds:.1f} images/s ({device})",
        file=sys.stderr,
    )
    if out != "-":
        print(f"Predictions written to {out}", file=sys.stderr)
    return failed


def export_beside(checkpoint_path):
    """Write the checkpoint's .onnx file beside it."""
    import export  # torch: --export is the one use of predict.py that needs it

    onnx_path = onnx_file.path_beside(checkpoint_path)
    export.export_onnx(checkpoint_path, onnx_path)
    print(f"Exported {checkpoint_path} to {onnx_path}", file=sys.stderr)


@cli.exits_on_user_error
def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.export and args.paths:
        parser.error("--export takes no IMAGE_OR_FOLDER")
    if args.export:
        export_beside(args.model)
        return
    if not args.paths:
        parser.error("give at least one IMAGE_OR_FOLDER (or --export)")
    out = args.out or f"predictions.{args.format}"
    # Every input is checked before the slow scoring starts; the predictions are written whole
    # when it ends.
    if out != "-" and Path(out).is_dir():
        raise errors.UserError(f"{out}: is a folder (pass a file name as --out)")
    files = image_files(args.paths)
    heatmaps = heatmap_destinations(files, args.heatmaps) if args.heatmaps else None
    network = engine.load_network(args.model, args.device)
    if heatmaps:
        make_folder(args.heatmaps)

    start = time.perf_counter()
    rows = score_files(files, network, args.batch_size, args.workers, heatmaps)
    seconds = time.perf_counter() - start
    columns = (*COLUMNS, "heatmap") if heatmaps else COLUMNS
    write_output(rendered(rows, columns, args.format), out)
    if report(rows, seconds, f"{network.engine}, {network.device}", out):
        sys.exit(1)


if __name__ == "__main__":
    main()
