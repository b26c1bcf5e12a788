"""The serving engine: best_model.onnx run by ONNX Runtime, without torch.

engine = OnnxEngine("best_model.onnx")
logits, stage_means, feature_maps = engine.outputs(engine.batch([image]))
"""

import json

import numpy as np
import onnxruntime

import scoring


class OnnxEngine:
    """One ONNX Runtime session of an exported scoring network, and the checkpoint's metadata
    stored in it (`meta`, as `common.load_checkpoint` gives it, the out-of-distribution
    statistics as nested lists)."""

    def __init__(self, onnx_path, device="cpu", threads=None):
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(onnx_path), options, providers=providers(device))
        self.meta = json.loads(self.session.get_modelmeta().custom_metadata_map[scoring.ONNX_METADATA_KEY])
        self.classifier_weight = np.asarray(self.meta.pop("classifier_weight"), dtype=np.float32)

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


def providers(device):
    """ONNX Runtime's CUDA provider for a CUDA device when it is installed, else the CPU's."""
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
