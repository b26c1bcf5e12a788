"""Checkpoints (DESIGN.md, "Checkpoint"): best_model.pth written atomically with its metadata, read
back (an original project's bare state_dict too), and scored by torch through the engine's
interface (`TorchNetwork`)."""

import datetime

import numpy as np
import torch
import torchvision

from backbones import (
    DEFAULT_ARCH,
    SkinLesionModel,
    backbone_named,
    fold_batch_norms,
    model_for_inference,
    saved_dict,
    scoring_outputs,
)
from devices import choose_device
from errors import CheckpointError, UserError
from files import atomic_output
from heatmaps import class_activation_maps, heatmap_outputs
from image_input import model_input
from lesion_labels import CLASS_NAMES


def load_scoring_model(path, device="cpu"):
    """`load_checkpoint` with batch norms folded: the network analysis and the app both score.

    On CUDA it also turns TF32 off for the rest of the process: cuDNN's default TF32
    convolutions moved probabilities measurably from the CPU's (docs/measurements.md), and the
    stored threshold must mean the same on every device."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    model, meta = load_checkpoint(path, device)
    return fold_batch_norms(model), meta


class TorchNetwork:
    """A checkpoint scored by torch (`load_scoring_model`), answering as engine.OnnxEngine does:
    for a checkpoint without its exported network, or CUDA without ONNX Runtime's CUDA provider."""

    engine = "torch"

    def __init__(self, checkpoint_path, device="cpu", threads=None):
        if threads:
            torch.set_num_threads(threads)
        self.device = choose_device(device)
        self.model, self.meta = load_scoring_model(checkpoint_path, self.device)
        self.classifier_weight = self.model.classifier_weight.detach().cpu().numpy()
        self.threads = torch.get_num_threads()

    def batch(self, images):
        return np.stack([model_input(image, self.meta) for image in images])

    def outputs(self, batch):
        return scoring_outputs(self.model, torch.from_numpy(batch), self.device)

    def heatmaps(self, feature_maps, logits, labels):
        outputs = heatmap_outputs(logits, labels, self.meta)
        return class_activation_maps(feature_maps, self.classifier_weight, outputs, self.meta["image_size"])


def checkpoint_metadata(
    arch=DEFAULT_ARCH,
    image_size=None,
    threshold=0.5,
    weights="none",
    epoch=None,
    val_metrics=None,
    **extra,
):
    """The plain metadata stored beside the weights (DESIGN.md, "Checkpoint"): the backbone
    (`arch`), its normalisation, and the image size (the backbone's own when None).

    `extra` adds further plain values (str, numbers, lists, dicts), e.g. the threshold rule, or
    `targets` "diagnosis" with the head's `diagnoses` (its outputs, in order). `class_names` stay
    the two answers every stage gives, whatever the head.
    """
    backbone = backbone_named(arch)
    image_size = image_size or backbone.image_size
    mean, std = backbone.mean, backbone.std
    return {
        "arch": backbone.name,
        "class_names": list(CLASS_NAMES),
        "targets": "melanoma",
        "image_size": int(image_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "threshold": float(threshold),
        "weights": str(weights),
        "epoch": epoch,
        "val_metrics": dict(val_metrics or {}),
        "trained_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)},
        **extra,
    }


def atomic_torch_save(obj, path):
    """torch.save to a temporary file beside `path`, then rename: never a half-written file."""
    with atomic_output(path) as file:
        torch.save(obj, file)


def save_checkpoint(path, model, meta):
    """Write `best_model.pth`: the model's state_dict plus the metadata of `checkpoint_metadata`."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    atomic_torch_save({**meta, "model_state": state}, path)


def load_checkpoint(path, device="cpu"):
    """(model in eval mode on `device`, metadata) from a checkpoint or an original bare state_dict."""
    missing = "checkpoint not found (train first with model.py, or pass --model PATH)"
    saved = saved_dict(path, CheckpointError, "checkpoint", missing)
    if "model_state" in saved:
        meta = {key: value for key, value in saved.items() if key != "model_state"}
        state = saved["model_state"]
    else:
        meta = {
            **checkpoint_metadata(),
            "weights": "unknown (original project state_dict)",
            "trained_at": None,
        }
        state = original_state_dict_to_ours(saved)
    outputs, arch = head_size(meta), meta.get("arch", DEFAULT_ARCH)
    try:
        model = SkinLesionModel(arch, num_classes=outputs)
        model.load_state_dict(state)
    except UserError as error:
        raise CheckpointError(f"{path}: {error}") from None
    except RuntimeError as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise CheckpointError(
            f"{path}: weights do not fit {arch} with {outputs} outputs ({first_line})"
        ) from None
    return model_for_inference(model, device), meta


def head_size(meta):
    """Outputs of the checkpoint's head: one per diagnosis (`diagnoses`), else melanoma or not."""
    return len(meta.get("diagnoses") or CLASS_NAMES)


def original_state_dict_to_ours(state):
    """The original head was a single Linear (`classifier.weight`); ours is Dropout + Linear."""
    renamed = {}
    for name, tensor in state.items():
        for part in ("weight", "bias"):
            if name == f"efficientnet.classifier.{part}":
                name = f"efficientnet.classifier.1.{part}"
        renamed[name] = tensor
    return renamed
