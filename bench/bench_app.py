"""Benchmark app.py: latency per image size, requests/s with concurrent clients, peak memory.

    .venv/bin/python bench/bench_app.py                        # random weights at 384 px
    .venv/bin/python bench/bench_app.py --model best_model.pth # a trained checkpoint

It exports the checkpoint for the serving engine (best_model.onnx, in a scratch folder) and
starts `app.py` on it, on 127.0.0.1 (a free port) as a user would, posts real images one at a time
(600x450 from ../shared/data/ham10000_sample, 1024x768 to 3008x2000 from large_photos), then
from several clients at once, and prints p50/p95 latency as the client sees it, requests/s,
errors, and the server's peak resident memory. Then, in this process, the model-only forward
time (batch 1) of eager torch fp32 (the original project's serving path: the default NCHW
layout; channels_last, this project's torch layout, is printed beside it) and of the engine, and
the ratios of issue 11's targets. Speed does not depend on the weights' values, so
without --model it serves a random-weight checkpoint. It also prints how far the probabilities of
the precision the app scores in are from fp32 on real images, for the checkpoint served. It
prints figures; it never fails on timing.
"""

import copy
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # app_harness and torch_reference: what the tests see of the app

import app_harness  # noqa: E402
import backbones  # noqa: E402
import checkpoints  # noqa: E402
import cli  # noqa: E402
import engine  # noqa: E402
import errors  # noqa: E402
import export  # noqa: E402
import image_input  # noqa: E402
import scoring  # noqa: E402
import torch_reference  # noqa: E402
from devices import cpu_name  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"
SMALL_IMAGES = SHARED_DATA / "ham10000_sample" / "images"
LARGE_PHOTOS = SHARED_DATA / "large_photos" / "images"


# --- the benchmark ---------------------------------------------------------------------------


def read_images(folder, count):
    return [path.read_bytes() for path in sorted(folder.glob("*.jpg"))[:count]]


def post_sequentially(base_url, uploads, requests, explain=False):
    """`requests` posts made one after the other: [(answer, seconds)]."""
    results = []
    for index in range(requests):
        status, answer, seconds = app_harness.post_file(
            base_url, uploads[index % len(uploads)], explain=explain
        )
        if status != 200:
            raise RuntimeError(f"the app answered {status}: {answer}")
        results.append((answer, seconds))
    return results


def round_trip_ms(base_url, requests):
    """Median ms of a bodiless request answered without the model: what HTTP, waitress and Flask
    cost an upload before and after the server's own timed work."""
    return statistics.median(
        timed(lambda: app_harness.get_json(base_url, "/healthz")) for _ in range(requests)
    )


def percentile_ms(latencies, percent):
    return 1000 * float(np.percentile(latencies, percent))


def report_latency(name, results, reference_ms=None):
    """Print p50/p95 as the client saw them, and the server's own median decode and model times."""
    latencies = [seconds for _, seconds in results]
    p50 = percentile_ms(latencies, 50)
    server = {
        step: statistics.median(answer["timing_ms"][step] for answer, _ in results)
        for step in ("decode", "model", "total")
    }
    line = (
        f"{name:<34} p50 {p50:6.1f} ms   p95 {percentile_ms(latencies, 95):6.1f} ms   "
        f"(server: decode {server['decode']:.1f} ms, model {server['model']:.1f} ms, "
        f"all {server['total']:.1f} ms; n={len(results)})"
    )
    if reference_ms:
        line += f"   {p50 / reference_ms:.2f}x the 600x450 p50"
    print(line, flush=True)
    return p50


def run_benchmark(args, served):
    """Time the app serving `served` over HTTP: {small_p50, large_p50, requests_per_s, peak_mb}."""
    small, large = read_images(SMALL_IMAGES, args.requests), read_images(LARGE_PHOTOS, args.requests)
    with app_harness.running_server(served, "--threads", str(args.threads)) as (url, process):
        print(f"server: {app_harness.get_json(url, '/healthz')}", flush=True)
        for upload in small[:2] + large[:2]:  # first requests pay one-off costs (connections, caches)
            app_harness.post_file(url, upload)
        small_p50 = report_latency("600x450 (ham10000_sample)", post_sequentially(url, small, args.requests))
        round_trip = round_trip_ms(url, args.requests)
        print(f"{'GET /healthz (HTTP round trip)':<34} p50 {round_trip:6.1f} ms", flush=True)
        large_p50 = report_latency(
            "1024x768-3008x2000 (large_photos)", post_sequentially(url, large, args.requests), small_p50
        )
        if args.explain:
            report_latency("600x450 with ?explain=1", post_sequentially(url, small, args.requests, True))
        answers, seconds = app_harness.post_concurrently(url, small, args.load_requests, args.clients)
        errors = sum(status != 200 for status, _, _ in answers)
        print(
            f"{args.clients} concurrent clients: {args.load_requests / seconds:.1f} requests/s, "
            f"p50 {statistics.median(s for _, _, s in answers) * 1000:.0f} ms, "
            f"errors {errors}/{args.load_requests}"
        )
        peak_mb = app_harness.peak_memory_mb(process)
        print(f"server peak memory (VmHWM): {peak_mb:.0f} MB")
    return {
        "small_p50": small_p50,
        "large_p50": large_p50,
        "requests_per_s": args.load_requests / seconds,
        "peak_mb": peak_mb,
    }


