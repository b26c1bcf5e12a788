"""Torch's own way to score a folder: the reference the engine's NumPy/ONNX path is checked
against (tests), and the benchmarks' eager-torch baseline. Production scores through
engine.score_files only."""

import numpy as np
import torch

from backbones import network_outputs
from engine import ScoredImages
from image_input import IMAGE_FACTS, image_facts, load_image
from prepared import is_augmented_filename
from training_data import SkinLesionDataset, eval_transform


def checkpoint_transform(meta):
    return eval_transform(meta["image_size"], meta["mean"], meta["std"])


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


def score_dataset(model, dataset, device, batch_size=32, workers=0, tta=False):
    """Run a ScoringDataset through the network. With `tta`, the logits are the mean over the 8
    flips/rotations of each image; the stage means always come from the image as it is."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda"
    )
    parts = {"labels": [], "logits": [], "stage_means": [], "facts": []}
    for images, facts, labels in loader:
        logits, stage_means = batch_outputs(model, images, device, tta)
        parts["labels"].append(labels.numpy())
        parts["logits"].append(logits)
        parts["stage_means"].append(stage_means)
        parts["facts"] += [dict(zip(IMAGE_FACTS, row.tolist(), strict=True)) for row in facts]
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


def dihedral_views(images):
    """The 8 flips/rotations of a batch of square images: nothing is cropped or filled in."""
    for oriented in (images, images.flip(-1)):
        for quarter_turns in range(4):
            yield torch.rot90(oriented, quarter_turns, dims=(-2, -1))
