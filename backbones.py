"""The network: a backbone with a melanoma (or diagnosis) head, its forward pass with the stage
outputs the out-of-distribution score reads, and batch-norm folding for scoring."""

import itertools
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCH = "efficientnet_v2_s"
DEFAULT_IMAGE_SIZE = 384


class WeightsUnavailable(UserError):
    pass


class SkinLesionModel(nn.Module):
    """torchvision EfficientNetV2-S with a two-class head, or one output per diagnosis
    (`num_classes`); the dropout before it is kept.

    The backbone sits in the attribute `efficientnet`, as in the original project, so its
    bare state_dicts still load (see `load_checkpoint`).
    """

    def __init__(self, weights="none", dropout=0.2, num_classes=2):
        super().__init__()
        self.efficientnet = torchvision.models.efficientnet_v2_s()
        if weights != "none":
            self.efficientnet.load_state_dict(imagenet_state_dict(weights))
        in_features = self.efficientnet.classifier[1].in_features
        self.efficientnet.classifier = nn.Sequential(
            nn.Dropout(p=dropout, inplace=True), nn.Linear(in_features, num_classes)
        )

    def forward(self, x):
        return self.efficientnet(x)


def imagenet_state_dict(weights):
    """ImageNet weights for the backbone: 'imagenet' (torchvision cache or download) or a file."""
    if weights == "imagenet":
        source = torchvision.models.EfficientNet_V2_S_Weights.IMAGENET1K_V1
        try:
            return source.get_state_dict(progress=False, check_hash=True)
        except Exception as error:  # urllib, socket and hash errors all mean "not available"
            hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(source.url).name
            raise WeightsUnavailable(
                f"ImageNet weights are not in the cache and could not be downloaded ({error}); "
                f"place {source.url} at {hub}, pass --weights PATH, or train from scratch "
                f"with --weights none"
            ) from None
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailable(f"{path}: weights file not found (or use --weights imagenet|none)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightsUnavailable(f"{path}: not a torchvision EfficientNetV2-S state_dict ({error})") from None


def model_for_inference(model, device):
    """Eval mode, on `device`, channels_last (faster convolutions on CPU and GPU)."""
    return model.to(device, memory_format=torch.channels_last).eval()


def fold_batch_norms(model):
    """Fold each eval-mode BatchNorm2d into the Conv2d just before it, in place (inference only).

    The same function with fewer operations: a faster forward pass on the CPU (figures in
    docs/measurements.md), and probabilities move by float rounding only. Returns the model."""
    for module in list(model.modules()):
        for (conv_name, conv), (norm_name, norm) in itertools.pairwise(list(module.named_children())):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(module, norm_name, nn.Identity())
    return model


def forward_with_stages(network, x):
    """(logits, each stage's output averaged over the image, the last stage's output) of a
    torchvision EfficientNet: the one forward pass that both torch scoring and the ONNX export run."""
    stage_means = []
    for stage in network.features:
        x = stage(x)
        stage_means.append(x.mean(dim=(2, 3)))
    logits = network.classifier(torch.flatten(network.avgpool(x), 1))
    return logits, stage_means, x


@torch.inference_mode()
def network_outputs(model, images, device):
    """(logits, stage means) of a normalised batch (N, 3, H, W), as float64 arrays.

    The stage means are each stage's output (`features[i]`) averaged over the image, one
    (N, channels) array per stage; the last one is what the classifier's linear layer reads.
    One forward pass gives the answer and what the out-of-distribution score reads. Always
    fp32: bf16 moved a trained checkpoint's probabilities past the 0.01 rule
    (docs/measurements.md), and every consumer must score alike for the stored threshold to mean
    the same thing everywhere.
    """
    logits, stage_means, _ = scoring_outputs(model, images, device)
    return logits, stage_means


@torch.inference_mode()
def scoring_outputs(model, images, device):
    """`network_outputs` plus the last stage's output (N, C, h, w) as float32, for the heat map."""
    network = getattr(model, "module", model).efficientnet
    x = images.to(device, non_blocking=True, memory_format=torch.channels_last)
    logits, stage_means, feature_maps = forward_with_stages(network, x)
    return (
        as_float64(logits),
        [as_float64(means) for means in stage_means],
        feature_maps.float().cpu().numpy(),
    )


def as_float64(tensor):
    return tensor.double().cpu().numpy()