def forward_ms(checkpoint, onnx_path, photo, repeats=30):
    """Median ms of one model-only forward pass at batch 1 on a 600x450 upload's input, each with
    all usable cores: eager torch fp32 as the original project served it (the network in its
    default memory layout, NCHW), the same network in channels_last (how this project's torch
    paths load it; for reference), and the engine on its export."""
    network = engine.OnnxEngine(onnx_path, threads=cli.available_cores())
    channels_last, meta = checkpoints.load_checkpoint(checkpoint)
    original = copy.deepcopy(channels_last).to(memory_format=torch.contiguous_format)
    batch = network.batch([image_input.load_image(photo, min_size=meta["image_size"])])
    tensor = torch.from_numpy(batch)

    def eager(model):
        @torch.inference_mode()
        def step():
            model(tensor)

        return step

    steps = {
        "eager": eager(original),
        "eager_channels_last": eager(channels_last),
        "engine": lambda: network.outputs(batch),
    }
    timings = {}
    for name, step in [*steps.items()] * 2:  # round 1 warms up
        timings[name] = statistics.median(timed(step) for _ in range(repeats))
    return timings


def report_targets(served, forward):
    """Issue 11's targets, as measured in this run."""
    engine_rate = 1000 / forward["engine"]
    print(
        f"model-only forward, batch 1: eager torch fp32 {forward['eager']:.1f} ms (channels_last "
        f"{forward['eager_channels_last']:.1f} ms), engine {forward['engine']:.1f} ms"
    )
    print(f"  600x450 p50 / eager forward:   {served['small_p50'] / forward['eager']:.2f} (target <= 0.70)")
    print(f"  600x450 p50 / engine forward:  {served['small_p50'] / forward['engine']:.2f} (target <= 1.15)")
    print(f"  large photos / 600x450 p50:   {served['large_p50'] / served['small_p50']:.2f} (target <= 1.10)")
    print(f"  requests/s / (1000 / engine ms): {served['requests_per_s'] / engine_rate:.2f} (target >= 0.85)")
    print(f"  server peak memory: {served['peak_mb']:.0f} MB (target <= 450 MiB = 472 MB)")


def upload_parts_ms(onnx_path, photos, repeats=30):
    """Median ms of each part of a 600x450 upload's server work, in this process, on the engine:
    decoding, the network input and image facts (one resize), the forward pass, the answer."""
    network = engine.OnnxEngine(onnx_path, threads=cli.available_cores())
    rules = scoring.ScoringRules(network.meta)
    size = network.meta["image_size"]
    uploads = [photo.read_bytes() for photo in photos]
    images = [image_input.decode_image_bytes(data, size) for data in uploads]
    inputs = [image_input.model_input_and_facts(image, network.meta) for image in images]
    outputs = [network.outputs(pixels[None]) for pixels, _ in inputs]
    parts = {
        "decode": lambda index: image_input.decode_image_bytes(uploads[index], size),
        "input and facts": lambda index: image_input.model_input_and_facts(images[index], network.meta),
        "forward": lambda index: network.outputs(inputs[index][0][None]),
        "answer": lambda index: rules.answers(outputs[index][0], outputs[index][1], [inputs[index][1]]),
    }
    timings = {}
    for name, part in [*parts.items()] * 2:  # round 1 warms up
        timings[name] = statistics.median(
            timed(functools.partial(part, index % len(photos))) for index in range(repeats)
        )
    return timings


def answer_overhead(checkpoint, photos, repeats=30):
    """Median ms of one 600x450 upload's model step at batch 1, in this process: the plain
    forward pass and softmax (what the app ran before it judged images), against the whole
    answer (stage means, calibrated probability, out-of-distribution score, image facts)."""
    model, meta = checkpoints.load_scoring_model(checkpoint)
    image = image_input.load_image(photos[0], min_size=meta["image_size"])
    batch = (
        torch_reference.checkpoint_transform(meta)(image)
        .unsqueeze(0)
        .contiguous(memory_format=torch.channels_last)
    )
    rules = scoring.ScoringRules(with_ood_rules(model, meta, photos))
    cpu = torch.device("cpu")

    @torch.inference_mode()
    def plain():
        torch.softmax(model(batch), dim=1)

    def answer():
        logits, stage_means = backbones.network_outputs(model, batch, cpu)
        rules.answers(logits, stage_means, [image_input.image_facts(image, meta["image_size"])])

    timings = {}
    for name, step in (("plain", plain), ("answer", answer)) * 2:  # the first round warms up
        timings[name] = statistics.median(timed(step) for _ in range(repeats))
    return timings


