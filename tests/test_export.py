"""best_model.onnx: the scoring network as an ONNX graph, written by model.py and predict.py --export."""

import json

import numpy as np
import onnx
import onnxruntime
import torch
import torchvision
from conftest import HAM_JPEG, SMALL_JPEG, TINY_IMAGE_SIZE, assert_one_line_error, run_script

import backbones
import checkpoints
import files
import image_input
import onnx_file
import torch_reference


def onnx_outputs(onnx_path, batch):
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    return session.run(None, {onnx_file.INPUT: batch.numpy()})


def stored_metadata(onnx_path):
    props = {prop.key: prop.value for prop in onnx.load(onnx_path).metadata_props}
    return json.loads(props[onnx_file.METADATA_KEY])


def image_batch(meta, photos):
    transform = torch_reference.checkpoint_transform(meta)
    return torch.stack([transform(image_input.load_image(photo)) for photo in photos])


def test_model_py_exports_the_scoring_network_with_its_rules(trusted_checkpoint):
    """fit_scoring_rules (end of training) writes best_model.onnx beside best_model.pth: the same
    logits, stage means and last feature map as the folded torch network, for any batch size."""
    onnx_path = onnx_file.path_beside(trusted_checkpoint)
    network, meta = checkpoints.load_scoring_model(trusted_checkpoint)
    for photos in ([SMALL_JPEG], [SMALL_JPEG, HAM_JPEG, SMALL_JPEG]):
        batch = image_batch(meta, photos)
        logits, *stage_means, last_feature_map = onnx_outputs(onnx_path, batch)
        torch_logits, torch_stage_means = backbones.network_outputs(network, batch, torch.device("cpu"))
        np.testing.assert_allclose(logits, torch_logits, atol=1e-5)
        assert len(stage_means) == len(torch_stage_means) == len(network.efficientnet.features)
        for ours, theirs in zip(stage_means, torch_stage_means, strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)  # float rounding
        assert last_feature_map.shape == (len(photos), 1280, TINY_IMAGE_SIZE // 32, TINY_IMAGE_SIZE // 32)

    stored = stored_metadata(onnx_path)
    assert stored["checkpoint_sha256"] == files.file_sha256(trusted_checkpoint)
    for key in ("image_size", "mean", "std", "threshold", "calibration", "quality"):
        assert stored[key] == meta[key]
    assert stored["ood"]["threshold"] == meta["ood"]["threshold"]
    for ours, theirs in zip(stored["ood"]["stages"], meta["ood"]["stages"], strict=True):
        np.testing.assert_array_equal(ours["precision"], theirs["precision"].numpy())
        np.testing.assert_array_equal(ours["class_means"], theirs["class_means"].numpy())
    weight = network.efficientnet.classifier[-1].weight.detach().numpy()
    np.testing.assert_array_equal(np.float32(stored["classifier_weight"]), weight)


def test_predict_exports_an_original_bare_state_dict(tmp_path):
    original = torchvision.models.efficientnet_v2_s()
    original.classifier = torch.nn.Linear(1280, 2)
    checkpoint = tmp_path / "melanoma.pth"
    torch.save({f"efficientnet.{name}": tensor for name, tensor in original.state_dict().items()}, checkpoint)

    result = run_script("predict.py", "--export", "--model", checkpoint)

    assert result.returncode == 0, result.stderr
    stored = stored_metadata(tmp_path / "melanoma.onnx")
    assert "original" in stored["weights"] and "calibration" not in stored
    batch = image_batch(stored, [SMALL_JPEG])
    network, _ = checkpoints.load_scoring_model(checkpoint)
    torch_logits, _ = backbones.network_outputs(network, batch, torch.device("cpu"))
    np.testing.assert_allclose(onnx_outputs(tmp_path / "melanoma.onnx", batch)[0], torch_logits, atol=1e-4)


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path):
    assert_one_line_error(run_script("predict.py", "--export", "--model", tmp_path / "none.pth"))
    assert not (tmp_path / "none.onnx").exists()
