"""analysis.py (and report.py, its figures and text): scores a folder with a checkpoint; plots, reports
and metrics that hold up."""

import contextlib
import csv
import io
import json

import numpy as np
import pytest
import torch
from conftest import SAMPLE, assert_one_line_error, make_prepared_folder, make_varied_checkpoint, run_script
from PIL import Image
from sklearn import metrics as skmetrics

import analysis
import checkpoints
import engine
import lesion_labels
import metrics
import prepared
import report
import scoring
import subgroups
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


def sample_metadata():
    """{image_id: (dx, age, sex, localization)} of the bundled sample's HAM10000 metadata."""
    with open(SAMPLE / "HAM10000_metadata.csv", newline="") as file:
        return {
            row["image_id"]: (row["dx"], row["age"], row["sex"], row["localization"])
            for row in csv.DictReader(file)
        }


def write_manifest(root, test_folder, facts=True):
    """The prepared tree's manifest: the test split's images, with what the sample's metadata says
    about them unless `facts` is False (a manifest of before diagnoses were recorded), and other
    splits' rows."""
    metadata = sample_metadata()
    rows = [
        ("test", path.name, label, "no", *(metadata[path.stem.split("_", 1)[1]] if facts else ("",) * 4))
        for path, label in prepared.list_prepared_images(test_folder)
    ]
    for split, label, augmented, count in OTHER_SPLITS:
        rows += [
            (split, f"{split}_{label}_{augmented}_{i}.jpg", label, augmented, *("",) * 4)
            for i in range(count)
        ]
    header = ["split", "file", "label", "source_image", "lesion_id", "augmented"]
    with open(root / "manifest.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow([*header, "diagnosis", "age", "sex", "localization"] if facts else header)
        for split, name, label, augmented, *more in rows:
            writer.writerow([split, name, label, name, "", augmented, *(more if facts else [])])


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


# --- results by subgroup --------------------------------------------------------------------------


def test_subgroups_of_a_full_run(full_run):
    results, printed = full_run
    found = read_metrics(results)
    groups = found["subgroups"]["groups"]
    assert list(groups) == ["diagnosis", "sex", "age", "body_site"]
    for dimension, rows in groups.items():
        assert sum(row["n_images"] for row in rows.values()) == 16, dimension
        assert sum(row["n_melanoma"] for row in rows.values()) == 8, dimension
    assert groups["diagnosis"]["mel"]["n_images"] == 8 and "nv" in groups["diagnosis"]
    false_alarms = sum(row["false_positive"] for row in groups["diagnosis"].values())
    assert false_alarms == found["confusion_matrix"]["false_positive"] > 0
    assert groups["diagnosis"]["mel"]["sensitivity"] == found["sensitivity"]
    for rows in groups.values():
        for row in rows.values():
            assert row["roc_auc"] is None and "needs 10 of each class" in row["why_empty"]["roc_auc"]
            assert row["n_cannot_judge"] is None  # this checkpoint cannot flag
            if row["sensitivity"] is not None:
                low, high = row["sensitivity_interval"]
                assert low <= row["sensitivity"] <= high
    with open(results / "subgroups.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert len(table) == sum(len(rows) for rows in groups.values())
    assert {row["dimension"] for row in table} == set(groups)
    summary = (results / "summary_report.txt").read_text()
    assert "Results by subgroup (at threshold" in summary and "prove nothing either way" in summary
    assert "  By age band:" in summary and "mel (melanoma)" in summary
    assert "No group (by diagnosis, sex, age or body site) has an interval wholly below" in " ".join(
        summary.split("\n\n")[1].split()
    )


def test_a_folder_without_facts_gets_one_line_and_every_other_result(one_class_run):
    results, printed = one_class_run
    found = read_metrics(results)
    assert found["subgroups"]["groups"] == {} and found["specificity"] is not None
    assert "Results by subgroup: no subgroup facts were found (no manifest.csv beside" in printed
    assert not (results / "subgroups.csv").exists() and not (results / "subgroups.png").exists()


def test_an_old_manifest_reads_with_no_subgroup_facts(tmp_path):
    folder = make_prepared_folder(tmp_path / "test", count=2)
    write_manifest(tmp_path, folder, facts=False)
    samples = analysis.prepared_images(folder)
    members, reason = analysis.subgroup_members(folder, samples)
    assert members is None and "records no diagnosis, sex, age or body site" in reason
    write_manifest(tmp_path, folder)
    members, source = analysis.subgroup_members(folder, samples)
    assert source == str(tmp_path / "manifest.csv")
    assert sorted(index for rows in members["sex"].values() for index in rows) == [0, 1, 2, 3]


def test_a_bad_age_in_the_manifest_is_one_line(tmp_path, random_checkpoint, capsys):
    folder = make_prepared_folder(tmp_path / "test", count=1)
    write_manifest(tmp_path, folder)
    manifest = tmp_path / "manifest.csv"
    lines = manifest.read_text().splitlines()
    fields = lines[1].split(",")
    fields[7] = "old"
    manifest.write_text("\n".join([lines[0], ",".join(fields), *lines[2:]]) + "\n")
    args = ["--model", random_checkpoint, "--data", folder, "--out", tmp_path / "results"]
    assert_exits_2_with_one_line([str(arg) for arg in args], capsys)
    assert not (tmp_path / "results").exists()


def test_groups_by_age_band_body_region_sex_and_diagnosis():
    rows = [
        {"diagnosis": "nv", "age": "29.9", "sex": "female", "localization": "back"},
        {"diagnosis": "mel", "age": "30", "sex": "male", "localization": "foot"},
        {"diagnosis": "bkl", "age": "69", "sex": "", "localization": "scalp"},
        {"diagnosis": "mel", "age": "70", "sex": "female", "localization": "elbow"},
        None,  # not in the manifest
        {"diagnosis": "df", "age": "", "sex": "male", "localization": "palms/soles"},
    ]
    members = subgroups.group_members(rows)
    assert members["age"] == {
        "under 30": [0],
        "30-49": [1],
        "50-69": [2],
        "70 and over": [3],
        "unknown": [4, 5],
    }
    assert members["body_site"] == {
        "trunk": [0], "acral (hand, foot)": [1, 5], "head and neck": [2], "other": [3], "unknown": [4],
    }  # fmt: skip
    assert members["sex"] == {"female": [0, 3], "male": [1, 5], "unknown": [2, 4]}
    assert list(members["diagnosis"]) == ["mel", "nv", "bkl", "df", "unknown"]
    assert subgroups.group_members([{"diagnosis": "unknown", "sex": "male"}, None]) == {
        "sex": {"male": [0], "unknown": [1]}
    }
    assert subgroups.group_members([None]) == {}
    with pytest.raises(ValueError, match="age 'old' is not an age"):
        subgroups.group_members([{"age": "old"}])


def test_subgroup_plot_and_report_name_a_worse_group():
    labels = np.array([1] * 30 + [0] * 40)
    probabilities = np.r_[np.full(20, 0.9), np.full(10, 0.1), np.full(35, 0.1), np.full(5, 0.9)]
    # The 10 oldest melanomas are all missed.
    young, old = [*range(0, 20), *range(30, 50)], [*range(20, 30), *range(50, 70)]
    members = {"age": {"under 30": young, "70 and over": old}}
    table = metrics.subgroup_table(
        labels, probabilities, 0.5, members, flagged=np.zeros(70, bool), resamples=50
    )
    result = metrics.evaluate(labels, probabilities, 0.5, resamples=20)
    result["subgroups"] = {
        "source": "hand-made", "min_per_class_for_auc": 10, "groups": table,
        "below": metrics.groups_below_overall(table, result),
    }  # fmt: skip
    paragraph = " ".join(report.screening_paragraph(result).split())
    assert "The model does worse for these groups" in paragraph
    assert "age band 70 and over: sensitivity 0.0% (95% interval 0.0% to 27.8%, against 66.7%" in paragraph
    assert "age band under 30" not in paragraph
    lines = report.subgroup_lines(result["subgroups"], result)
    assert any(line.split()[:4] == ["70", "and", "over", "30"] for line in lines)
    figure = report.plot_subgroups(result["subgroups"], result)
    assert len(figure.axes) == 2 and figure.axes[0].get_yticklabels()[0].get_text().startswith(
        "age band under 30"
    )