def with_ood_rules(model, meta, photos):
    """The checkpoint's metadata with out-of-distribution rules: its own, or rules fitted on the
    stage means of `photos` (what the score costs does not depend on the fitted values)."""
    if meta.get("ood"):
        return meta
    import scoring_fit  # the bench may use the training code; the app never does

    transform = torch_reference.checkpoint_transform(meta)
    batch = torch.stack(
        [transform(image_input.load_image(photo, min_size=meta["image_size"])) for photo in photos]
    )
    _, stage_means = backbones.network_outputs(model, batch, torch.device("cpu"))
    scored = engine.ScoredImages(np.zeros(len(photos), dtype=int), None, stage_means, None)
    stages = backbones.backbone_named(meta["arch"]).ood_stages
    return {**meta, "ood": scoring_fit.fit_ood(scored, stage_means, 0.05, stages)}


def timed(step):
    start = time.perf_counter()
    step()
    return 1000 * (time.perf_counter() - start)


def get_args_parser():
    parser = cli.ArgumentParser(description="Time app.py over HTTP on 127.0.0.1 with real images.")
    add = parser.add_argument
    add("--model", type=Path, default=None, help="checkpoint to serve (default: random weights)")
    add("--image-size", type=int, default=384, help="image size of the random checkpoint (default: 384)")
    add("--requests", type=int, default=40, help="sequential requests per image size (default: 40)")
    add("--load-requests", type=int, default=100, help="requests in the concurrent run (default: 100)")
    add("--clients", type=int, default=4, help="concurrent clients (default: 4)")
    add("--threads", type=int, default=4, help="the server's --threads (default: 4)")
    add("--explain", action="store_true", help="also time ?explain=1 (the heat map)")
    add(
        "--precision-data",
        type=Path,
        default=None,
        help="measure the precision gap on every image of this folder (e.g. a prepared val/) "
        "instead of 16 real photos",
    )
    add("--precision-only", action="store_true", help="skip the timing; print only the precision gap")
    return parser


@cli.exits_on_user_error
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    for folder in (SMALL_IMAGES, LARGE_PHOTOS):
        if not folder.is_dir():
            raise errors.UserError(f"{folder}: real images not found (see ../shared/data/README.md)")
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.model
        if checkpoint is None:
            checkpoint = Path(scratch) / "random_model.pth"
            model = backbones.SkinLesionModel(weights="none")
            checkpoints.save_checkpoint(
                checkpoint, model, checkpoints.checkpoint_metadata(image_size=args.image_size)
            )
        _, meta = checkpoints.load_checkpoint(checkpoint)
        weights = meta["weights"] if args.model else "random"
        print(f"{cpu_name()}, torch {torch.__version__}, {meta['image_size']} px, weights: {weights}")
        onnx_path = export.export_onnx(checkpoint, Path(scratch) / "served.onnx")
        if not args.precision_only:
            served = run_benchmark(args, onnx_path)
            report_targets(served, forward_ms(checkpoint, onnx_path, sorted(SMALL_IMAGES.glob("*.jpg"))[0]))
            parts = upload_parts_ms(onnx_path, sorted(SMALL_IMAGES.glob("*.jpg"))[:16])
            print(
                "600x450 upload's parts in-process, medians: "
                + ", ".join(f"{name} {ms:.2f} ms" for name, ms in parts.items())
            )
            overhead = answer_overhead(checkpoint, sorted(SMALL_IMAGES.glob("*.jpg"))[:16])
            print(
                f"model step in-process, batch 1: plain forward {overhead['plain']:.1f} ms, the whole answer "
                f"{overhead['answer']:.1f} ms ({overhead['answer'] / overhead['plain']:.2f}x)"
            )
        photos = sorted(SMALL_IMAGES.glob("*.jpg"))[:8] + sorted(LARGE_PHOTOS.glob("*.jpg"))
        if args.precision_data:
            photos = sorted(args.precision_data.glob("*.jpg"))
            if not photos:
                raise errors.UserError(f"{args.precision_data}: no .jpg images here")
        gap = app_harness.precision_gap(checkpoint, photos, onnx_path)
        print(f"max |probability - fp32 probability| over {len(photos)} real images: {gap:.1e} (target 1e-4)")


if __name__ == "__main__":
    main()
