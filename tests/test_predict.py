"""predict.py: the app's answer for each file, from the shell; folders; refused files; exit codes."""

import ast
import base64
import csv
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import (
    HAM_JPEG,
    LARGE_JPEG,
    ROOT,
    SMALL_JPEG,
    assert_one_line_error,
    make_varied_checkpoint,
    run_script,
    text_page,
)
from PIL import Image

import app
import image_input
import lesion_labels
import predict

TRUNCATED_JPEG = SMALL_JPEG.read_bytes()[:5000]


def run_main(capsys, *argv):
    """predict.main in this process: its exit code (0 when it returns) and its output."""
    try:
        predict.main(["--workers", "0", *map(str, argv)])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    output = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=output.out, stderr=output.err)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def app_answer(client, path, route="/api/predict"):
    """The app's JSON answer for an upload of the file at `path`."""
    upload = {"file": (io.BytesIO(path.read_bytes()), path.name)}
    return client.post(route, data=upload, content_type="multipart/form-data").get_json()


def saved(image, path):
    image.save(path)
    return path


@pytest.fixture
def photos(tmp_path):
    """Real images as the app receives them, and in the forms it converts: a PNG, a picture that
    is not a lesion, one smaller than the model's input (scored with a warning)."""
    lesion = image_input.load_image(SMALL_JPEG)
    return [
        SMALL_JPEG,
        HAM_JPEG,
        LARGE_JPEG,
        saved(lesion, tmp_path / "lesion.png"),
        saved(text_page(), tmp_path / "page.png"),
        saved(lesion.resize((48, 48)), tmp_path / "small.png"),
    ]


# --- the same answer as the app ----------------------------------------------------------------


def predictions(capsys, tmp_path, files, *argv):
    """predict.py's rows for `files` (run in this process, JSON output), after checking it exits 0."""
    out = tmp_path / "predictions.json"
    result = run_main(capsys, *files, "--format", "json", "--out", out, *argv)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


def test_each_row_is_the_apps_answer_for_the_same_file(trusted_checkpoint, photos, tmp_path, capsys):
    # One image a batch, as the app scores an upload that arrives alone.
    rows = predictions(capsys, tmp_path, photos, "--model", trusted_checkpoint, "--batch-size", "1")
    assert [row["file"] for row in rows] == [str(path) for path in photos]

    client = app.create_app(trusted_checkpoint).test_client()
    for path, row in zip(photos, rows, strict=True):
        answer = app_answer(client, path)
        assert answer["model"]["engine"] == "onnxruntime"  # best_model.onnx beside the checkpoint
        assert set(predict.ANSWER_COLUMNS) == set(answer) - {"model", "timing_ms"}
        assert row["probability"] == pytest.approx(answer["probability"], abs=1e-6), path.name
        assert row["ood_score"] == pytest.approx(answer["ood_score"], rel=1e-6), path.name
        for field in ("label", "threshold", "calibrated", "reliable", "reasons", "ood_threshold", "warnings"):
            assert row[field] == answer[field], (path.name, field)
        assert row["error"] is None
    by_name = {path.name: row for path, row in zip(photos, rows, strict=True)}
    assert by_name["page.png"]["reliable"] is False  # not a lesion: flagged, as the app flags it
    assert "smaller than the model's input" in by_name["small.png"]["warnings"][0]
    assert by_name["ISIC_0024306.jpg"]["calibrated"] is True


def test_batches_leave_each_lesions_answer_as_it_is_alone(trusted_checkpoint, photos, tmp_path, capsys):
    lesions = [path for path in photos if path.name != "page.png"]
    alone = predictions(capsys, tmp_path, lesions, "--model", trusted_checkpoint, "--batch-size", "1")
    together = predictions(capsys, tmp_path, lesions, "--model", trusted_checkpoint, "--batch-size", "4")
    for one, batched in zip(alone, together, strict=True):
        # fp32 rounding depends on the batch; the app's batched answers are held to 1e-5 as well.
        assert batched["probability"] == pytest.approx(one["probability"], abs=1e-5)
        for field in ("label", "reliable", "reasons", "warnings"):
            assert batched[field] == one[field], (one["file"], field)


