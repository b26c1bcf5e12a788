"""Benchmark: training images per second, (a) the model alone and (b) the full input pipeline.

    .venv/bin/python prepdata.py --csv ../shared/data/ham10000_sample/GroundTruth.csv \
        --images ../shared/data/ham10000_sample/images --out prepared_dataset --overwrite
    .venv/bin/python bench/bench_train.py                          # 224 and 384 px, three precisions
    .venv/bin/python bench/bench_train.py --sizes 384 --steps 3    # quicker

(a) trains on random tensors already in memory; (b) trains from the JPEG files of a prepared
train/ folder through model.py's own loader (decode, augmentation, workers). Both run model.py's
Trainer and optimizer, so (b)/(a) is the share of the model's speed that the input pipeline keeps
(target 0.9). The first --warmup micro-batches of each run are not timed.

It also prints what one AdamW step costs, fused (as model.py runs it) and not, and the memory one
training step needs: the bytes autograd keeps for the backward pass (activations; the same on any
device, so a CPU run tells what a GPU will need) plus weights, gradients and AdamW state, and on
CUDA the measured peak allocation. It prints figures; it never fails on timing.
"""

import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import backbones  # noqa: E402
import cli  # noqa: E402
import devices  # noqa: E402
import errors  # noqa: E402
import model  # noqa: E402
import prepared  # noqa: E402
import training  # noqa: E402
import training_data  # noqa: E402

# name: (memory format, autocast dtype)
MODES = {
    "fp32": (torch.contiguous_format, None),
    "channels_last": (torch.channels_last, None),
    "channels_last+bf16": (torch.channels_last, torch.bfloat16),
}


def get_args_parser():
    parser = cli.ArgumentParser(description="Time training: model alone vs the full input pipeline.")
    add = parser.add_argument
    add(
        "--data",
        type=Path,
        default=Path("prepared_dataset/train"),
        help="folder of mel_/nomel_ training images (a prepared train/ split) (default: %(default)s)",
    )
    add("--sizes", type=int, nargs="+", default=[224, 384], help="image sizes (default: 224 384)")
    add(
        "--modes",
        nargs="+",
        choices=sorted(MODES),
        default=list(MODES),
        help="precisions to time (default: all three)",
    )
    add("--batch-size", type=cli.positive_int, default=16, help="images per step (default: 16)")
    add("--steps", type=cli.positive_int, default=5, help="timed steps per run (default: 5)")
    add("--warmup", type=cli.positive_int, default=1, help="untimed steps first (default: 1)")
    add(
        "--workers",
        type=cli.non_negative_int,
        default=model.get_args_parser().get_default("workers"),
        help="loader processes for (b) (default: model.py's default, %(default)s)",
    )
    add("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    add(
        "--arch", choices=sorted(backbones.BACKBONES), default=backbones.DEFAULT_ARCH, help="backbone to time"
    )
    add("--memory-only", action="store_true", help="print only the memory of one step (no timing)")
    return parser


class TimedLoader:
    """A DataLoader passed through to Trainer.train_one_epoch, noting when each batch is handed
    over and when the epoch ends (after the last step)."""

    def __init__(self, loader, device):
        self.loader, self.device, self.times = loader, device, []
        self.sampler, self.batch_size = loader.sampler, loader.batch_size

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.mark()
            yield batch
        self.mark()

    def mark(self):
        synchronize(self.device)
        self.times.append(time.perf_counter())

    def images_per_second(self, warmup):
        return self.batch_size * (len(self.times) - 1 - warmup) / (self.times[-1] - self.times[warmup])


