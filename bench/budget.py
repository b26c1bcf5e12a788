"""Equal wall time: how many epochs of a model.py recipe fit a training budget on this machine.

The cosine schedule and progressive resizing are laid out over --epochs, so a recipe must know
its epochs before it starts; --time-budget only guards the end. Here the cost of an epoch is
measured, not guessed: seconds per training image at every size the recipes train at (model.py's
own loader, augmentation and precision) and per validation image at the scoring size, on this
machine, just before the runs. An epoch then costs its training images at its size, plus one
validation pass (two with the moving average of the weights), plus a fixed overhead.
"""

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_train  # noqa: E402

import backbones  # noqa: E402
import cli  # noqa: E402
import devices  # noqa: E402
import model  # noqa: E402
import training_data  # noqa: E402

# Per epoch, beyond the images: saving the last checkpoint and the history, maybe the best
# checkpoint, and the summary (about 2 s measured on the 2-core AMD EPYC VM at 128 px).
EPOCH_OVERHEAD_S = 3.0
STEP = 16  # progressive resizing moves in steps of 16 pixels (training_data.epoch_image_size)


@dataclass
class Costs:
    """Seconds per image: training at each (backbone, size), validation scoring at each (backbone, size)."""

    train: dict = field(default_factory=dict)
    val: dict = field(default_factory=dict)


def recipe_settings(flags):
    """model.py's settings for these flags, as model.py would parse them."""
    return model.parse_args(model.get_args_parser(), ["--weights", "none", *map(str, flags)])


def sizes_of(settings):
    if not settings.progressive_from:
        return {(settings.arch, settings.image_size)}
    sizes = {*range(settings.progressive_from, settings.image_size, STEP), settings.image_size}
    return {(settings.arch, size) for size in sizes}


def measure_costs(train_folder, recipes, batch_size, workers, steps=3, warmup=1):
    """Costs at every size the recipes (lists of model.py flags) train and score at. Other work
    on the machine inflates them (and shrinks the plans): the load average is printed."""
    device = torch.device("cpu")
    settings = [recipe_settings(flags) for flags in recipes]
    amp_dtype = devices.choose_amp_dtype(device, settings[0].amp)  # one precision for every recipe
    mode = "channels_last+bf16" if amp_dtype == torch.bfloat16 else "channels_last"
    costs = Costs()
    for arch, size in sorted(set().union(*map(sizes_of, settings))):
        loader_args = type("LoaderArgs", (), {"batch_size": batch_size, "workers": workers, "arch": arch})
        count = (warmup + steps) * batch_size
        with tempfile.TemporaryDirectory() as folder:
            loader = bench_train.pipeline_loader(train_folder, Path(folder), count, size, loader_args, device)
            costs.train[arch, size] = 1 / bench_train.images_per_second(loader, device, mode, warmup, arch)
    for arch, size in sorted({(recipe.arch, recipe.image_size) for recipe in settings}):
        costs.val[arch, size] = validation_seconds_per_image(size, batch_size, device, arch)
    print(f"Costs measured at load average {os.getloadavg()[0]:.2f} on {cli.available_cores()} cores")
    for kind, seconds in (("train", costs.train), ("validation", costs.val)):
        print(
            f"Seconds per image, {kind}: " + ", ".join(f"{a} {s} px {t:.4f}" for (a, s), t in seconds.items())
        )
    return costs


@torch.inference_mode()
def validation_seconds_per_image(size, batch_size, device, arch, batches=3):
    """model.py validates in fp32 (score_split): the forward pass alone, after one untimed batch."""
    network = backbones.SkinLesionModel(arch).eval().to(memory_format=torch.channels_last)
    images = torch.randn(batch_size, 3, size, size).to(memory_format=torch.channels_last)
    backbones.network_outputs(network, images, device)
    start = time.perf_counter()
    for _ in range(batches):
        backbones.network_outputs(network, images, device)
    return (time.perf_counter() - start) / (batches * batch_size)


def training_seconds(settings, epochs, costs, train_images, val_images):
    """The planned training time of `epochs` epochs of a recipe."""
    settings.epochs = epochs
    validations = 2 if settings.ema_decay else 1
    total = 0.0
    for epoch in range(epochs):
        size = training_data.epoch_image_size(settings, epoch)
        validation = val_images * costs.val[settings.arch, settings.image_size]
        total += train_images * costs.train[settings.arch, size] + validations * validation
        total += EPOCH_OVERHEAD_S
    return total


def epochs_within(flags, budget_s, costs, train_images, val_images, most=500):
    """The most epochs of the recipe `flags` whose planned training time fits `budget_s` (at least 1)."""
    settings = recipe_settings(flags)
    epochs = 1
    while (
        epochs < most and training_seconds(settings, epochs + 1, costs, train_images, val_images) <= budget_s
    ):
        epochs += 1
    return epochs
