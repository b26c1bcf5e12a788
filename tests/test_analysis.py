"""analysis.py (and report.py, its figures and text): scores a folder with a checkpoint; plots, reports
and metrics that hold up."""

import contextlib
import csv
import io
import json

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, make_prepared_folder, make_varied_checkpoint, run_script
from PIL import Image
from sklearn import metrics as skmetrics

import analysis
import checkpoints
import engine
import lesion_labels
import prepared
import report
import scoring
import torch_reference
import training_data

THRESHOLD = 0.495  # near the middle of the varied checkpoint's scores: both kinds of error occur
HISTORY = {
    "monitor": "val_auc",
    "best_epoch": 2,
    "amp": "bf16",
    "device": "cpu",
    "epochs": [
        {"epoch": 1, "train_loss": 0.71, "train_accuracy_at_0.5": 0.52, "train_auc": None, "val_loss": 0.69,
         "val_accuracy_at_0.5": 0.55, "val_auc": 0.61, "lr": 1e-4, "seconds": 12.0},
        {"epoch": 2, "train_loss": 0.62, "train_accuracy_at_0.5": 0.66, "train_auc": 0.70, "val_loss": 0.64,
         "val_accuracy_at_0.5": 0.63, "val_auc": 0.72, "lr": 1e-4, "seconds": 11.5},
    ],
}  # fmt: skip
# (split, label, augmented, rows) of the manifest beyond the test split's own files
OTHER_SPLITS = [("train", 1, "no", 10), ("train", 1, "yes", 20), ("train", 0, "no", 30), ("val", 1, "no", 3),
                ("val", 0, "no", 7)]  # fmt: skip


