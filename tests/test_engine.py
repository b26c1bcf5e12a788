"""The serving engine (engine.py, scoring.py): torch's input, answers and heat maps, without torch."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    HAM_JPEG,
    HAM_SAMPLE,
    LARGE_JPEG,
    ROOT,
    SMALL_JPEG,
    make_random_checkpoint,
    make_varied_checkpoint,
)

import app_harness
import backbones
import checkpoints
import engine
import errors
import export
import files
import heatmaps
import image_input
import lesion_labels
import onnx_file
import scoring
import torch_reference

PHOTOS = [SMALL_JPEG, HAM_JPEG, LARGE_JPEG, *sorted((HAM_SAMPLE / "images").glob("*.jpg"))[1:6]]


@pytest.fixture(scope="module")
def served(trusted_checkpoint):
    """(the engine on the trusted checkpoint's .onnx, the folded torch network, its metadata)."""
    network, meta = checkpoints.load_scoring_model(trusted_checkpoint)
    return engine.OnnxEngine(onnx_file.path_beside(trusted_checkpoint)), network, meta


def grad_cam_masks(model, images, labels):
    """pytorch_grad_cam's Grad-CAM of a normalised batch on the last stage, each image for its label
    (what the app drew before the engine)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = GradCAM(model=model, target_layers=[model.efficientnet.features[-1]])
    try:
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(label) for label in labels])
    finally:
        cam.activations_and_grads.release()


def decoded(photos, image_size):
    return [image_input.load_image(photo, min_size=image_size) for photo in photos]


@pytest.mark.parametrize("image_size", [64, 384])
def test_model_input_is_torchvisions_transform(image_size):
    meta = checkpoints.checkpoint_metadata(image_size=image_size)
    transform = torch_reference.checkpoint_transform(meta)
    for image in [
        *decoded(PHOTOS[:3], image_size),
        image_input.load_image(SMALL_JPEG).rotate(90, expand=True),
    ]:
        np.testing.assert_allclose(
            image_input.model_input(image, meta), transform(image).numpy(), rtol=0, atol=1e-6
        )


def test_engine_answers_as_torch_does(served):
    onnx_engine, network, meta = served
    images = decoded(PHOTOS, meta["image_size"])
    facts = [image_input.image_facts(image, meta["image_size"]) for image in images]
    logits, stage_means, _ = onnx_engine.outputs(onnx_engine.batch(images))
    ours = scoring.ScoringRules(onnx_engine.meta).answers(logits, stage_means, facts)
    batch = torch.stack([torch_reference.checkpoint_transform(meta)(image) for image in images])
    torch_logits, torch_stage_means = backbones.network_outputs(network, batch, torch.device("cpu"))
    theirs = scoring.ScoringRules(meta).answers(torch_logits, torch_stage_means, facts)
    for one, other in zip(ours, theirs, strict=True):
        assert one["probability"] == pytest.approx(other["probability"], abs=1e-4)
        assert one["ood_score"] == pytest.approx(other["ood_score"], rel=1e-3)
        for field in ("label", "threshold", "calibrated", "reliable", "reasons", "warnings"):
            assert one[field] == other[field], field


def test_heat_map_is_grad_cam(served):
    """The class activation map from the engine's forward pass is pytorch_grad_cam's Grad-CAM."""
    onnx_engine, network, meta = served
    images = decoded(PHOTOS[:4], meta["image_size"])
    batch = onnx_engine.batch(images)
    logits, _, feature_maps = onnx_engine.outputs(batch)
    for label in (lesion_labels.MELANOMA, lesion_labels.NON_MELANOMA):
        labels = [label] * len(images)
        ours = onnx_engine.heatmaps(feature_maps, logits, labels)
        theirs = grad_cam_masks(network, torch.from_numpy(batch), labels)
        assert ours.shape == theirs.shape
        for one, other in zip(ours, theirs, strict=True):
            assert one.min() >= 0 and one.max() <= 1
            if other.max() == 0:  # no channel speaks for this label anywhere: both maps are empty
                assert one.max() == 0
            else:
                assert np.corrcoef(one.ravel(), other.ravel())[0, 1] > 0.999


def test_a_diagnosis_head_serves_its_melanoma_probability_and_grad_cam(tmp_path):
    """A diagnosis head through the engine: the melanoma output's softmax probability, and for
    each label the Grad-CAM of the output heatmaps.heatmap_outputs picks."""
    checkpoint = make_varied_checkpoint(tmp_path / "best_model.pth", PHOTOS, diagnoses=["bkl", "mel", "nv"])
    served = engine.OnnxEngine(export.export_onnx(checkpoint, onnx_file.path_beside(checkpoint)))
    network, meta = checkpoints.load_scoring_model(checkpoint)
    batch = served.batch(decoded(PHOTOS[:4], meta["image_size"]))
    logits, _, feature_maps = served.outputs(batch)
    assert logits.shape == (4, 3)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(
        scoring.ScoringRules(served.meta).probabilities(logits), softmax[:, 1], rtol=1e-9
    )
    for label in (lesion_labels.MELANOMA, lesion_labels.NON_MELANOMA):
        labels = [label] * len(batch)
        outputs = heatmaps.heatmap_outputs(logits, labels, meta)
        assert (set(outputs) == {1}) if label == lesion_labels.MELANOMA else (1 not in outputs)
        ours = served.heatmaps(feature_maps, logits, labels)
        theirs = grad_cam_masks(network, torch.from_numpy(batch), outputs)
        for one, other in zip(ours, theirs, strict=True):
            if other.max() > 0:
                assert np.corrcoef(one.ravel(), other.ravel())[0, 1] > 0.999


def test_dihedral_views_are_torchs():
    batch = np.random.default_rng(0).random((2, 3, 5, 5), dtype=np.float32)
    ours = list(engine.dihedral_views(batch))
    theirs = list(torch_reference.dihedral_views(torch.from_numpy(batch)))
    assert len(ours) == len(theirs) == 8
    for one, other in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(one, other.numpy())
        assert one.flags.c_contiguous


def test_a_checkpoint_alone_is_exported_once_beside_it(trusted_checkpoint, tmp_path, capsys):
    checkpoint = Path(shutil.copy(trusted_checkpoint, tmp_path / "best_model.pth"))
    onnx_path = tmp_path / "best_model.onnx"
    assert isinstance(engine.load_network(checkpoint), engine.OnnxEngine)
    assert capsys.readouterr().err.strip() == f"{checkpoint}: exported once to {onnx_path} for ONNX Runtime"
    exported = onnx_path.stat().st_mtime_ns
    again = engine.load_network(checkpoint)
    assert again.meta["checkpoint_sha256"] == files.file_sha256(checkpoint)
    assert onnx_path.stat().st_mtime_ns == exported and capsys.readouterr().err == ""
    assert isinstance(engine.load_network(onnx_path), engine.OnnxEngine)
    # Retrained since the export: the .onnx beside it is stale, and is exported again.
    retrained = make_random_checkpoint(checkpoint)
    assert engine.load_network(retrained).meta["checkpoint_sha256"] == files.file_sha256(retrained)
    assert "exported once" in capsys.readouterr().err


def test_a_checkpoint_in_a_folder_it_cannot_write_is_exported_to_a_temporary_file(
    trusted_checkpoint, tmp_path, monkeypatch, capsys
):
    """Scored by ONNX Runtime all the same, and nothing is left behind anywhere. The folder is
    made unwritable for this process alone (root writes where the permission bits say no, and
    another user may not be able to read this clone at all), so the test does not depend on
    where the clone lives or who runs it."""
    checkpoint = Path(shutil.copy(trusted_checkpoint, tmp_path / "best_model.pth"))
    monkeypatch.setattr(engine, "can_write_in", lambda folder: Path(folder) != tmp_path)
    before = set(Path(tempfile.gettempdir()).glob("skin-lesion-onnx-*"))
    assert engine.load_network(checkpoint).engine == "onnxruntime"
    error = capsys.readouterr().err
    assert "exported to a temporary file" in error and "not writable" in error
    assert list(tmp_path.iterdir()) == [checkpoint]
    assert set(Path(tempfile.gettempdir()).glob("skin-lesion-onnx-*")) == before


def test_whether_a_folder_is_writable_is_tried_not_read_from_its_permission_bits(tmp_path):
    assert engine.can_write_in(tmp_path)
    assert not engine.can_write_in(Path("/proc"))  # refuses new files, even to root
    assert not engine.can_write_in(tmp_path / "missing")


def test_a_missing_or_foreign_onnx_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(errors.CheckpointError, match="not found"):
        engine.load_network(tmp_path / "best_model.onnx")
    (tmp_path / "notes.onnx").write_text("not a network")
    with pytest.raises(errors.CheckpointError, match="not a network exported"):
        engine.load_network(tmp_path / "notes.onnx")


def test_an_onnx_file_is_served_without_torch(trusted_checkpoint, tmp_path):
    """The real server and predict.py, given the .onnx file: answers with heat maps, and no torch
    in the process (no torch library mapped into the server; `torch` not in predict.py's
    sys.modules)."""
    onnx_path = onnx_file.path_beside(trusted_checkpoint)
    with app_harness.running_server(onnx_path, "--threads", "2") as (url, process):
        status, answer, _ = app_harness.post_file(url, SMALL_JPEG.read_bytes(), explain=True)
        assert status == 200 and answer["model"]["engine"] == "onnxruntime" and answer["heatmap"]
        assert "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text()

    out = tmp_path / "predictions.csv"
    argv = [str(ROOT / "predict.py"), SMALL_JPEG, HAM_JPEG, "--model", onnx_path, "--out", out]
    argv += ["--heatmaps", tmp_path / "heatmaps", "--workers", "1"]
    result = run_python(
        f"import runpy, sys\nsys.argv = {list(map(str, argv))!r}\n"
        f"try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        f"finally:\n    print('torch' in sys.modules)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert len(list((tmp_path / "heatmaps").glob("*.png"))) == 2


def run_python(code):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
