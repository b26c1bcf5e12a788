"""What serving needs besides the network, without torch: the serving engine's file format.

`common.py` (torch) exports the network into this format.
"""

import hashlib

ONNX_INPUT = "images"
ONNX_METADATA_KEY = "skin_lesion_classification"  # metadata_props entry: the checkpoint's metadata as JSON


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