def write_manifest(root, test_folder):
    rows = [("test", path.name, label, "no") for path, label in prepared.list_prepared_images(test_folder)]
    for split, label, augmented, count in OTHER_SPLITS:
        rows += [(split, f"{split}_{label}_{augmented}_{i}.jpg", label, augmented) for i in range(count)]
    with open(root / "manifest.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["split", "file", "label", "source_image", "lesion_id", "augmented"])
        writer.writerows((split, name, label, name, "", augmented) for split, name, label, augmented in rows)


def folder_state(folder):
    return sorted((str(path), path.stat().st_mtime_ns, path.stat().st_size) for path in folder.rglob("*"))


def read_predictions(results):
    with open(results / "predictions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    labels = np.array([int(row["label"]) for row in rows])
    probabilities = np.array([float(row["probability"]) for row in rows])
    predicted = np.array([int(row["predicted"]) for row in rows])
    return rows, labels, probabilities, predicted


def read_metrics(results):
    return json.loads((results / analysis.METRICS_FILE).read_text())


def run_in_process(*args):
    """main() in this process (faster than a subprocess); returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        analysis.main([str(arg) for arg in args])
    return printed.getvalue()


@pytest.fixture(scope="module")
def prepared_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared_dataset")
    write_manifest(root, make_prepared_folder(root / "test", count=8))
    return root


@pytest.fixture(scope="module")
def varied_checkpoint(tmp_path_factory, prepared_tree):
    path = tmp_path_factory.mktemp("varied") / "best_model.pth"
    photos = [photo for photo, _ in prepared.list_prepared_images(prepared_tree / "test")]
    return make_varied_checkpoint(path, photos, threshold=THRESHOLD, threshold_rule="fixed by the test")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, prepared_tree, varied_checkpoint):
    """analysis.py run as a user would, on a prepared tree with a manifest and a history."""
    work = tmp_path_factory.mktemp("full_run")
    history = work / "training_history.json"
    history.write_text(json.dumps(HISTORY))
    before = folder_state(prepared_tree)
    result = run_script(
        "analysis.py", "--model", varied_checkpoint, "--data", prepared_tree / "test", "--history", history,
        "--out", work / "results", "--workers", "1", "--bootstrap", "200",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert folder_state(prepared_tree) == before, "the input data must not change"
    return work / "results", result.stdout


@pytest.fixture(scope="module")
def one_class_run(tmp_path_factory, varied_checkpoint):
    """Only benign images, no training history, --tta, into a folder holding an older run."""
    work = tmp_path_factory.mktemp("one_class")
    folder = make_prepared_folder(work / "new_images", count=3, labels=(lesion_labels.NON_MELANOMA,))
    results = work / "results"
    results.mkdir()
    for name in ("learning_curves.png", "metrics.json", "notes.txt"):
        (results / name).write_text("from before")
    printed = run_in_process(
        "--model", varied_checkpoint, "--data", folder, "--history", work / "no_history.json",
        "--out", results, "--workers", "0", "--bootstrap", "50", "--tta",
    )  # fmt: skip
    return results, printed


# --- a full run --------------------------------------------------------------------------------


def test_full_run_writes_every_output(full_run):
    results, _ = full_run
    for name in analysis.OUTPUT_FILES:
        assert (results / name).stat().st_size > 0, name
    for name in analysis.OUTPUT_FILES:
        if name.endswith(".png"):
            with Image.open(results / name) as image:
                image.verify()
                assert image.format == "PNG" and min(image.size) >= 200, name
    assert not [path for path in results.iterdir() if path.name.startswith(".")], "staging folder left behind"


def test_predictions_match_the_files_and_the_threshold(full_run, prepared_tree):
    results, _ = full_run
    rows, labels, probabilities, predicted = read_predictions(results)
    images = prepared.list_prepared_images(prepared_tree / "test")
    assert [row["file"] for row in rows] == [path.name for path, _ in images]
    assert labels.tolist() == [label for _, label in images]
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    np.testing.assert_array_equal(predicted, probabilities >= THRESHOLD)
    assert len(np.unique(probabilities)) > len(probabilities) // 2, "scores should differ between images"


def test_metrics_agree_with_scikit_learn(full_run):
    results, _ = full_run
    metrics = read_metrics(results)
    _, labels, probabilities, predicted = read_predictions(results)
    assert predicted.any() and not predicted.all(), "the test needs both decisions to occur"
    expected = {
        "accuracy": skmetrics.accuracy_score(labels, predicted),
        "balanced_accuracy": skmetrics.balanced_accuracy_score(labels, predicted),
        "precision": skmetrics.precision_score(labels, predicted),
        "sensitivity": skmetrics.recall_score(labels, predicted),
        "specificity": skmetrics.recall_score(labels, predicted, pos_label=0),
        "negative_predictive_value": skmetrics.precision_score(labels, predicted, pos_label=0),
        "f1": skmetrics.f1_score(labels, predicted),
        "roc_auc": skmetrics.roc_auc_score(labels, probabilities),
        "average_precision": skmetrics.average_precision_score(labels, probabilities),
        "brier_score": skmetrics.brier_score_loss(labels, probabilities),
    }
    assert {name: metrics[name] for name in expected} == pytest.approx(expected)
    (tn, fp), (fn, tp) = skmetrics.confusion_matrix(labels, predicted, labels=[0, 1])
    assert metrics["confusion_matrix"] == {
        "true_positive": tp, "false_negative": fn, "false_positive": fp, "true_negative": tn,
    }  # fmt: skip
    assert (metrics["n_melanoma"], metrics["n_non_melanoma"]) == (8, 8)
    assert metrics["threshold"] == THRESHOLD


def test_screening_operating_points_agree_with_a_brute_force_search(full_run):
    results, _ = full_run
    metrics = read_metrics(results)
    _, labels, probabilities, _ = read_predictions(results)
    points = []
    for threshold in [*np.unique(probabilities), np.inf]:  # inf: flag nothing
        flagged = probabilities >= threshold
        points.append(
            (skmetrics.recall_score(labels, flagged), skmetrics.recall_score(labels, flagged, pos_label=0))
        )
    assert metrics["specificity_at_95_sensitivity"] == pytest.approx(
        max(sp for se, sp in points if se >= 0.95)
    )
    assert metrics["sensitivity_at_95_specificity"] == pytest.approx(
        max(se for se, sp in points if sp >= 0.95)
    )
    at_threshold = probabilities >= metrics["threshold_for_95_sensitivity"]
    assert skmetrics.recall_score(labels, at_threshold) >= 0.95


def test_confidence_intervals_bracket_the_estimates(full_run):
    metrics = read_metrics(full_run[0])
    for name in ("roc_auc", "sensitivity", "specificity"):
        low, high = metrics["confidence_intervals_95"][name]
        assert 0 <= low <= metrics[name] <= high <= 1, name
    assert metrics["bootstrap_resamples"] == 200
    for name in ("sensitivity", "specificity"):
        low, high = metrics["wilson_intervals_95"][name]
        assert 0 <= low <= metrics[name] <= high <= 1, name


def test_report_explains_the_run(full_run):
    results, printed = full_run
    summary = (results / "summary_report.txt").read_text()
    counts = read_metrics(results)["confusion_matrix"]
    assert summary.startswith("Melanoma classifier: evaluation report")
    paragraph = " ".join(summary.split("\n\n")[1].split())
    assert f"flags {counts['true_positive']} of the 8 melanomas" in paragraph
    assert f"It also flags {counts['false_positive']} of the 8 benign lesions" in paragraph
    assert "weights started from: none" in summary
    assert "test-time augmentation off" in summary
    assert f"Threshold:  {THRESHOLD:.4f} (chosen by: fixed by the test)" in summary
    assert "true sensitivity could plausibly be anywhere from" in paragraph
    assert "learning_curves.png, from" in summary
    assert "images/s" in printed and summary in printed


def test_class_distribution_comes_from_the_manifest(full_run):
    results, printed = full_run
    distribution = read_metrics(results)["run"]["class_distribution"]
    assert list(distribution) == ["train", "val", "test"]
    assert distribution["train"]["Melanoma"] == {"original": 10, "augmented": 20}
    assert distribution["test"]["Non-Melanoma"] == {"original": 8, "augmented": 0}
    assert "train: 60 images (20 augmented)" in printed
    assert "Melanoma: 50.0% (30; 20 augmented)" in printed
    assert "Melanoma: 30.0% (3; 0 augmented)" in printed


def test_misclassified_lists_every_error_worst_first(full_run):
    results, _ = full_run
    _, labels, _, predicted = read_predictions(results)
    with open(results / "misclassified.csv", newline="") as file:
        errors = list(csv.DictReader(file))
    assert len(errors) == int(np.sum(labels != predicted))
    kinds = [int(row["label"]) for row in errors]
    assert kinds == sorted(kinds, reverse=True), "missed melanomas come first"
    missed = [float(row["probability"]) for row in errors if row["label"] == "1"]
    alarms = [float(row["probability"]) for row in errors if row["label"] == "0"]
    assert missed == sorted(missed) and alarms == sorted(alarms, reverse=True)


# --- one class, no history, TTA, an older results folder -------------------------------------


def test_one_class_folder_reports_undefined_metrics(one_class_run):
    results, printed = one_class_run
    metrics = read_metrics(results)
    assert (metrics["n_melanoma"], metrics["n_non_melanoma"]) == (0, 3)
    for name in (
        "sensitivity",
        "roc_auc",
        "average_precision",
        "auc_above_80_sensitivity",
        "balanced_accuracy",
    ):
        assert metrics[name] is None, name
    for name in ("specificity", "accuracy", "brier_score", "expected_calibration_error"):
        assert isinstance(metrics[name], float), name
    assert metrics["confidence_intervals_95"]["sensitivity"] is None
    assert metrics["confidence_intervals_95"]["roc_auc"] is None
    assert metrics["wilson_intervals_95"]["sensitivity"] is None
    summary = (results / "summary_report.txt").read_text()
    assert "This folder holds no melanomas" in summary
    assert "Sensitivity (recall)              undefined (no melanomas)" in summary
    assert "ROC AUC                           undefined (needs both classes)" in summary
    with Image.open(results / "roc_curve.png") as image:
        image.verify()


def test_missing_history_skips_learning_curves_and_replaces_only_old_outputs(one_class_run):
    results, printed = one_class_run
    assert not (results / "learning_curves.png").exists(), "a stale plot from an older run must go"
    assert (results / "notes.txt").read_text() == "from before", "files this script does not write stay"
    assert json.loads((results / "metrics.json").read_text())["n_images"] == 3
    assert "Learning curves: skipped: no training history at" in printed


def test_tta_is_reported(one_class_run):
    results, _ = one_class_run
    assert read_metrics(results)["run"]["tta"] is True
    assert (
        "test-time augmentation on (8 flips/rotations averaged)"
        in (results / "summary_report.txt").read_text()
    )


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
def test_the_engine_scores_the_folder_as_torch_does(varied_checkpoint, prepared_tree, tta):
    """analysis.py scores through the serving engine (the checkpoint's export, made on first
    load); the answers are torch's torch_reference.score_dataset's, TTA views included."""
    network = engine.load_network(varied_checkpoint)
    assert network.engine == "onnxruntime"
    folder = prepared_tree / "test"
    ours, _ = analysis.score_folder(network, analysis.prepared_images(folder), 4, 0, tta)
    model, meta = checkpoints.load_scoring_model(varied_checkpoint)
    theirs = torch_reference.score_dataset(
        model, torch_reference.ScoringDataset(folder, meta), torch.device("cpu"), 4, 0, tta
    )
    np.testing.assert_array_equal(ours.labels, theirs.labels)
    # Float rounding only: on this random network with real batch-norm statistics, folding the
    # batch norms alone moves torch's probabilities by up to 1.6e-5, ONNX Runtime's by 1.9e-5.
    ours_probabilities, their_probabilities = (
        scoring.melanoma_probability(scored.logits) for scored in (ours, theirs)
    )
    np.testing.assert_allclose(ours_probabilities, their_probabilities, rtol=0, atol=5e-5)
    for one, other in zip(ours.stage_means, theirs.stage_means, strict=True):  # rounding grows with depth
        np.testing.assert_allclose(one, other, rtol=0, atol=1e-3 * np.abs(other).max())
    for one, other in zip(ours.facts, theirs.facts, strict=True):
        assert one == pytest.approx(other, rel=1e-6)


def test_tta_average_does_not_depend_on_orientation(varied_checkpoint, prepared_tree):
    model, meta = checkpoints.load_checkpoint(varied_checkpoint)
    dataset = training_data.SkinLesionDataset(
        prepared_tree / "test", torch_reference.checkpoint_transform(meta)
    )
    images = torch.stack([dataset[0][0], dataset[len(dataset) - 1][0]])
    cpu = torch.device("cpu")

    def probabilities(batch, tta):
        return scoring.melanoma_probability(torch_reference.batch_outputs(model, batch, cpu, tta)[0])

    averaged = probabilities(images, tta=True)
    views = [images.flip(-1), images.flip(-2), images.transpose(-2, -1), torch.rot90(images, 1, (-2, -1))]
    for view in views:
        np.testing.assert_allclose(probabilities(view, tta=True), averaged, rtol=1e-4, atol=1e-6)
    single = [probabilities(view, tta=False) for view in views]
    assert any(not np.allclose(view, probabilities(images, tta=False), atol=1e-4) for view in single)


def test_plain_words_for_rates():
    assert report.in_plain_words(0.9) == ", about 9 in 10"
    assert report.in_plain_words(0.26) == ", about 1 in 4"
    assert report.in_plain_words(0.01) == ""
    assert report.in_plain_words(1.0) == ""


# --- writing the results folder -------------------------------------------------------------------


def test_results_appear_only_when_the_run_completes(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "metrics.json").write_text("old")
    with analysis.staged_results(out) as folder:
        (folder / "roc_curve.png").write_text("new")
        (folder / "metrics.json").write_text("new")
        assert (out / "metrics.json").read_text() == "old"
        assert not (out / "roc_curve.png").exists()
    assert sorted(path.name for path in out.iterdir()) == ["metrics.json", "roc_curve.png"]
    assert (out / "metrics.json").read_text() == "new"


def test_a_failed_run_leaves_the_previous_results_as_they_were(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "metrics.json").write_text("old")
    with pytest.raises(RuntimeError, match="plot failed"), analysis.staged_results(out) as folder:
        (folder / "metrics.json").write_text("half")
        raise RuntimeError("plot failed")
    assert [path.name for path in out.iterdir()] == ["metrics.json"]
    assert (out / "metrics.json").read_text() == "old"


# --- bad input ------------------------------------------------------------------------------------


def bad_input_case(case, tmp_path, checkpoint):
    """Arguments for one kind of bad input (everything else valid)."""
    images = make_prepared_folder(tmp_path / "images", count=1)
    args = {"--model": checkpoint, "--data": images, "--history": tmp_path / "none.json"}
    if case == "missing checkpoint":
        args["--model"] = tmp_path / "missing.pth"
    elif case == "corrupt checkpoint":
        args["--model"] = tmp_path / "corrupt.pth"
        args["--model"].write_bytes(b"this is not a checkpoint")
    elif case == "missing folder":
        args["--data"] = tmp_path / "missing"
    elif case == "folder without mel_/nomel_ images":
        args["--data"] = tmp_path / "empty"
        args["--data"].mkdir()
        (args["--data"] / "ISIC_0000001.jpg").write_bytes(next(images.iterdir()).read_bytes())
    elif case == "corrupt image in a worker":
        (images / "mel_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    elif case == "corrupt history":
        args["--history"] = tmp_path / "history.json"
        args["--history"].write_text("{not json")
    elif case == "history with text values":
        args["--history"] = tmp_path / "history.json"
        args["--history"].write_text(json.dumps({"epochs": [{"epoch": 1, "val_loss": "high"}]}))
    elif case == "unknown device":
        args["--device"] = "tpu9"
    return [str(item) for pair in args.items() for item in pair]


def assert_exits_2_with_one_line(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        analysis.main(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines


@pytest.mark.parametrize(
    "case",
    [
        "missing checkpoint",
        "corrupt checkpoint",
        "missing folder",
        "folder without mel_/nomel_ images",
        "corrupt history",
        "history with text values",
        "unknown device",
    ],
)
def test_bad_input_exits_2_with_one_line(case, tmp_path, random_checkpoint, capsys):
    out = tmp_path / "results"
    assert_exits_2_with_one_line(
        [*bad_input_case(case, tmp_path, random_checkpoint), "--out", str(out)], capsys
    )
    assert not out.exists(), "bad input is found before anything is written"


@pytest.mark.parametrize("case", ["missing checkpoint", "corrupt image in a worker"])
def test_bad_input_in_a_real_process(case, tmp_path, random_checkpoint):
    out = tmp_path / "results"
    args = bad_input_case(case, tmp_path, random_checkpoint)
    result = run_script("analysis.py", *args, "--out", out, "--workers", "1")
    assert_one_line_error(result)
    assert not (out / analysis.METRICS_FILE).exists()
    if case == "corrupt image in a worker":
        assert "mel_broken.jpg: not a readable image" in result.stderr


@pytest.mark.parametrize(
    "flag", [["--batch-size", "0"], ["--workers", "-1"], ["--bootstrap", "x"], ["--seed", "-1"]]
)
def test_bad_numbers_are_rejected_by_the_parser(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        analysis.main(flag)
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
