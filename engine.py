"""The serving engine: best_model.onnx run by ONNX Runtime, without torch.

`load_network` picks it for a model file, or torch where it cannot serve (common.TorchNetwork);
both give `batch(images)`, `outputs(batch)` -> (logits, stage means, last feature maps) and
`heatmaps(feature_maps, labels)`, so the app and predict.py score alike on either.
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime

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

    def heatmaps(self, feature_maps, labels):
        """Each image's heat map for its label (scoring.class_activation_maps), at the input size."""
        return scoring.class_activation_maps(
            feature_maps, self.classifier_weight, labels, self.meta["image_size"]
        )


def load_network(model_path, device="auto", threads=None):
    """The network to score with: ONNX Runtime on `model_path` when it is an .onnx file, or on
    the .onnx file exported from the checkpoint `model_path` (`exported_network`); torch on the
    checkpoint (common.TorchNetwork) only for CUDA without ONNX Runtime's CUDA provider."""
    model_path = Path(model_path)
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
