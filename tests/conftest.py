"""Shared fixtures: real images (bundled sample and ../shared/data), tiny random checkpoints."""

import contextlib
import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw

import backbones  # noqa: E402
import checkpoints  # noqa: E402
import export  # noqa: E402
import image_input  # noqa: E402
import lesion_labels  # noqa: E402
import onnx_file  # noqa: E402
import prepared  # noqa: E402
import scoring_fit  # noqa: E402
import torch_reference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


SAMPLE = ROOT / "sample_data"
SHARED_DATA = ROOT.parent / "shared" / "data"
HAM_SAMPLE = SHARED_DATA / "ham10000_sample"
LARGE_PHOTOS = SHARED_DATA / "large_photos"
TINY_IMAGE_SIZE = 64
# One real image of each size the app meets: bundled, HAM10000's own, a camera-sized photo.
SMALL_JPEG = SAMPLE / "images" / "ISIC_0024306.jpg"  # 300x225
HAM_JPEG = sorted((HAM_SAMPLE / "images").glob("*.jpg"))[0]  # 600x450
LARGE_JPEG = LARGE_PHOTOS / "images" / "ISIC_0013828.jpg"  # 3008x2000, 2.8 MB, decoded at reduced scale

# Tests share two cores with each other's subprocesses: one torch thread each avoids thrashing.
torch.set_num_threads(1)


def sample_labels():
    """{image_id: 1/0} of the bundled sample."""
    with open(SAMPLE / "GroundTruth.csv", newline="") as file:
        return {row["image"]: int(float(row["MEL"])) for row in csv.DictReader(file)}


def make_prepared_folder(folder, count=None, labels=(0, 1)):
    """A folder of `mel_`/`nomel_` copies of bundled sample images (no prepdata needed).

    `count` images per label (all when None); `labels` picks which classes appear.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    taken = dict.fromkeys(labels, 0)
    for image_id, label in sorted(sample_labels().items()):
        if label in taken and (count is None or taken[label] < count):
            shutil.copyfile(
                SAMPLE / "images" / f"{image_id}.jpg", folder / prepared.prepared_filename(label, image_id)
            )
            taken[label] += 1
    return folder


def sample_diagnoses():
    """{image_id: dx} of the bundled sample's HAM10000 metadata."""
    with open(SAMPLE / "HAM10000_metadata.csv", newline="") as file:
        return {row["image_id"]: row["dx"] for row in csv.DictReader(file)}


def write_manifest(root):
    """manifest.csv for a tree of make_prepared_folder splits, with the images' real diagnoses."""
    diagnoses = sample_diagnoses()
    rows = []
    for split in prepared.SPLITS:
        for path, label in prepared.list_prepared_images(root / split) if (root / split).is_dir() else []:
            image_id = path.stem.split("_", 1)[1]
            rows.append(
                prepared.ManifestRow(split, path.name, label, image_id, None, False, diagnoses[image_id])
            )
    prepared.write_manifest(root / prepared.MANIFEST_FILE, rows)


def make_random_checkpoint(path, image_size=TINY_IMAGE_SIZE, threshold=0.5, seed=0):
    torch.manual_seed(seed)
    model = backbones.SkinLesionModel(weights="none")
    checkpoints.save_checkpoint(
        path, model, checkpoints.checkpoint_metadata(image_size=image_size, threshold=threshold)
    )
    return Path(path)


def make_varied_checkpoint(path, photos, image_size=TINY_IMAGE_SIZE, threshold=0.5, diagnoses=None, **extra):
    """A random-weight checkpoint whose scores differ from image to image, as a trained one's do;
    with `diagnoses`, a diagnosis head (one output each).

    A fresh EfficientNet's batch-norm statistics (mean 0, variance 1) shrink its features to
    about 1e-7, so every image gets the same score, which hides ranking and precision errors;
    statistics recomputed on the real `photos` give each image its own score.
    """
    torch.manual_seed(0)
    model = backbones.SkinLesionModel(weights="none", num_classes=len(diagnoses or lesion_labels.CLASS_NAMES))
    if diagnoses:
        extra |= {"targets": "diagnosis", "diagnoses": list(diagnoses)}
    meta = checkpoints.checkpoint_metadata(image_size=image_size, threshold=threshold, **extra)
    transform = torch_reference.checkpoint_transform(meta)
    batch = torch.stack([transform(image_input.load_image(photo, min_size=image_size)) for photo in photos])
    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None  # a plain average over what it sees
    with torch.no_grad():
        model.train()(batch)
    checkpoints.save_checkpoint(path, model.eval(), meta)
    return Path(path)


def text_page():
    """A picture of a printed page: the plainest 'not a lesion' image."""
    page = Image.new("RGB", (600, 450), "white")
    draw = ImageDraw.Draw(page)
    for line in range(20):
        draw.text(
            (20, 20 + 20 * line), "Lorem ipsum dolor sit amet, consectetur adipiscing " * 2, fill="black"
        )
    return page


def make_trusted_checkpoint(folder, image_size=TINY_IMAGE_SIZE):
    """A varied checkpoint whose scoring rules (calibration, out-of-distribution score, quality
    limits) model.py fitted on a tree of bundled sample images: every other image of each class
    in train/, the rest in val/ (11 melanomas and 20 others: enough to calibrate)."""

    folder = Path(folder)
    by_label = {label: [] for label in (0, 1)}
    for image_id, label in sorted(sample_labels().items()):
        by_label[label].append(image_id)
    for label, image_ids in by_label.items():
        for index, image_id in enumerate(image_ids):
            split = folder / "prepared" / ("train" if index % 2 == 0 else "val")
            split.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(
                SAMPLE / "images" / f"{image_id}.jpg", split / prepared.prepared_filename(label, image_id)
            )
    train_photos = [path for path, _ in prepared.list_prepared_images(folder / "prepared" / "train")]
    checkpoint = make_varied_checkpoint(folder / "best_model.pth", train_photos, image_size=image_size)
    settings = SimpleNamespace(
        data=folder / "prepared", batch_size=16, workers=0, threshold="auto", target_sensitivity=0.9,
        ood_flag_rate=0.05,
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        scoring_fit.fit_scoring_rules(checkpoint, settings, torch.device("cpu"))
    return checkpoint


def run_script(script, *args, cwd=ROOT, timeout=600):
    """Run one of the stage scripts as a user would; returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def assert_one_line_error(result):
    """A user error: exit 2, one non-empty line on stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory):
    """A random-weight checkpoint at 64 pixels, shared by the tests that only read it, with its
    network exported beside it (as model.py leaves it), so no test's output holds the line that
    says a first load exported it."""
    checkpoint = make_random_checkpoint(tmp_path_factory.mktemp("checkpoint") / "best_model.pth")
    export.export_onnx(checkpoint, onnx_file.path_beside(checkpoint))
    return checkpoint


@pytest.fixture(scope="session")
def trusted_checkpoint(tmp_path_factory):
    """A checkpoint with fitted scoring rules, shared by the tests that only read it."""
    return make_trusted_checkpoint(tmp_path_factory.mktemp("trusted"))


@pytest.fixture
def writable_copy(tmp_path):
    """Copy a read-only ../shared/data folder into tmp and make it writable."""

    def copy(source):
        target = tmp_path / Path(source).name
        shutil.copytree(source, target)
        for path in [target, *target.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
        return target

    return copy
