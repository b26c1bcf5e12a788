"""The serving engine: best_model.onnx run by ONNX Runtime, without torch.

`load_network` picks it for a model file, or torch where it cannot serve (checkpoints.TorchNetwork);
both give `batch(images)`, `outputs(batch)` -> (logits, stage means, last feature maps) and
`heatmaps(feature_maps, logits, labels)`, so every stage scores alike on either. Below them:
image files decoded in worker processes into batches for either network; `score_files`, the one
loop that scores a list of files (analysis.py, model.py's fitting and test summary, the
benchmarks); test-time augmentation on a batch (analysis.py --tta), in NumPy.
"""

import collections
import concurrent.futures
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime
from PIL import Image
from tqdm import tqdm

import cli
import onnx_file
from cli import show_progress
from errors import CheckpointError, ImageError
from files import file_sha256
from heatmaps import class_activation_maps, heatmap_outputs
from image_input import decode_image_bytes, model_input, model_input_and_facts

_ort_errors = onnxruntime.capi.onnxruntime_pybind11_state
ONNX_LOAD_ERRORS = (
    _ort_errors.Fail,
    _ort_errors.InvalidProtobuf,
    _ort_errors.NoSuchFile,
    _ort_errors.InvalidGraph,
)


class OnnxEngine:
    """One ONNX Runtime session of an exported scoring network, and the checkpoint's metadata
    stored in it (`meta`, as `checkpoints.load_checkpoint` gives it, the out-of-distribution
    statistics as nested lists)."""

    engine = "onnxruntime"

    def __init__(self, onnx_path, device="cpu", threads=None):
        options = onnxruntime.SessionOptions()
        # No memory arena: the arena keeps the largest batch's buffers for good, which put the
        # server's peak over its memory budget at no gain in speed (docs/measurements.md).
        options.enable_cpu_mem_arena = False
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(onnx_path), options, providers=providers(device))
            stored = self.session.get_modelmeta().custom_metadata_map[onnx_file.METADATA_KEY]
        except (*ONNX_LOAD_ERRORS, KeyError) as error:
            raise CheckpointError(
                f"{onnx_path}: not a network exported by predict.py --export ({type(error).__name__})"
            ) from None
        self.meta = json.loads(stored)
        self.classifier_weight = np.asarray(self.meta.pop("classifier_weight"), dtype=np.float32)
        self.threads = threads or options.intra_op_num_threads

    @property
    def device(self):
        return "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"

    def batch(self, images):
        """Decoded PIL images as one network input, (N, 3, S, S) float32."""
        return np.stack([model_input(image, self.meta) for image in images])

    def outputs(self, batch):
        """(logits, stage means, last feature maps) of a batch: the first two as float64
        arrays, as `checkpoints.TorchNetwork.outputs` gives them; the feature maps float32 (N, C, h, w)."""
        logits, *stage_means, feature_maps = self.session.run(None, {onnx_file.INPUT: batch})
        return logits.astype(np.float64), [means.astype(np.float64) for means in stage_means], feature_maps

    def heatmaps(self, feature_maps, logits, labels):
        """Each image's heat map for its label (heatmaps.class_activation_maps of the output
        heatmaps.heatmap_outputs picks), at the input size."""
        outputs = heatmap_outputs(logits, labels, self.meta)
        return class_activation_maps(feature_maps, self.classifier_weight, outputs, self.meta["image_size"])


def load_network(model_path, device="auto", threads=None):
    """The network to score with: ONNX Runtime on `model_path` when it is an .onnx file, or on
    the .onnx file exported from the checkpoint `model_path` (`exported_network`); torch on the
    checkpoint (checkpoints.TorchNetwork) only for CUDA without ONNX Runtime's CUDA provider."""
    model_path = Path(model_path)
    cli.check_device(device)
    if model_path.suffix.lower() == ".onnx":
        if not model_path.is_file():
            raise CheckpointError(f"{model_path}: network not found (export one with predict.py --export)")
        return OnnxEngine(model_path, device, threads)
    if wants_cuda_without_provider(device):
        import checkpoints  # torch: the only engine on CUDA here

        return checkpoints.TorchNetwork(model_path, device, threads)
    return exported_network(model_path, device, threads)


