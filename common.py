"""What the four stages share: labels, file names, images, the model, checkpoints, devices.

Its torch-free parts (images from outside, the answer's rules, heat map pictures, command lines)
live in scoring.py, which serving without torch imports instead; they are re-exported here.

Nothing stage-specific lives here. Every stage reads image size, normalisation and the
decision threshold from the checkpoint (see docs/design.md), through the helpers below.
"""

import argparse
import csv
import datetime
import functools
import io
import itertools
import json
import os
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torchvision
from PIL import Image, ImageFile, ImageOps
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision import transforms
from tqdm import tqdm

# The torch-free parts live in scoring.py (the serving path imports no torch); the stages use
# them as common.NAME.
from scoring import (
    ALLOWED_FORMATS_TEXT,
    ARCH,
    CLASS_NAMES,
    DEFAULT_IMAGE_SIZE,
    HEATMAP_MAX_SIDE,
    IMAGE_FACTS,
    IMAGE_SUFFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAGIC_NUMBERS,
    MAX_ASPECT_RATIO,
    MAX_IMAGE_PIXELS,
    MELANOMA,
    MELANOMA_DIAGNOSIS,
    MIN_IMAGE_SIDE,
    NON_MELANOMA,
    NOT_A_LESION,
    ONNX_INPUT,
    ONNX_METADATA_KEY,
    QUALITY_PERCENTILE,
    QUALITY_STATISTICS,
    QUALITY_WARNINGS,
    UNKNOWN_DIAGNOSIS,
    ArgumentParser,
    CheckpointError,
    ImageError,
    ScoringRules,
    UnsupportedImageFormat,
    UserError,
    as_arrays,
    atomic_output,
    atomic_write_text,
    available_cores,
    bounded_int,
    class_activation_maps,
    current_umask,
    decode_image_bytes,
    detect_format,
    exits_on_user_error,
    file_sha256,
    fraction,
    heatmap_outputs,
    heatmap_png,
    image_facts,
    load_image,
    mahalanobis_distances,
    melanoma_log_odds,
    melanoma_output,
    melanoma_probability,
    model_input,
    non_negative_float,
    non_negative_int,
    onnx_path_beside,
    ood_scores,
    port_number,
    positive_float,
    positive_int,
    show_progress,
    shown_probability,
    size_warnings,
    to_rgb,
)

# --- labels and the prepared-tree file convention ------------------------------------------

FILE_PREFIX = {MELANOMA: "mel_", NON_MELANOMA: "nomel_"}


def label_from_filename(name):
    """1 for `mel_*`, 0 for `nomel_*`, None for any other file."""
    name = os.path.basename(name)
    if not name.lower().endswith(IMAGE_SUFFIXES):
        return None
    if name.startswith(FILE_PREFIX[MELANOMA]):
        return MELANOMA
    if name.startswith(FILE_PREFIX[NON_MELANOMA]):
        return NON_MELANOMA
    return None


def prepared_filename(label, image_id, augmented_index=None, suffix=".jpg"):
    """`mel_ISIC_1.jpg`, `nomel_ISIC_2.jpg`, or `mel_aug_ISIC_1_3.jpg` for an augmented copy."""
    if augmented_index is None:
        return f"{FILE_PREFIX[label]}{image_id}{suffix}"
    return f"{FILE_PREFIX[label]}aug_{image_id}_{augmented_index}{suffix}"


def is_augmented_filename(name):
    return os.path.basename(name).startswith(tuple(f"{p}aug_" for p in FILE_PREFIX.values()))


# --- the prepared tree's manifest.csv (written by prepdata.py, read by analysis.py) ---------

SPLITS = ("train", "val", "test")
MANIFEST_FILE = "manifest.csv"


class ManifestRow(NamedTuple):
    """One written image: where it is, its label, the image it came from, that image's lesion, and
    what the metadata says about it (age in years, sex, body site; '' when not recorded)."""

    split: str
    file: str
    label: int
    source_image: str
    lesion_id: str | None
    augmented: bool
    diagnosis: str = UNKNOWN_DIAGNOSIS  # lower-case code (HAM10000's dx), for model.py --targets diagnosis
    age: str = ""
    sex: str = ""
    localization: str = ""


