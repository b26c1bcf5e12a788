"""Benchmark predict.py's throughput against the engine's own batch throughput on the same images.

    .venv/bin/python bench/bench_predict.py        # the quality benchmark's test split, 802 images
    .venv/bin/python bench/bench_predict.py --model best_model.pth --data prepared_dataset/test

It exports the checkpoint for the serving engine (into a scratch folder), then, in one run:
the engine's batch throughput on the folder's images already decoded and prepared (the network
alone, batches of --batch-size, all usable cores), and predict.py run as a user would on the
folder with that .onnx file (decoding in --workers processes while the network scores), and
prints both, their ratio (issue 11's target: predict.py at least 0.9x the engine), the CPU model
and the load average beside each figure. It prints figures; it never fails on timing.
"""

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import engine  # noqa: E402
import errors  # noqa: E402
import export  # noqa: E402
from devices import cpu_name  # noqa: E402

DEFAULT_MODEL = ROOT / "bench_runs" / "gpu" / "run" / "best_model.pth"
DEFAULT_DATA = ROOT / "bench_runs" / "gpu" / "prepared_dataset" / "test"
PREDICT_SPEED = re.compile(r"Scored [\d,]+ of [\d,]+ images, ([\d.]+) images/s")


def load_average():
    return Path("/proc/loadavg").read_text().split()[0]


def engine_images_per_second(network, files, batch_size, workers):
    """Images/s of the network alone on the files' inputs, decoded and prepared beforehand."""
    image_files = engine.ImageFiles(files, network.meta)
    batches = [batch for batch, _ in engine.decoded_batches(image_files, batch_size, workers)]
    network.outputs(batches[0])  # first-call costs
    start = time.perf_counter()
    for batch in batches:
        network.outputs(batch)
    return len(files) / (time.perf_counter() - start)


def predict_images_per_second(onnx_path, data, batch_size, workers, out):
    """(images/s predict.py reports for its scoring, seconds of the whole command)."""
    command = [sys.executable, str(ROOT / "predict.py"), str(data), "--model", str(onnx_path)]
    command += ["--out", str(out), "--batch-size", str(batch_size), "--workers", str(workers)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise errors.UserError(f"predict.py failed: {result.stderr.strip().splitlines()[-1]}")
    return float(PREDICT_SPEED.search(result.stderr).group(1)), seconds


def get_args_parser():
    parser = cli.ArgumentParser(description="predict.py's images/s against the engine's batch throughput.")
    add = parser.add_argument
    add("--model", type=Path, default=DEFAULT_MODEL, help="checkpoint (default: %(default)s)")
    add("--data", type=Path, default=DEFAULT_DATA, help="folder of images (default: %(default)s)")
    add("--batch-size", type=cli.positive_int, default=32, help="images per batch (default: 32)")
    add(
        "--workers",
        type=cli.non_negative_int,
        default=min(4, cli.available_cores()),
        help="predict.py's decoding processes (default: its own default)",
    )
    return parser


@cli.exits_on_user_error
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if not args.data.is_dir():
        raise errors.UserError(f"{args.data}: no such folder")
    files = [str(path) for path in sorted(args.data.glob("*.jpg"))]
    if not files:
        raise errors.UserError(f"{args.data}: no .jpg images here")
    with tempfile.TemporaryDirectory() as scratch:
        onnx_path = export.export_onnx(args.model, Path(scratch) / "served.onnx")
        network = engine.OnnxEngine(onnx_path, threads=cli.available_cores())
        size = network.meta["image_size"]
        print(
            f"{cpu_name()}, {cli.available_cores()} cores, {len(files)} images, {size} px, "
            f"batch {args.batch_size}"
        )
        figures = {}
        for name in ("engine", "predict", "engine again"):
            before = load_average()
            if name == "predict":
                figures[name], seconds = predict_images_per_second(
                    onnx_path, args.data, args.batch_size, args.workers, Path(scratch) / "predictions.csv"
                )
                detail = f"(whole command {seconds:.1f} s, --workers {args.workers})"
            else:
                figures[name] = engine_images_per_second(network, files, args.batch_size, 0)
                detail = "(network alone, inputs decoded beforehand)"
            print(f"{name}: {figures[name]:.1f} images/s {detail}; load average before {before}")
        engine_speed = (figures["engine"] + figures["engine again"]) / 2
        print(
            f"predict / engine (mean of its two runs): {figures['predict'] / engine_speed:.2f} "
            "(target at least 0.90)"
        )
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
