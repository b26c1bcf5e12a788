"""Heat maps: the regions that drove the answer (the app's `?explain=1`, predict.py --heatmaps).
Each network gives its last feature maps; here they become a mask and its picture. Torch-free."""

import io

import numpy as np
from PIL import Image

from lesion_labels import MELANOMA
from scoring import melanoma_output

HEATMAP_MAX_SIDE = 384


def heatmap_outputs(logits, labels, meta):
    """The output whose heat map explains each image's label: the label itself for a two-class
    head; for a diagnosis head, the melanoma output for a melanoma label, else the most likely
    other diagnosis (the lesion the network took it for)."""
    melanoma_index = melanoma_output(meta)
    if not meta.get("diagnoses"):
        return [int(label) for label in labels]
    others = np.asarray(logits, dtype=np.float64).copy()
    others[:, melanoma_index] = -np.inf
    return [
        melanoma_index if label == MELANOMA else int(np.argmax(row))
        for label, row in zip(labels, others, strict=True)
    ]


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


def heatmap_png(image, mask):
    """A heat map mask ((H, W) floats in [0, 1]) laid over the decoded PIL image (its aspect
    kept, at most HEATMAP_MAX_SIDE a side), half and half, as the bytes of a PNG file."""
    shown = image.copy()
    shown.thumbnail((HEATMAP_MAX_SIDE, HEATMAP_MAX_SIDE))
    # The model saw the image squeezed to a square: stretching the mask back undoes that.
    mask = np.asarray(Image.fromarray(mask).resize(shown.size, Image.Resampling.BILINEAR))
    overlay = 0.5 * jet_colours(mask) + 0.5 * np.asarray(shown, dtype=np.float32) / 255
    png = io.BytesIO()
    Image.fromarray(np.uint8(255 * overlay / overlay.max())).save(png, format="PNG")
    return png.getvalue()


def jet_colours(mask):
    """The jet colour map (blue, cyan, yellow, red) of a mask in [0, 1], as RGB in [0, 1]:
    OpenCV's COLORMAP_JET, which the heat maps were drawn with before, is this piecewise-linear
    formula on 256 levels (within half a level)."""
    levels = np.uint8(255 * np.clip(mask, 0, 1)) / 255
    return np.stack([np.clip(1.5 - np.abs(4 * levels - centre), 0, 1) for centre in (3, 2, 1)], axis=-1)
