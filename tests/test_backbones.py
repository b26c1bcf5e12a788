"""The backbone registry: EfficientNet-Lite0's pip-shipped ImageNet weights (loaded offline and
checked), every backbone's stages, batch-norm folding and export, checkpoints that name their
backbone."""

import copy

import numpy as np
import pytest
import torch
from conftest import SMALL_JPEG, TINY_IMAGE_SIZE
from matplotlib import cbook

import backbones
import checkpoints
import engine
import export
import image_input

LITE0 = "efficientnet_lite0"
# ImageNet's class 652, "military uniform": the classic answer for this photo of Grace Hopper.
MILITARY_UNIFORM = 652


@pytest.fixture(scope="module")
def lite0_imagenet():
    backbone = backbones.BACKBONES[LITE0]
    network = backbone.build()
    backbone.load_imagenet(network, "imagenet")
    return network.eval()


def test_lite0s_shipped_imagenet_weights_name_a_real_photo(lite0_imagenet):
    """A wrong key order or normalisation could load without error; it could not name the photo."""
    backbone = backbones.BACKBONES[LITE0]
    photo = image_input.load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    meta = {"image_size": backbone.image_size, "mean": backbone.mean, "std": backbone.std}
    with torch.inference_mode():
        probabilities = torch.softmax(
            lite0_imagenet(torch.from_numpy(image_input.model_input(photo, meta))[None]), 1
        )
    assert int(probabilities.argmax()) == MILITARY_UNIFORM and float(probabilities.max()) > 0.3


def test_weights_that_do_not_fit_name_the_first_tensor_that_does_not(lite0_imagenet, tmp_path):
    """Loaded by position, each tensor is checked for its shape and its kind (weight, bias,
    running mean, ...): a shifted list fails at its first wrong tensor, in one line."""
    state = list(lite0_imagenet.state_dict().items())
    shifted = [state[0], ("_bn0.running_mean", state[2][1]), *state[2:]]  # a bias where a weight goes
    torch.save(dict(shifted), tmp_path / "shifted.pth")
    with pytest.raises(
        backbones.WeightsUnavailable, match=r"tensor 1 _bn0\.running_mean \(32,\) does not fit"
    ):
        backbones.SkinLesionModel(LITE0, weights=str(tmp_path / "shifted.pth"))
    torch.save(dict(state[:-1]), tmp_path / "short.pth")
    with pytest.raises(backbones.WeightsUnavailable, match="295 tensors, but the network has 296"):
        backbones.SkinLesionModel(LITE0, weights=str(tmp_path / "short.pth"))


@pytest.mark.parametrize("arch", sorted(backbones.BACKBONES))
def test_stages_end_in_what_the_classifier_reads_and_folding_keeps_the_function(arch):
    torch.manual_seed(0)
    model = backbones.SkinLesionModel(arch).eval()
    images = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    with torch.inference_mode():
        logits, stage_means, feature_map = model.forward_with_stages(images)
        assert torch.equal(logits, model(images))
        assert torch.equal(stage_means[-1], feature_map.mean(dim=(2, 3)))
        assert feature_map.shape[1] == model.classifier_weight.shape[1]
        folded = backbones.fold_batch_norms(copy.deepcopy(model))
        folded_logits, folded_means, _ = folded.forward_with_stages(images)
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in folded.modules())
    activations = (torch.nn.ReLU6, torch.nn.SiLU)
    count = lambda network: sum(isinstance(module, activations) for module in network.modules())  # noqa: E731
    assert count(folded) == count(model)  # timm's norms carry their activation: it stays
    assert torch.allclose(folded_logits, logits, atol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-3) for a, b in zip(folded_means, stage_means, strict=True))


def test_a_lite0_checkpoint_names_its_backbone_and_serves_through_the_engine(tmp_path):
    torch.manual_seed(0)
    model = backbones.SkinLesionModel(LITE0, weights="imagenet")
    path = tmp_path / "best_model.pth"
    checkpoints.save_checkpoint(
        path, model, checkpoints.checkpoint_metadata(arch=LITE0, image_size=TINY_IMAGE_SIZE)
    )
    loaded, meta = checkpoints.load_checkpoint(path)
    assert (meta["arch"], meta["mean"], meta["std"]) == (LITE0, [0.5] * 3, [0.5] * 3)
    assert checkpoints.checkpoint_metadata(arch=LITE0)["image_size"] == 224  # its own size by default
    network = engine.OnnxEngine(export.export_onnx(path, tmp_path / "best_model.onnx"))
    batch = network.batch([image_input.load_image(SMALL_JPEG)])
    logits, stage_means, feature_maps = network.outputs(batch)
    torch_logits, torch_means = backbones.network_outputs(
        backbones.fold_batch_norms(loaded), torch.from_numpy(batch), torch.device("cpu")
    )
    assert len(stage_means) == len(torch_means) == 9 and feature_maps.shape[1] == 1280
    np.testing.assert_allclose(logits, torch_logits, atol=1e-4)
