"""The serving engine: best_model.onnx run by ONNX Runtime, without torch.

`load_network` picks it for a model file, or torch where it cannot serve (common.TorchNetwork);
both give `batch(images)`, `outputs(batch)` -> (logits, stage means, last feature maps) and
`heatmaps(feature_maps, logits, labels)`, so the app, predict.py and analysis.py score alike on either.
Below them: image files decoded in worker processes into batches for either network, and
test-time augmentation on a batch (analysis.py --tta), in NumPy.
"""

import collections
import concurrent.futures
import json
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime
from PIL import Image

import scoring

_ort_errors = onnxruntime.capi.onnxruntime_pybind11_state
ONNX_LOAD_ERRORS = (
    _ort_errors.Fail,
    _ort_errors.InvalidProtobuf,
    _ort_errors.NoSuchFile,
    _ort_errors.InvalidGraph,
)


class OnnxEngine:
    """One ONNX Runtime session of an exported scoring network, and the checkpoint's metadata
    stored in it (`meta`, as `common.load_checkpoint` gives it, the out-of-distribution
    statistics as nested lists)."""

    engine = "onnxruntime"

    def __init__(self, onnx_path, device="cpu", threads=None):
        options = onnxruntime.SessionOptions()
        # No memory arena: the arena keeps the largest batch's buffers for good, which put the
        # server's peak over its 450 MiB budget (479 MB); without it 417 MB at the same speed
        # (docs/measurements.md).
        options.enable_cpu_mem_arena = False
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(onnx_path), options, providers=providers(device))
            stored = self.session.get_modelmeta().custom_metadata_map[scoring.ONNX_METADATA_KEY]
        except (*ONNX_LOAD_ERRORS, KeyError) as error:
            raise scoring.CheckpointError(
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
        return np.stack([scoring.model_input(image, self.meta) for image in images])

    def outputs(self, batch):
        """(logits, stage means, last feature maps) of a batch: the first two as float64
        arrays, as `common.network_outputs` gives them; the feature maps float32 (N, C, h, w)."""
        logits, *stage_means, feature_maps = self.session.run(None, {scoring.ONNX_INPUT: batch})
        return logits.astype(np.float64), [means.astype(np.float64) for means in stage_means], feature_maps

    def heatmaps(self, feature_maps, logits, labels):
        """Each image's heat map for its label (scoring.class_activation_maps of the output
        scoring.heatmap_outputs picks), at the input size."""
        outputs = scoring.heatmap_outputs(logits, labels, self.meta)
        return scoring.class_activation_maps(
            feature_maps, self.classifier_weight, outputs, self.meta["image_size"]
        )


def load_network(model_path, device="auto", threads=None):
    """The network to score with: ONNX Runtime on `model_path` when it is an .onnx file, or on
    the .onnx file exported from the checkpoint `model_path` (`exported_network`); torch on the
    checkpoint (common.TorchNetwork) only for CUDA without ONNX Runtime's CUDA provider."""
    model_path = Path(model_path)
    check_device(device)
    if model_path.suffix.lower() == ".onnx":
        if not model_path.is_file():
            raise scoring.CheckpointError(
                f"{model_path}: network not found (export one with predict.py --export)"
            )
        return OnnxEngine(model_path, device, threads)
    if wants_cuda_without_provider(device):
        import common  # torch: the only engine on CUDA here

        return common.TorchNetwork(model_path, device, threads)
    return exported_network(model_path, device, threads)


def exported_network(checkpoint_path, device="auto", threads=None):
    """The engine on the .onnx file beside the checkpoint when it was exported from this very
    file (its stored SHA-256 says so). Otherwise the checkpoint is exported first (torch needed,
    once): beside it, atomically, so the next load finds it; or, in a folder this process
    cannot write, to a temporary file removed as soon as the session holds the network."""
    if not checkpoint_path.is_file():
        raise scoring.CheckpointError(
            f"{checkpoint_path}: checkpoint not found (train first with model.py, or pass --model PATH)"
        )
    beside = scoring.onnx_path_beside(checkpoint_path)
    network = engine_if_exported_from(beside, checkpoint_path, device, threads)
    if network is not None:
        return network
    if can_write_in(checkpoint_path.parent):
        export(checkpoint_path, beside)
        print(f"{checkpoint_path}: exported once to {beside} for ONNX Runtime", file=sys.stderr)
        return OnnxEngine(beside, device, threads)
    with tempfile.TemporaryDirectory(prefix="skin-lesion-onnx-") as folder:
        exported = export(checkpoint_path, Path(folder) / beside.name)
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
    except scoring.CheckpointError:
        return None
    return network if network.meta.get("checkpoint_sha256") == scoring.file_sha256(checkpoint_path) else None


def export(checkpoint_path, onnx_path):
    """common.export_onnx, whose failure to write is a one-line CheckpointError."""
    import common  # torch: only to export a checkpoint without its exported network

    try:
        return common.export_onnx(checkpoint_path, onnx_path)
    except OSError as error:
        raise scoring.CheckpointError(
            f"{onnx_path}: cannot write the exported network ({error.strerror or error})"
        ) from None


def can_write_in(folder):
    """Whether this process can create a file in `folder`: tried, not read from the permission
    bits (root writes where the bits say read-only; a read-only mount refuses even root)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_device(device):
    """auto, cpu, cuda or cuda:N; anything else is a user error (ONNX Runtime would quietly use the CPU)."""
    name = str(device)
    index = name.removeprefix("cuda:")
    if name not in ("auto", "cpu", "cuda") and not (name.startswith("cuda:") and index.isdigit()):
        raise scoring.UserError(f"--device {name}: not a device (use auto, cpu, cuda or cuda:N)")


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


# --- image files, decoded in worker processes for the network (predict.py, analysis.py) ----------


class Decoded(NamedTuple):
    """One file, decoded: its network input and image facts, or why it cannot be scored."""

    index: int  # in the list of files
    pixels: np.ndarray | None  # the network's input (scoring.model_input)
    facts: dict | None
    image: Image.Image | None  # kept only to draw its heat map on
    error: str | None


class ImageFiles:
    """The files to score, each decoded by the app's rule (scoring.decode_image_bytes). A refused
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
        except scoring.ImageError as error:
            return Decoded(index, None, None, None, str(error))
        pixels, facts = scoring.model_input_and_facts(image, self.meta)
        return Decoded(index, pixels, facts, image if self.keep_images else None, None)


def read_image_file(path, image_size):
    """The image in the file at `path`, decoded and accepted as the app accepts an upload."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise scoring.ImageError(f"cannot read the file ({error.strerror or error})") from None
    return scoring.decode_image_bytes(data, image_size)


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


# --- test-time augmentation (analysis.py --tta) --------------------------------------------


def dihedral_views(batch):
    """The 8 flips/rotations of a batch of square images (N, 3, S, S), as common.dihedral_views
    gives them with torch: nothing is cropped or filled in."""
    for oriented in (batch, batch[..., ::-1]):
        for quarter_turns in range(4):
            yield np.ascontiguousarray(np.rot90(oriented, quarter_turns, axes=(-2, -1)))


def batch_outputs(network, batch, tta=False):
    """(logits, stage means) of a batch, from either network; with `tta`, the logits are the
    mean over its 8 views, the stage means those of the images as they are (view 0), as
    common.batch_outputs gives them."""
    if not tta:
        logits, stage_means, _ = network.outputs(batch)
        return logits, stage_means
    views = [network.outputs(view)[:2] for view in dihedral_views(batch)]
    return np.mean([logits for logits, _ in views], axis=0), views[0][1]
