"""The serving engine's file, best_model.onnx: where it lives beside its checkpoint, its input's
name, and the metadata entry that carries the checkpoint's metadata. export.py writes it, engine.py
reads it. Torch-free."""

from pathlib import Path

INPUT = "images"
METADATA_KEY = "skin_lesion_classification"  # metadata_props entry: the checkpoint's metadata as JSON


def path_beside(checkpoint_path):
    """Where the engine's network of a checkpoint lives: best_model.pth -> best_model.onnx."""
    return Path(checkpoint_path).with_suffix(".onnx")