def exported_network(checkpoint_path, device="auto", threads=None):
    """The engine on the .onnx file beside the checkpoint when it was exported from this very
    file (its stored SHA-256 says so). Otherwise the checkpoint is exported first (torch needed,
    once): beside it, atomically, so the next load finds it; or, in a folder this process
    cannot write, to a temporary file removed as soon as the session holds the network."""
    if not checkpoint_path.is_file():
        raise CheckpointError(
            f"{checkpoint_path}: checkpoint not found (train first with model.py, or pass --model PATH)"
        )
    beside = onnx_file.path_beside(checkpoint_path)
    network = engine_if_exported_from(beside, checkpoint_path, device, threads)
    if network is not None:
        return network
    import export  # torch: only to export a checkpoint without its exported network

    if can_write_in(checkpoint_path.parent):
        export.export_onnx(checkpoint_path, beside)
        print(f"{checkpoint_path}: exported once to {beside} for ONNX Runtime", file=sys.stderr)
        return OnnxEngine(beside, device, threads)
    with tempfile.TemporaryDirectory(prefix="skin-lesion-onnx-") as folder:
        exported = export.export_onnx(checkpoint_path, Path(folder) / beside.name)
        print(
            f"{checkpoint_path}: exported to a temporary file for ONNX Runtime "
            f"({checkpoint_path.parent} is not writable, so every start exports again)",
            file=sys.stderr,
        )
        return OnnxEngine(exported, device, threads)


def engine_if_exported_from(onnx_path, checkpoint_path, device, threads):
    """The engine on `onnx_path` when that file holds the network exported from the checkpoint
    file as it is now; None when it is missing, unreadable, or from another (older) checkpoint.

    The session is built to read the stored hash: a stale file costs one wasted session, once.
    Reading the metadata alone with the onnx package would cost more (docs/measurements.md)."""
    if not onnx_path.is_file():
        return None
    try:
        network = OnnxEngine(onnx_path, device, threads)
    except CheckpointError:
        return None
    return network if network.meta.get("checkpoint_sha256") == file_sha256(checkpoint_path) else None


def can_write_in(folder):
    """Whether this process can create a file in `folder`: tried, not read from the permission
    bits (root writes where the bits say read-only; a read-only mount refuses even root)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def wants_cuda_without_provider(device):
    return (
        str(device).startswith("cuda")
        and "CUDAExecutionProvider" not in onnxruntime.get_available_providers()
    )


def providers(device):
    """ONNX Runtime's CUDA provider for a CUDA (or auto) device when it is installed, else the CPU's."""
    if str(device) != "cpu" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# --- image files, decoded in worker processes for the network (predict.py, analysis.py, model.py) --


class Decoded(NamedTuple):
    """One file, decoded: its network input and image facts, or why it cannot be scored."""

    index: int  # in the list of files
    pixels: np.ndarray | None  # the network's input (image_input.model_input)
    facts: dict | None
    image: Image.Image | None  # kept only to draw its heat map on
    error: str | None


class ImageFiles:
    """The files to score, each decoded by the app's rule (image_input.decode_image_bytes). A refused
    file becomes a Decoded with its reason, never an error that would stop the scoring."""

    def __init__(self, files, meta, keep_images=False):
        self.files = files
        self.meta = meta
        self.image_size = meta["image_size"]
        self.keep_images = keep_images

    def batch(self, indices):
        """(the decoded images' inputs stacked, or None when none decoded; the Decoded items
        without them): one array crosses from a worker process per batch, not one per image."""
        items = [self.decoded(index) for index in indices]
        inputs = [item.pixels for item in items if item.error is None]
        return (np.stack(inputs) if inputs else None), [item._replace(pixels=None) for item in items]

    def decoded(self, index):
        try:
            image = read_image_file(self.files[index], self.image_size)
        except ImageError as error:
            return Decoded(index, None, None, None, str(error))
        pixels, facts = model_input_and_facts(image, self.meta)
        return Decoded(index, pixels, facts, image if self.keep_images else None, None)


def read_image_file(path, image_size):
    """The image in the file at `path`, decoded and accepted as the app accepts an upload."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ImageError(f"cannot read the file ({error.strerror or error})") from None
    return decode_image_bytes(data, image_size)