def test_refused_files_get_the_apps_reason_and_exit_code_1(random_checkpoint, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(SMALL_JPEG, folder / "a.jpg")
    (folder / "b_truncated.jpg").write_bytes(TRUNCATED_JPEG)
    shutil.copy(HAM_JPEG, folder / "c.jpg")
    notes = tmp_path / "notes.txt"
    notes.write_text("just some notes\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    out = tmp_path / "predictions.csv"

    result = run_main(capsys, folder, notes, empty, "--model", random_checkpoint, "--out", out)

    assert result.returncode == 1
    rows = read_csv(out)
    assert [row["file"] for row in rows] == [
        str(folder / "a.jpg"),
        str(folder / "b_truncated.jpg"),
        str(folder / "c.jpg"),
        str(notes),
        str(empty),
    ]
    client = app.create_app(random_checkpoint).test_client()
    refused = {str(folder / "b_truncated.jpg"), str(notes), str(empty)}
    for row in rows:
        if row["file"] in refused:
            assert row["error"] == app_answer(client, Path(row["file"]))["error"]
            assert row["probability"] == row["label"] == row["reliable"] == ""
            assert row["file"] in result.stderr
        else:
            assert row["error"] == "" and 0 <= float(row["probability"]) <= 1
    assert "Scored 2 of 5 images" in result.stderr


# --- folders, formats, heat maps -----------------------------------------------------------------


def test_folders_are_walked_in_order_for_image_files_only(random_checkpoint, tmp_path, capsys):
    folder = tmp_path / "visit"
    (folder / "day2").mkdir(parents=True)
    (folder / ".thumbnails").mkdir()
    shutil.copy(SMALL_JPEG, folder / "b.jpg")
    shutil.copy(SMALL_JPEG, folder / "A.JPEG")
    saved(image_input.load_image(SMALL_JPEG), folder / "day2" / "c.png")
    shutil.copy(SMALL_JPEG, folder / "._b.jpg")  # macOS's resource fork beside a copied file
    shutil.copy(SMALL_JPEG, folder / ".thumbnails" / "b.jpg")
    (folder / "notes.txt").write_text("seen on day 1\n")
    (folder / "report.pdf").write_bytes(b"%PDF-1.7\n")
    out = tmp_path / "predictions.csv"

    result = run_main(capsys, folder, "--model", random_checkpoint, "--out", out)

    assert result.returncode == 0, result.stderr
    rows = read_csv(out)
    assert [row["file"] for row in rows] == [str(folder / name) for name in ("A.JPEG", "b.jpg", "day2/c.png")]
    assert tuple(rows[0]) == predict.COLUMNS
    first = rows[0]
    assert first["label"] in lesion_labels.CLASS_NAMES and first["threshold"] == "0.5"
    # A checkpoint without an out-of-distribution score cannot say: empty, with the reason.
    assert first["reliable"] == first["ood_score"] == first["ood_threshold"] == ""
    assert "flagging is not available" in first["reasons"]
    assert first["error"] == ""


def test_json_lines_on_stdout_from_the_shell_with_worker_processes(random_checkpoint, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        shutil.copy(SMALL_JPEG, folder / name)
    (folder / "b.jpg").write_bytes(TRUNCATED_JPEG)

    result = run_script(
        "predict.py", folder, "--model", random_checkpoint, "--format", "jsonl", "--out", "-",
        "--workers", "2", "--batch-size", "2", cwd=tmp_path,
    )  # fmt: skip

    assert result.returncode == 1, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["file"] for row in rows] == [str(folder / name) for name in ("a.jpg", "b.jpg", "c.jpg")]
    assert [row["error"] is None for row in rows] == [True, False, True]
    assert "not a readable image" in rows[1]["error"]
    assert rows[0]["probability"] == rows[2]["probability"]
    assert "Traceback" not in result.stderr
    assert list(tmp_path.glob("predictions*")) == []


def test_heatmaps_are_the_apps_pictures(tmp_path, capsys):
    photos = [SMALL_JPEG, LARGE_JPEG]
    # At 64 pixels the last feature map is 2x2, and a heat map stretched from 4 numbers changes
    # with the float rounding of a batch; at 384 it is 12x12, as served.
    checkpoint = make_varied_checkpoint(tmp_path / "model.pth", photos, image_size=384, threshold=0.7)
    twin = tmp_path / "again" / SMALL_JPEG.name  # the same name from another folder
    twin.parent.mkdir()
    shutil.copy(SMALL_JPEG, twin)
    heatmaps = tmp_path / "heatmaps"
    out = tmp_path / "predictions.csv"

    result = run_main(capsys, *photos, twin, "--model", checkpoint, "--heatmaps", heatmaps, "--out", out)

    assert result.returncode == 0, result.stderr
    rows = read_csv(out)
    assert [row["label"] for row in rows] == ["Melanoma", "Non-Melanoma", "Melanoma"]  # each its own
    names = [Path(row["heatmap"]).name for row in rows]
    assert names == ["ISIC_0024306_heatmap.png", "ISIC_0013828_heatmap.png", "ISIC_0024306-2_heatmap.png"]
    client = app.create_app(checkpoint).test_client()
    for path, row in zip([*photos, twin], rows, strict=True):
        explained = app_answer(client, path, route="/api/predict?explain=1")
        url = explained["heatmap"].removeprefix("data:image/png;base64,")
        expected = np.asarray(Image.open(io.BytesIO(base64.b64decode(url))), dtype=np.int16)
        written = np.asarray(Image.open(row["heatmap"]), dtype=np.int16)
        assert written.shape == expected.shape
        # The same picture, up to a colour step where float rounding moved a mask value across
        # one of its 256 levels.
        difference = np.abs(written - expected)
        assert difference.max() <= 4 and difference.mean() < 0.01, (difference.max(), difference.mean())


# --- bad usage: one line, exit code 2, nothing written -------------------------------------------


def test_missing_model_from_the_shell_is_one_line_and_writes_nothing(tmp_path):
    result = run_script("predict.py", SMALL_JPEG, "--model", tmp_path / "best_model.pth", cwd=tmp_path)
    assert_one_line_error(result)
    assert "train first" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing path", "no such file or folder"),
        ("folder without images", "no images in this folder"),
        ("missing model", "train first"),
        ("garbage model", "not a readable checkpoint"),
        ("out is a folder", "is a folder"),
    ],
)
def test_bad_usage_is_one_line_exit_2_and_writes_nothing(
    random_checkpoint, tmp_path, capsys, problem, message
):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here\n")
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    argv = {
        "missing path": [SMALL_JPEG, tmp_path / "no_such.jpg"],
        "folder without images": [SMALL_JPEG, empty],
        "missing model": [SMALL_JPEG, "--model", tmp_path / "best_model.pth"],
        "garbage model": [SMALL_JPEG, "--model", garbage],
        "out is a folder": [SMALL_JPEG, "--out", empty],
    }[problem]
    before = sorted(tmp_path.rglob("*"))

    # A flag given twice: the later one counts.
    result = run_main(capsys, "--model", random_checkpoint, "--out", tmp_path / "predictions.csv", *argv)

    assert_one_line_error(result)
    assert message in result.stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_help_lists_every_flag_and_the_exit_codes(capsys):
    result = run_main(capsys, "--help")
    assert result.returncode == 0
    for flag in ("--model", "--out", "--format", "--heatmaps", "--batch-size", "--workers", "--device"):
        assert flag in result.stdout
    assert "exit codes" in result.stdout


def test_predict_needs_neither_the_training_code_nor_the_app():
    tree = ast.parse((ROOT / "predict.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    training = {"model", "training", "training_data", "scoring_fit"}
    assert imported.isdisjoint({*training, "app", "analysis", "prepdata", "app_harness"})