def images_per_second(loader, device, mode, warmup, arch=backbones.DEFAULT_ARCH):
    """One epoch over `loader` with model.py's Trainer; throughput after the warm-up steps."""
    memory_format, amp_dtype = MODES[mode]
    torch.manual_seed(0)
    network = backbones.SkinLesionModel(arch).to(device, memory_format=memory_format)
    optimizer = training.make_optimizer(network.parameters(), device, lr=1e-4, weight_decay=0.05)
    trainer = training.Trainer(network, optimizer, device, amp_dtype, memory_format=memory_format)
    timed = TimedLoader(loader, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train_one_epoch(timed, f"{mode}", show_progress=False)
    if device.type == "cuda":
        print(f"  {mode}: CUDA peak allocated {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    return timed.images_per_second(warmup)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()  # GPU work is asynchronous: count it where it finishes


def optimizer_step_seconds(device, fused, steps=5):
    """One AdamW step over EfficientNetV2-S's parameters, with random gradients, after one untimed."""
    network = backbones.SkinLesionModel(weights="none").to(device)
    for parameter in network.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4, weight_decay=0.05, fused=fused)
    optimizer.step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def storage_key(tensor):
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def training_step_bytes(size, batch_size, mode, arch=backbones.DEFAULT_ARCH):
    """(bytes saved for backward, bytes of weights + gradients + AdamW moments) of one step.

    Storages are counted once, as autograd keeps them (several saved tensors can share one)."""
    memory_format, amp_dtype = MODES[mode]
    network = backbones.SkinLesionModel(arch).to(memory_format=memory_format)
    images = torch.randn(batch_size, 3, size, size).to(memory_format=memory_format)
    saved = {}

    def pack(tensor):
        saved[storage_key(tensor)] = storage_key(tensor)[1]
        return tensor

    keep_saved = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    with keep_saved, devices.autocast(torch.device("cpu"), amp_dtype):
        network(images).sum()
    parameter_bytes = sum(p.numel() * p.element_size() for p in network.parameters())
    return sum(saved.values()), 4 * parameter_bytes  # weights, gradients, two AdamW moments


def synthetic_loader(count, size, batch_size):
    images = torch.randn(count, 3, size, size)
    labels = torch.arange(count) % 2
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=batch_size)


def pipeline_loader(source, folder, count, size, args, device):
    """model.py's training loader over `count` images of `source`, melanoma and not in turn
    (linked into `folder`, cycling when there are fewer), exactly as training builds it."""
    images = prepared.list_prepared_images(source)
    by_class = [[path for path, label in images if label == wanted] for wanted in (0, 1)]
    if not all(by_class):
        raise errors.UserError(
            f"{source}: needs mel_* and nomel_* images (run prepdata.py first, or pass --data)"
        )
    alternating = [path for pair in zip(*by_class, strict=False) for path in pair]
    (folder / "train").mkdir()
    for index in range(count):
        path = alternating[index % len(alternating)]
        (folder / "train" / f"{path.stem}_{index}{path.suffix}").symlink_to(path.resolve())
    settings = ["--data", str(folder), "--image-size", str(size), "--batch-size", str(args.batch_size)]
    settings += ["--workers", str(args.workers), "--arch", args.arch]
    loader_args = model.parse_args(model.get_args_parser(), settings)
    return training_data.train_loader(loader_args, devices.Runtime(device, None), training_data.Head())


def bench_size(size, args, device):
    count = (args.warmup + args.steps) * args.batch_size
    setting = f"{args.arch}, {size} px, batch {args.batch_size}, {device.type}"
    print(f"\n{setting}, {args.workers} loader workers for (b)")
    if not args.memory_only:
        print(f"  {'mode':<20} {'(a) model img/s':>16} {'(b) pipeline img/s':>19} {'(b)/(a)':>8}")
    results = {}
    for mode in [] if args.memory_only else args.modes:
        model_alone = images_per_second(
            synthetic_loader(count, size, args.batch_size), device, mode, args.warmup, args.arch
        )
        with tempfile.TemporaryDirectory() as folder:
            loader = pipeline_loader(args.data, Path(folder), count, size, args, device)
            pipeline = images_per_second(loader, device, mode, args.warmup, args.arch)
        results[mode] = (model_alone, pipeline)
        print(
            f"  {mode:<20} {model_alone:>16.2f} {pipeline:>19.2f} {pipeline / model_alone:>8.2f}", flush=True
        )
    for mode in args.modes:
        activations, state = training_step_bytes(size, args.batch_size, mode, args.arch)
        print(
            f"  {mode}: one step keeps {activations / 2**30:.2f} GiB for backward "
            f"+ {state / 2**30:.2f} GiB weights, gradients, AdamW state"
        )
    if "fp32" in results:
        for mode in [mode for mode in results if mode != "fp32"]:
            speedups = [results[mode][i] / results["fp32"][i] for i in (0, 1)]
            print(f"  speed-up of {mode} over fp32: (a) {speedups[0]:.2f}x, (b) {speedups[1]:.2f}x")


@cli.exits_on_user_error
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = devices.choose_device(args.device)
    threads, bf16 = torch.get_num_threads(), devices.cpu_has_native_bf16()
    print(f"torch {torch.__version__}, {threads} CPU threads, CPU with native bf16: {bf16}")
    if not args.memory_only and device.type in ("cpu", "cuda"):
        plain, fused = (optimizer_step_seconds(device, fused) for fused in (None, True))
        print(f"AdamW step (model.py fuses it): {1000 * fused:.1f} ms fused, {1000 * plain:.1f} ms not")
    for size in args.sizes:
        bench_size(size, args, device)


if __name__ == "__main__":
    main()