def decoded_batches(image_files, batch_size, workers):
    """`image_files.batch` of each run of `batch_size` files, in order, decoded by `workers`
    processes (0: in this one). At most two batches per worker wait decoded ahead of the
    network, so memory stays bounded however many files there are."""
    count = len(image_files.files)
    batches = [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    if workers == 0:
        yield from map(image_files.batch, batches)
        return
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(batches))) as pool:
        waiting = collections.deque()
        for indices in batches:
            waiting.append(pool.submit(image_files.batch, indices))
            if len(waiting) > 2 * workers:
                yield waiting.popleft().result()
        while waiting:
            yield waiting.popleft().result()


# --- scoring a list of image files: the one loop every stage that scores a folder runs -----------


@dataclass
class ScoredImages:
    """Scored files, in their order: labels (when given), logits, stage means (one array per
    stage, as `outputs` gives them), image facts."""

    labels: np.ndarray | None
    logits: np.ndarray
    stage_means: list
    facts: list


def score_files(network, paths, labels=None, batch_size=32, workers=0, tta=False, description="Scoring"):
    """ScoredImages of the image files at `paths`, each decoded and scored as the app scores an
    upload (ImageFiles), by either network. A file that cannot be scored stops the run with its
    one-line reason, naming the file."""
    image_files = ImageFiles([str(path) for path in paths], network.meta)
    parts = {"logits": [], "stage_means": [], "facts": []}
    with tqdm(
        total=len(paths), unit="img", desc=description, disable=not show_progress(), leave=False
    ) as progress:
        for batch, items in decoded_batches(image_files, batch_size, workers):
            for item in items:
                if item.error is not None:
                    reason = item.error.removeprefix("upload: ")  # the app's words name its upload
                    raise ImageError(f"{paths[item.index]}: {reason}")
            logits, stage_means = batch_outputs(network, batch, tta)
            parts["logits"].append(logits)
            parts["stage_means"].append(stage_means)
            parts["facts"] += [item.facts for item in items]
            progress.update(len(items))
    return ScoredImages(
        None if labels is None else np.asarray(labels),
        np.concatenate(parts["logits"]),
        [np.concatenate(stage) for stage in zip(*parts["stage_means"], strict=True)],
        parts["facts"],
    )


# --- test-time augmentation (analysis.py --tta) --------------------------------------------


def dihedral_views(batch):
    """The 8 flips/rotations of a batch of square images (N, 3, S, S): nothing is cropped or
    filled in (the tests check them against torch's rot90 and flip)."""
    for oriented in (batch, batch[..., ::-1]):
        for quarter_turns in range(4):
            yield np.ascontiguousarray(np.rot90(oriented, quarter_turns, axes=(-2, -1)))


def batch_outputs(network, batch, tta=False):
    """(logits, stage means) of a batch, from either network; with `tta`, the logits are the
    mean over its 8 views, the stage means those of the images as they are (view 0)."""
    if not tta:
        logits, stage_means, _ = network.outputs(batch)
        return logits, stage_means
    views = [network.outputs(view)[:2] for view in dihedral_views(batch)]
    return np.mean([logits for logits, _ in views], axis=0), views[0][1]
