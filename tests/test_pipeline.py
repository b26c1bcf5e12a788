"""The four stages end to end, as a user runs them (and as `make demo` does: EfficientNet-Lite0
from its pip-shipped ImageNet weights), on the bundled sample at a tiny size."""

import csv
import json

import pytest
import torch
from conftest import SAMPLE, TINY_IMAGE_SIZE, run_script
from PIL import Image


@pytest.mark.slow
def test_four_stages_end_to_end(tmp_path):
    prepared, run, results = tmp_path / "prepared_dataset", tmp_path / "run", tmp_path / "results"

    prep = run_script(
        "prepdata.py",
        "--csv", SAMPLE / "GroundTruth.csv",
        "--images", SAMPLE / "images",
        "--out", prepared,
        "--max-side", 96,
    )  # fmt: skip
    assert prep.returncode == 0, prep.stderr
    with open(prepared / "manifest.csv", newline="") as file:
        manifest = list(csv.DictReader(file))
    assert {row["split"] for row in manifest} == {"train", "val", "test"}

    train = run_script(
        "model.py",
        "--data", prepared,
        "--out", run,
        "--epochs", 2,
        "--image-size", TINY_IMAGE_SIZE,
        "--batch-size", 8,
        "--accumulation-steps", 2,
        "--arch", "efficientnet_lite0",
        "--weights", "imagenet",
        "--workers", 0,
        "--targets", "diagnosis",
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    checkpoint = torch.load(run / "best_model.pth", weights_only=True)
    assert (
        checkpoint["targets"] == "diagnosis" and "mel" in checkpoint["diagnoses"]
    )  # every stage below reads it
    assert checkpoint["image_size"] == TINY_IMAGE_SIZE
    assert (checkpoint["arch"], checkpoint["weights"], checkpoint["mean"]) == (
        "efficientnet_lite0",
        "imagenet",
        [0.5] * 3,
    )
    assert "efficientnet_lite0 with ImageNet weights from the pip package" in train.stdout
    assert 0.0 <= checkpoint["threshold"] <= 1.0
    # What scoring needs beyond the weights, fitted on the best checkpoint. The sample's val/ is
    # too small to calibrate on, and the checkpoint says so.
    assert checkpoint["ood"]["flag_rate"] == 0.05 and checkpoint["quality"]["limits"]
    assert checkpoint["calibration"] is None and "calibration needs" in checkpoint["not_calibrated"]
    assert "Flagged as not judgeable (out of distribution):" in train.stdout

    analysis = run_script(
        "analysis.py",
        "--model", run / "best_model.pth",
        "--data", prepared / "test",
        "--history", run / "training_history.json",
        "--out", results,
    )  # fmt: skip
    assert analysis.returncode == 0, analysis.stderr
    metrics = json.loads((results / "metrics.json").read_text())
    test_files = [row for row in manifest if row["split"] == "test"]
    assert metrics["n_images"] == len(test_files)
    assert metrics["flagging"]["available"] is True
    for plot in ("confusion_matrix.png", "roc_curve.png", "learning_curves.png"):
        assert Image.open(results / plot).size[0] > 100

    from app import create_app

    client = create_app(run / "best_model.pth").test_client()
    some_test_image = prepared / "test" / test_files[0]["file"]
    with open(some_test_image, "rb") as image:
        response = client.post("/api/predict", data={"file": (image, "lesion.jpg")})
    assert response.status_code == 200, response.get_json()
    answer = response.get_json()
    assert answer["label"] in ("Melanoma", "Non-Melanoma")
    assert answer["reliable"] in (True, False) and answer["calibrated"] is False
    assert answer["threshold"] == pytest.approx(checkpoint["threshold"])
