"""Benchmark faster variants of the serving engine against its fp32 default (issue 11, "Precision").

    .venv/bin/python bench/bench_engine_variants.py
    .venv/bin/python bench/bench_engine_variants.py --model best_model.pth --data prepared_dataset

For a trained checkpoint and 200 real validation images (every 8th file of DATA/val), it compares
the engine as it serves (fp32, ONNX Runtime's default graph optimisation, ORT_ENABLE_ALL) with:
the graph optimisation levels basic and extended, int8 static quantisation with per-channel
QDQ (onnxruntime.quantization.quantize_static, MinMax calibration on 100 original images of
DATA/train, never the validation images measured), and the graph's floats in fp16
(onnxconverter-common, inputs and outputs kept fp32). ONNX Runtime's CPU provider has no bf16
convolutions, so bf16 is not a variant it can serve. For each it prints the model-only batch-1
forward time (median of --repeats runs, --threads threads, the load average before it), its
ratio to the fp32 default measured in the same run, the largest melanoma-probability difference
against fp32 over the 200 images, the change of their ROC AUC, and whether issue 11's rule keeps
it: a largest difference under 0.01, an AUC moved by at most 0.002, and faster. It prints
figures; it never fails on timing.
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnxconverter_common import float16
from onnxruntime import quantization
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_predict import load_average  # noqa: E402

import cli  # noqa: E402
import engine  # noqa: E402
import export  # noqa: E402
import onnx_file  # noqa: E402
import prepared  # noqa: E402
import scoring  # noqa: E402
from devices import cpu_name  # noqa: E402

DEFAULT_MODEL = ROOT / "bench_runs" / "gpu" / "run" / "best_model.pth"
DEFAULT_DATA = ROOT / "bench_runs" / "gpu" / "prepared_dataset"
MAX_PROBABILITY_DIFFERENCE = 0.01
MAX_AUC_CHANGE = 0.002
LEVELS = {
    "fp32, optimisation all (the default)": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "fp32, optimisation basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "fp32, optimisation extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


def inputs_of(paths, meta):
    """The network's inputs of the files, (N, 3, S, S), decoded by the app's rule."""
    image_files = engine.ImageFiles([str(path) for path in paths], meta)
    return np.concatenate([batch for batch, _ in engine.decoded_batches(image_files, 32, 0)])


def session(onnx_path, threads, level=onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = level
    return onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def logits_of(ort_session, inputs, batch_size=32):
    return np.concatenate(
        [
            ort_session.run(["logits"], {onnx_file.INPUT: inputs[start : start + batch_size]})[0]
            for start in range(0, len(inputs), batch_size)
        ]
    )


def forward_ms(ort_session, one_image, repeats):
    """Median ms of a batch-1 forward pass (every output, as the engine runs it)."""
    for _ in range(3):  # first-call costs
        ort_session.run(None, {onnx_file.INPUT: one_image})
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        ort_session.run(None, {onnx_file.INPUT: one_image})
        timings.append(1000 * (time.perf_counter() - start))
    return statistics.median(timings)


class CalibrationImages(quantization.CalibrationDataReader):
    """The calibration images' inputs, one at a time, for quantize_static."""

    def __init__(self, inputs):
        self.inputs = iter(inputs)

    def get_next(self):
        one = next(self.inputs, None)
        return None if one is None else {onnx_file.INPUT: one[np.newaxis]}


def quantized_int8(onnx_path, calibration_inputs, folder):
    """The export quantised to int8, static, per-channel QDQ, calibrated on `calibration_inputs`."""
    prepared = Path(folder) / "prepared.onnx"
    quantization.quant_pre_process(str(onnx_path), str(prepared))
    quantized = Path(folder) / "int8.onnx"
    quantization.quantize_static(
        str(prepared),
        str(quantized),
        CalibrationImages(calibration_inputs),
        quant_format=quantization.QuantFormat.QDQ,
        per_channel=True,
        activation_type=quantization.QuantType.QInt8,
        weight_type=quantization.QuantType.QInt8,
    )
    return quantized