MANIFEST_COLUMNS = ManifestRow._fields


def diagnosis_for(label, diagnosis):
    """The label decides melanoma: a melanoma is 'mel' whatever else is recorded, and another
    lesion recorded as 'mel' (a metadata file that disagrees with the labels) is 'unknown'."""
    if label == MELANOMA:
        return MELANOMA_DIAGNOSIS
    if not diagnosis or diagnosis == MELANOMA_DIAGNOSIS:
        return UNKNOWN_DIAGNOSIS
    return diagnosis


def write_manifest(path, rows):
    """manifest.csv: the rows in split order (train, val, test), by file name within a split;
    labels as 1/0, an unknown lesion as an empty field, augmented as yes/no."""
    order = {split: index for index, split in enumerate(SPLITS)}
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for row in sorted(rows, key=lambda row: (order[row.split], row.file)):
            augmented = "yes" if row.augmented else "no"
            writer.writerow(row._replace(lesion_id=row.lesion_id or "", augmented=augmented))


def read_manifest(path):
    """The ManifestRows of a manifest.csv (an unknown lesion comes back as '')."""
    try:
        with open(path, newline="", encoding="utf-8") as file:
            return [parsed_manifest_row(row) for row in csv.DictReader(file)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{path}: not a readable manifest ({error})") from None
    except (KeyError, ValueError) as error:
        raise UserError(
            f"{path}: expected columns {','.join(MANIFEST_COLUMNS)} with label 1/0 and augmented "
            f"yes/no ({error})"
        ) from None


def parsed_manifest_row(row):
    """One row; a manifest written before diagnoses were recorded has none ('unknown'), one
    written before age, sex and body site were recorded has them as ''."""
    return ManifestRow(
        split=row["split"],
        file=row["file"],
        label={"1": MELANOMA, "0": NON_MELANOMA}[row["label"]],
        source_image=row["source_image"],
        lesion_id=row["lesion_id"],
        augmented={"yes": True, "no": False}[row["augmented"]],
        diagnosis=(row.get("diagnosis") or UNKNOWN_DIAGNOSIS).strip().lower(),
        age=(row.get("age") or "").strip(),
        sex=(row.get("sex") or "").strip().lower(),
        localization=(row.get("localization") or "").strip().lower(),
    )


def eval_transform(image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The one deterministic transform used to score images (validation, analysis, the app)."""
    return transforms.Compose(
        [
            transforms.Resize((image_size, image_size), antialias=True),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def checkpoint_transform(meta):
    return eval_transform(meta["image_size"], meta["mean"], meta["std"])


def list_prepared_images(folder):
    """Sorted (path, label) pairs of the `mel_`/`nomel_` images directly inside `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    pairs = []
    for path in sorted(folder.iterdir()):
        label = label_from_filename(path.name)
        if label is not None and path.is_file():
            pairs.append((path, label))
    return pairs


class SkinLesionDataset(torch.utils.data.Dataset):
    """Any folder of `mel_*` / `nomel_*` images; the class is the file-name prefix."""

    def __init__(self, folder, transform):
        self.samples = list_prepared_images(folder)
        if not self.samples:
            raise UserError(f"{folder}: no mel_*/nomel_* images in this folder")
        self.transform = transform

    @property
    def labels(self):
        return [label for _, label in self.samples]

    @property
    def paths(self):
        return [path for path, _ in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return self.transform(load_image(path)), label


class ScoringDataset(SkinLesionDataset):
    """A folder of `mel_`/`nomel_` images scored as the app scores an upload: the checkpoint's
    transform, plus each image's `image_facts` (as a tensor in IMAGE_FACTS order)."""

    def __init__(self, folder, meta, originals_only=False):
        super().__init__(folder, checkpoint_transform(meta))
        if originals_only:  # augmented copies are not images the model will ever be shown
            self.samples = [sample for sample in self.samples if not is_augmented_filename(sample[0])]
        self.image_size = meta["image_size"]

    def __getitem__(self, index):
        path, label = self.samples[index]
        image = load_image(path, min_size=self.image_size)  # decoded as the app decodes an upload
        facts = image_facts(image, self.image_size)
        return self.transform(image), torch.tensor([facts[name] for name in IMAGE_FACTS]), label


# --- the model -------------------------------------------------------------------------------


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


# --- devices and mixed precision -------------------------------------------------------------


def choose_device(name="auto"):
    """'auto' picks CUDA when present; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)") from None


def cpu_has_native_bf16():
    """AMX or AVX512-BF16: bf16 autocast is then much faster than fp32 on the CPU."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def choose_amp_dtype(device, amp="auto"):
    """The autocast dtype for `--amp auto|bf16|fp16|off`; None means full fp32."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise UserError("--amp fp16 needs a CUDA GPU; on the CPU use --amp bf16 or off")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def autocast(device, amp_dtype):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def amp_name(amp_dtype):
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]


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


def load_scoring_model(path, device="cpu"):
    """`load_checkpoint` with batch norms folded: the network analysis and the app both score.

    On CUDA it also turns TF32 off for the rest of the process: cuDNN's default TF32
    convolutions moved predict.py's probabilities by up to 0.0066 from the CPU's on the bundled
    sample (an H200, a random-weight network with real batch-norm statistics), and the stored
    threshold must mean the same on every device."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    model, meta = load_checkpoint(path, device)
    return fold_batch_norms(model), meta


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
    fp32: bf16 moved a trained checkpoint's probabilities by up to 0.011 on 1,604 HAM10000
    validation images (over the 0.01 rule), and every consumer must score alike for the stored
    threshold to mean the same thing everywhere.
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


class TorchNetwork:
    """A checkpoint scored by torch (`load_scoring_model`), answering as engine.OnnxEngine does:
    for a checkpoint without its exported network, or CUDA without ONNX Runtime's CUDA provider."""

    engine = "torch"

    def __init__(self, checkpoint_path, device="cpu", threads=None):
        if threads:
            torch.set_num_threads(threads)
        self.device = choose_device(device)
        self.model, self.meta = load_scoring_model(checkpoint_path, self.device)
        self.classifier_weight = self.model.efficientnet.classifier[-1].weight.detach().cpu().numpy()
        self.threads = torch.get_num_threads()

    def batch(self, images):
        return np.stack([model_input(image, self.meta) for image in images])

    def outputs(self, batch):
        return scoring_outputs(self.model, torch.from_numpy(batch), self.device)

    def heatmaps(self, feature_maps, logits, labels):
        outputs = heatmap_outputs(logits, labels, self.meta)
        return class_activation_maps(feature_maps, self.classifier_weight, outputs, self.meta["image_size"])


def as_float64(tensor):
    return tensor.double().cpu().numpy()


def dihedral_views(images):
    """The 8 flips/rotations of a batch of square images: nothing is cropped or filled in."""
    for oriented in (images, images.flip(-1)):
        for quarter_turns in range(4):
            yield torch.rot90(oriented, quarter_turns, dims=(-2, -1))


@dataclass
class ScoredImages:
    """A scored folder, in dataset order: labels, logits, stage means (one array per stage, as
    `network_outputs` gives them), image facts."""

    labels: np.ndarray
    logits: np.ndarray
    stage_means: list
    facts: list


def score_dataset(model, dataset, device, batch_size=32, workers=0, tta=False, description="Scoring"):
    """Run a ScoringDataset through the network. With `tta`, the logits are the mean over the 8
    flips/rotations of each image; the stage means always come from the image as it is."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda"
    )
    parts = {"labels": [], "logits": [], "stage_means": [], "facts": []}
    with tqdm(
        total=len(dataset), unit="img", desc=description, disable=not show_progress(), leave=False
    ) as progress:
        for images, facts, labels in batches_with_readable_errors(loader):
            logits, stage_means = batch_outputs(model, images, device, tta)
            parts["labels"].append(labels.numpy())
            parts["logits"].append(logits)
            parts["stage_means"].append(stage_means)
            parts["facts"] += [dict(zip(IMAGE_FACTS, row.tolist(), strict=True)) for row in facts]
            progress.update(len(images))
    return ScoredImages(
        np.concatenate(parts["labels"]),
        np.concatenate(parts["logits"]),
        [np.concatenate(stage) for stage in zip(*parts["stage_means"], strict=True)],
        parts["facts"],
    )


def batch_outputs(model, images, device, tta=False):
    """`network_outputs` of a batch; with `tta`, the logits are the mean over its 8 views."""
    if not tta:
        return network_outputs(model, images, device)
    images = images.to(device, non_blocking=True)  # once, not once per view
    views = [network_outputs(model, view, device) for view in dihedral_views(images)]
    return np.mean([logits for logits, _ in views], axis=0), views[0][1]  # view 0: the image as it is


def batches_with_readable_errors(loader):
    """The loader's batches; an unreadable image stops the run with the image's one-line message.

    A DataLoader worker re-raises an ImageError with the worker's whole traceback as its message;
    the last line of that traceback is `common.ImageError: <the message>`.
    """
    try:
        yield from loader
    except ImageError as error:
        last_line = str(error).strip().splitlines()[-1]
        raise ImageError(last_line.removeprefix("common.ImageError: ")) from None


# --- checkpoints -----------------------------------------------------------------------------


def checkpoint_metadata(
    image_size=DEFAULT_IMAGE_SIZE,
    threshold=0.5,
    weights="none",
    epoch=None,
    val_metrics=None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    **extra,
):
    """The plain metadata stored beside the weights (DESIGN.md, "Checkpoint").

    `extra` adds further plain values (str, numbers, lists, dicts), e.g. the threshold rule, or
    `targets` "diagnosis" with the head's `diagnoses` (its outputs, in order). `class_names` stay
    the two answers every stage gives, whatever the head.
    """
    return {
        "arch": ARCH,
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
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: checkpoint not found (train first with model.py, or pass --model PATH)"
        )
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(error).__name__})") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: not a checkpoint (expected a dict, found {type(saved).__name__})")
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
    outputs = head_size(meta)
    model = SkinLesionModel(num_classes=outputs)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise CheckpointError(
            f"{path}: weights do not fit EfficientNetV2-S with {outputs} outputs ({first_line})"
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


# --- the serving engine's network: best_model.onnx ---------------------------------------------


class ScoringGraph(nn.Module):
    """The folded scoring network as the ONNX graph computes it: logits, every stage's mean over
    the image (what the out-of-distribution score reads), and the last stage's output (what the
    heat map is drawn from), all from one forward pass."""

    def __init__(self, model):
        super().__init__()
        self.network = getattr(model, "module", model).efficientnet

    def forward(self, images):
        logits, stage_means, last_feature_map = forward_with_stages(self.network, images)
        return logits, *stage_means, last_feature_map

    def output_names(self):
        return [
            "logits",
            *(f"stage_mean_{index}" for index in range(len(self.network.features))),
            "last_feature_map",
        ]


def export_onnx(checkpoint_path, onnx_path):
    """Write the checkpoint's scoring network (`load_scoring_model`) as an ONNX graph, atomically:
    input `images` (N, 3, S, S) normalised, the batch dimension dynamic; outputs
    `ScoringGraph.output_names()`. The checkpoint's metadata, the classifier's weights (the heat
    map's channel weights) and the checkpoint file's SHA-256 go into the file's metadata_props."""
    model, meta = load_scoring_model(checkpoint_path)
    graph = ScoringGraph(model).eval()
    size = meta["image_size"]
    # The dynamo exporter (torch's default and recommended one); a batch of 2 as the example,
    # since torch.export specialises a dimension of size 1.
    program = torch.onnx.export(
        graph,
        (torch.zeros(2, 3, size, size),),
        input_names=[ONNX_INPUT],
        output_names=graph.output_names(),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    classifier = graph.network.classifier[-1]
    onnx_meta = {
        **meta,
        "classifier_weight": classifier.weight.detach().tolist(),
        "checkpoint_sha256": file_sha256(checkpoint_path),
    }
    proto = program.model_proto
    proto.metadata_props.add(key=ONNX_METADATA_KEY, value=json.dumps(onnx_meta, default=plain_value))
    with atomic_output(onnx_path) as file:
        file.write(proto.SerializeToString())
    return Path(onnx_path)


def plain_value(value):
    """A tensor or an array as nested lists, for json.dumps (the checkpoint stores tensors)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
