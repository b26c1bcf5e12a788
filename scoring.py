"""What serving needs besides the network, without torch: the engine's file format and the
network's input and heat map computed with NumPy and Pillow.

`common.py` (torch) exports the network into the format read here; `engine.py` runs it.
"""

import hashlib

import numpy as np
from PIL import Image


class UserError(Exception):
    """Bad input from the person running a command: shown as one line, exit code 2."""


class ImageError(UserError):
    """An image that cannot be decoded safely."""


class CheckpointError(UserError):
    """A model file that cannot be loaded."""


ONNX_INPUT = "images"
ONNX_METADATA_KEY = "skin_lesion_classification"  # metadata_props entry: the checkpoint's metadata as JSON


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def model_input(image, meta):
    """A decoded RGB PIL image as the network's normalised input, (3, S, S) float32: what
    `common.checkpoint_transform` computes with torchvision (Resize on a PIL image is Pillow's
    antialiased bilinear resize; ToTensor divides by 255; Normalize subtracts and divides in float32)."""
    size = meta["image_size"]
    pixels = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    mean = np.asarray(meta["mean"], dtype=np.float32)
    std = np.asarray(meta["std"], dtype=np.float32)
    return ((pixels / np.float32(255) - mean) / std).transpose(2, 0, 1)


def class_activation_maps(feature_maps, classifier_weight, labels, size):
    """Each image's heat map for its label, (N, size, size) floats in [0, 1], from the last
    feature maps (N, C, h, w) and the classifier's weights (classes, C).

    The network ends in global average pooling and one linear layer, so Grad-CAM's channel
    weights (the label's logit's gradient, averaged over the map) are that label's row of the
    linear layer divided by h * w, and Grad-CAM is relu(sum_c w_c * A_c): the class activation
    map. Scaled to [0, 1] and resized to the input size as pytorch_grad_cam does (the constant
    1 / (h * w) drops out in the scaling)."""
    weights = np.asarray(classifier_weight, dtype=np.float32)[list(labels)]
    maps = np.maximum(np.einsum("nc,nchw->nhw", weights, feature_maps), 0)
    return np.stack([resized(scaled_to_unit(one_map), size) for one_map in maps])


def scaled_to_unit(values):
    values = values - values.min()
    return values / (1e-7 + values.max())


def resized(values, size):
    """A float map resized with bilinear interpolation to size x size."""
    return np.asarray(
        Image.fromarray(values.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR)
    )