def converted_fp16(onnx_path, folder):
    """The export with its weights and activations in fp16, its input and outputs still fp32.
    The stage means (ReduceMean, outputs of the graph) stay fp32: converted, their outputs' types
    no longer match the graph's and ONNX Runtime refuses the model."""
    converted = float16.convert_float_to_float16(
        onnx.load(str(onnx_path)), keep_io_types=True, op_block_list=["ReduceMean"]
    )
    path = Path(folder) / "fp16.onnx"
    onnx.save(converted, str(path))
    return path


def verdict(ratio, difference, auc_change):
    reasons = []
    if difference >= MAX_PROBABILITY_DIFFERENCE:
        reasons.append(f"largest difference {difference:.4f} >= {MAX_PROBABILITY_DIFFERENCE}")
    if abs(auc_change) > MAX_AUC_CHANGE:
        reasons.append(f"AUC moved {auc_change:+.4f}")
    if ratio >= 1:
        reasons.append("not faster")
    return "kept" if not reasons else "rejected: " + "; ".join(reasons)


def get_args_parser():
    parser = cli.ArgumentParser(description="The engine's faster variants against its fp32 default.")
    add = parser.add_argument
    add("--model", type=Path, default=DEFAULT_MODEL, help="trained checkpoint (default: %(default)s)")
    add(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="prepared tree with train/ and val/ (default: %(default)s)",
    )
    add("--threads", type=cli.positive_int, default=2, help="ONNX Runtime threads (default: 2)")
    add("--repeats", type=cli.positive_int, default=25, help="timed forward passes (default: 25)")
    return parser


def measured(path, level, threads, repeats, inputs, rules, labels):
    """(forward ms, load average before it, the probabilities of the inputs, their AUC)."""
    ort_session = session(path, threads, level)
    load = load_average()
    milliseconds = forward_ms(ort_session, inputs[:1], repeats)
    probabilities = rules.probabilities(logits_of(ort_session, inputs))
    return milliseconds, load, probabilities, roc_auc_score(labels, probabilities)


def report(name, figures, reference):
    milliseconds, load, probabilities, auc = figures
    ratio = milliseconds / reference[0]
    difference = float(np.abs(probabilities - reference[2]).max())
    outcome = (
        "the serving default" if figures is reference else verdict(ratio, difference, auc - reference[3])
    )
    print(
        f"{name}: {milliseconds:.2f} ms (load average {load}), {ratio:.2f}x the default, largest "
        f"probability difference {difference:.2e}, AUC {auc:.4f} ({auc - reference[3]:+.4f}); {outcome}"
    )


def sampled_images(data):
    """(every 8th validation image, at most 200; their labels; 100 original training images)."""
    val = prepared.list_prepared_images(data / "val")[::8][:200]
    train = [
        path
        for path, _ in prepared.list_prepared_images(data / "train")
        if not prepared.is_augmented_filename(path.name)
    ]
    return (
        [path for path, _ in val],
        np.array([label for _, label in val]),
        train[:: max(1, len(train) // 100)][:100],
    )


@cli.exits_on_user_error
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    val, labels, calibration_paths = sampled_images(args.data)
    with tempfile.TemporaryDirectory() as scratch:
        onnx_path = export.export_onnx(args.model, Path(scratch) / "fp32.onnx")
        meta = engine.OnnxEngine(onnx_path).meta
        inputs = inputs_of(val, meta)
        print(
            f"{cpu_name()}, ONNX Runtime {onnxruntime.__version__}, {meta['image_size']} px, "
            f"{args.threads} threads"
        )
        print(
            f"{len(val)} validation images ({int(labels.sum())} melanomas), "
            f"{len(calibration_paths)} for calibration"
        )
        variants = {name: (onnx_path, level) for name, level in LEVELS.items()}
        start = time.perf_counter()
        int8_path = quantized_int8(onnx_path, inputs_of(calibration_paths, meta), scratch)
        print(f"int8 quantisation took {time.perf_counter() - start:.0f} s")
        variants["int8 static, per-channel QDQ"] = (
            int8_path,
            onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
        )
        variants["fp16 (inputs and outputs fp32)"] = (
            converted_fp16(onnx_path, scratch),
            onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
        )
        rules = scoring.ScoringRules(meta)
        reference = None
        for name, (path, level) in variants.items():
            figures = measured(path, level, args.threads, args.repeats, inputs, rules, labels)
            reference = reference or figures
            report(name, figures, reference)


if __name__ == "__main__":
    main()
