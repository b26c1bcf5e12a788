"""The serving engine's network: a checkpoint exported as best_model.onnx (engine.py runs it)."""

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

import onnx_file
from checkpoints import load_scoring_model
from errors import CheckpointError
from files import atomic_output, file_sha256


class ScoringGraph(nn.Module):
    """The folded scoring network as the ONNX graph computes it: logits, every stage's mean over
    the image (what the out-of-distribution score reads), and the last stage's output (what the
    heat map is drawn from), all from one forward pass."""

    def __init__(self, model):
        super().__init__()
        self.network = getattr(model, "module", model)

    def forward(self, images):
        logits, stage_means, last_feature_map = self.network.forward_with_stages(images)
        return logits, *stage_means, last_feature_map

    def output_names(self):
        return [
            "logits",
            *(f"stage_mean_{index}" for index in range(len(self.network.stages()))),
            "last_feature_map",
        ]


def export_onnx(checkpoint_path, onnx_path):
    """Write the checkpoint's scoring network (`load_scoring_model`) as an ONNX graph, atomically:
    input `images` (N, 3, S, S) normalised, the batch dimension dynamic; outputs
    `ScoringGraph.output_names()`. The checkpoint's metadata, the classifier's weights (the heat
    map's channel weights) and the checkpoint file's SHA-256 go into the file's metadata_props.
    Failing to write it is a one-line CheckpointError."""
    model, meta = load_scoring_model(checkpoint_path)
    graph = ScoringGraph(model).eval()
    size = meta["image_size"]
    # The dynamo exporter (torch's default and recommended one); a batch of 2 as the example,
    # since torch.export specialises a dimension of size 1.
    program = torch.onnx.export(
        graph,
        (torch.zeros(2, 3, size, size),),
        input_names=[onnx_file.INPUT],
        output_names=graph.output_names(),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    classifier_weight = graph.network.classifier_weight
    onnx_meta = {
        **meta,
        "classifier_weight": classifier_weight.detach().tolist(),
        "checkpoint_sha256": file_sha256(checkpoint_path),
    }
    proto = program.model_proto
    proto.metadata_props.add(key=onnx_file.METADATA_KEY, value=json.dumps(onnx_meta, default=plain_value))
    try:
        with atomic_output(onnx_path) as file:
            file.write(proto.SerializeToString())
    except OSError as error:
        raise CheckpointError(
            f"{onnx_path}: cannot write the exported network ({error.strerror or error})"
        ) from None
    return Path(onnx_path)


def plain_value(value):
    """A tensor or an array as nested lists, for json.dumps (the checkpoint stores tensors)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
