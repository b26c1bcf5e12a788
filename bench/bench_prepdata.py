"""Benchmark: prepdata.py images per second with all cores against one process, on real images.

    .venv/bin/python bench/bench_prepdata.py                      # 210 HAM10000 images, 600x450
    .venv/bin/python bench/bench_prepdata.py --data ../shared/data/ham10000_300   # 8,023 images

Runs the whole stage twice (decode, split, balance, write) and prints both speeds and whether
the two trees are byte-identical. It prints figures; it never fails on timing.
"""

import contextlib
import csv
import io
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402
import prepdata  # noqa: E402


def get_args_parser():
    parser = cli.ArgumentParser(description="Time prepdata.py on all cores and on one process.")
    parser.add_argument(
        "--data",
        type=Path,
        default=ROOT.parent / "shared" / "data" / "ham10000_sample",
        help="folder holding GroundTruth.csv and images/ (default: ../shared/data/ham10000_sample)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=cli.available_cores(),
        help="processes for the parallel run (default: all cores, here %(default)s)",
    )
    parser.add_argument(
        "--max-side",
        type=int,
        default=prepdata.DEFAULT_MAX_SIDE,
        help=f"prepdata's --max-side (default: {prepdata.DEFAULT_MAX_SIDE}, prepdata's own default)",
    )
    return parser


def timed_run(args, out, workers):
    """(seconds, source images, files written) of one prepdata run, its output silenced.

    prepdata runs in this process so that the timing leaves out the interpreter and torch
    start-up (about 2 s), which would swamp a 210-image run.
    """
    argv = ["--csv", args.data / "GroundTruth.csv", "--images", args.data / "images", "--out", out]
    argv += ["--workers", workers, "--max-side", args.max_side]
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        prepdata.main([str(arg) for arg in argv])
        seconds = time.perf_counter() - start
    with open(out / "manifest.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    return seconds, sum(row["augmented"] == "no" for row in rows), len(rows)


def tree_bytes(folder):
    return {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@cli.exits_on_user_error
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        outs = {workers: Path(scratch) / f"workers_{workers}" for workers in (args.workers, 1)}
        speeds = {}
        for workers, out in outs.items():
            seconds, images, files = timed_run(args, out, workers)
            speeds[workers] = images / seconds
            print(
                f"{workers:>2} worker(s): {images} source images in {seconds:.1f} s = "
                f"{images / seconds:.1f} images/s ({files} files written, {files / seconds:.1f} files/s)"
            )
        identical = tree_bytes(outs[args.workers]) == tree_bytes(outs[1])
    print(f"speed-up: {speeds[args.workers] / speeds[1]:.2f}x on {args.workers} workers")
    print(f"byte-identical trees: {'yes' if identical else 'NO'}")
    print(f"data: {args.data}, --max-side {args.max_side}")


if __name__ == "__main__":
    main()
