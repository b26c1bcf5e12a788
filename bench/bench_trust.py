"""Benchmark the answer's trust parts: out-of-distribution flagging and calibration.

Does the out-of-distribution score flag images that are not skin lesions, and what does
calibration change on the held-out test split?

    .venv/bin/python bench/bench_trust.py      # what `make bench-quality` trained ("ours") and its test split
    .venv/bin/python bench/bench_trust.py --model best_model.pth --data prepared_dataset/test \\
        --non-lesion bench_runs/trust/non_lesion --json bench_runs/trust/bench_trust.json
    make bench-trust

It first builds a set of images that are not skin lesions (below) in --non-lesion, offline and
the same on every run, then scores the real lesions of --data and that set as app.py scores an
upload: reduced-scale JPEG decoding, the checkpoint's transform, the network with folded batch
norms, the checkpoint's ScoringRules. It prints, and writes to --json:
- the out-of-distribution score's ROC AUC for telling test lesions from non-lesion images;
- the share of non-lesion images flagged at the stored threshold (target >= 95%), the ones not
  flagged, and a table by kind; the share of test lesions flagged (target <= the validation
  flag rate the threshold was set for, 5% by default);
- on the test split, before and after calibration: expected calibration error (target <= 0.05),
  Brier score, ROC AUC (equal by construction) and whether the same images are labelled melanoma
  at the stored thresholds.
It prints figures; it never fails on them. A checkpoint without calibration or an
out-of-distribution score ends with one line and exit code 2.

The non-lesion set, file names by kind (`kind_what.ext`):
- photo_*: scikit-learn's bundled sample photos (sklearn.datasets.load_sample_images: china.jpg,
  flower.jpg) and matplotlib's grace_hopper.jpg (mpl-data/sample_data), each whole, as three crops
  and as a small copy;
- graphic_*: matplotlib's bundled Minduka_Present_Blue_Pack.png (an icon) and logo2.png (a logo),
  both with transparency;
- medical_*: matplotlib's s1045.ima.gz, a 256x256 MRI slice of a head (16-bit raw);
- map_*: matplotlib's jacksboro_fault_dem.npz (an elevation model, hill-shaded) and
  topobathy.npz (topography and bathymetry, drawn as a coloured map);
- flat_*: single colours, skin tones among them; gradient_*: linear and radial colour ramps;
- noise_*: uniform and Gaussian noise, seeded;
- text_*: pages of text drawn with Pillow in matplotlib's bundled DejaVu fonts;
- chart_*: bar, line, scatter, pie and heat-map charts drawn with matplotlib;
- skin_*: skin as a camera sees it without a dermatoscope, synthesised: a skin tone under a
  lighting gradient, with blotches, pores and grain, and no lesion;
- webpage_*: a local HTML page (headings, paragraphs, a table) as Debian's Chromium shows it on a
  desktop and on a phone, through Playwright; skipped with a note when Chromium is not installed.
"""

import argparse
import functools
import io
import json
import shlex
import sys
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import scipy.ndimage
import sklearn.datasets
import torch
from matplotlib import cbook
from matplotlib.colors import LightSource
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # app_harness and torch_reference: what the tests see of the app

import checkpoints  # noqa: E402
import cli  # noqa: E402
import devices  # noqa: E402
import engine  # noqa: E402
import errors  # noqa: E402
import files  # noqa: E402
import lesion_labels  # noqa: E402
import metrics  # noqa: E402
import prepared  # noqa: E402
import scoring  # noqa: E402
import scoring_fit  # noqa: E402
from devices import cpu_name  # noqa: E402

# `make bench-quality` leaves our recipe's checkpoint and prepared tree here.
WORK = ROOT / "bench_runs" / "quality" / "ours"
CHROMIUM = "/usr/bin/chromium"  # Debian's package: `make browser` installs it
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SEED = 0
# Drawn images have the size of a HAM10000 image: they reach the model at the scale real lesions do.
CANVAS = (600, 450)
FONTS = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
SAVE_OPTIONS = {".jpg": {"quality": 90}, ".png": {}}

NON_LESION_FLAGGED_TARGET = 0.95
CALIBRATION_ERROR_TARGET = 0.05


# --- the non-lesion set: (file name, PIL image) pairs, in a fixed order -----------------------


def bundled_photos():
    """{name: RGB photo}: scikit-learn's two sample photos and matplotlib's portrait."""
    samples = sklearn.datasets.load_sample_images()
    pairs = zip(samples.filenames, samples.images, strict=True)
    photos = {Path(name).stem: Image.fromarray(array) for name, array in pairs}
    with cbook.get_sample_data("grace_hopper.jpg") as file:
        photos["grace_hopper"] = Image.open(file).convert("RGB")
    return photos


def photo_crops(name, photo):
    """The photo whole, its centre half, its top-left quarter, a small centre square, and a copy
    at a quarter of its size (smaller than most models' input)."""
    width, height = photo.size
    side = min(width, height) // 3
    left, top = (width - side) // 2, (height - side) // 2
    yield f"photo_{name}.jpg", photo
    yield (
        f"photo_{name}_crop_centre.jpg",
        photo.crop((width // 4, height // 4, 3 * width // 4, 3 * height // 4)),
    )
    yield f"photo_{name}_crop_corner.jpg", photo.crop((0, 0, width // 2, height // 2))
    yield f"photo_{name}_crop_square.jpg", photo.crop((left, top, left + side, top + side))
    yield f"photo_{name}_small.jpg", photo.resize((width // 4, height // 4), Image.Resampling.LANCZOS)


def photos():
    for name, photo in bundled_photos().items():
        yield from photo_crops(name, photo)


def graphics():
    for name, file_name in (("present_icon", "Minduka_Present_Blue_Pack.png"), ("logo", "logo2.png")):
        with cbook.get_sample_data(file_name) as file:
            yield f"graphic_{name}.png", Image.open(file).convert("RGBA")


def medical_scan():
    """The MRI slice: 256x256 big-endian 16-bit values, kept 16-bit as a scanner would save it."""
    with cbook.get_sample_data("s1045.ima.gz") as file:
        slice_ = np.frombuffer(file.read(), dtype=">u2").reshape(256, 256).astype(np.uint16)
    yield "medical_mri_slice.png", Image.fromarray(slice_)


def figure_image(figure):
    """A matplotlib Figure drawn to an RGB PIL image."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def maps():
    dem = cbook.get_sample_data("jacksboro_fault_dem.npz")
    shaded = LightSource(azdeg=315, altdeg=45).shade(
        dem["elevation"], cmap=matplotlib.colormaps["gist_earth"], blend_mode="overlay", vert_exag=0.05
    )
    yield "map_jacksboro_hillshade.png", Image.fromarray((shaded[..., :3] * 255).astype(np.uint8))
    topobathy = cbook.get_sample_data("topobathy.npz")
    figure = Figure(figsize=(6, 4.5))
    axes = figure.subplots()
    image = axes.imshow(topobathy["topo"], cmap="terrain", origin="lower")
    figure.colorbar(image, ax=axes, label="elevation (m)")
    axes.set(xlabel="longitude index", ylabel="latitude index", title="Topography and bathymetry")
    yield "map_topobathy.png", figure_image(figure)


FLAT_COLOURS = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "grey": (128, 128, 128),
    "red": (200, 30, 30),
    "green": (40, 160, 60),
    "blue": (30, 60, 200),
    "beige": (245, 245, 220),
    "skin_light": (241, 194, 167),
    "skin_medium": (198, 134, 66),
    "skin_dark": (120, 72, 40),
}


def flat_colours():
    for name, colour in FLAT_COLOURS.items():
        yield f"flat_{name}.png", Image.new("RGB", CANVAS, colour)


def colour_ramp(weights, start, end):
    """An RGB image blending colour `start` (weight 0) into `end` (weight 1), pixel by pixel."""
    weights = np.clip(weights, 0, 1)[..., None]
    pixels = (1 - weights) * np.array(start) + weights * np.array(end)
    return Image.fromarray(pixels.round().astype(np.uint8))


def gradients():
    width, height = CANVAS
    y, x = np.mgrid[0:height, 0:width]
    yield "gradient_horizontal_grey.png", colour_ramp(x / (width - 1), (0, 0, 0), (255, 255, 255))
    yield "gradient_vertical_blue_yellow.png", colour_ramp(y / (height - 1), (20, 40, 160), (250, 220, 60))
    # A dark brown centre fading into skin: the shape of a lesion without any of its structure.
    distance = np.hypot(x - width / 2, y - height / 2) / (height / 2)
    yield "gradient_radial_brown_skin.png", colour_ramp(distance, (90, 50, 30), FLAT_COLOURS["skin_light"])


def noise():
    rng = np.random.default_rng(SEED)
    width, height = CANVAS
    yield (
        "noise_uniform_colour.png",
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)),
    )
    grey = rng.normal(128, 40, (height, width))
    yield "noise_gaussian_grey.png", Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8))
    skin = rng.normal(FLAT_COLOURS["skin_light"], 25, (height, width, 3))
    yield "noise_gaussian_skin_tone.png", Image.fromarray(np.clip(skin, 0, 255).astype(np.uint8))


PAGE_TEXT = (
    "Melanoma is a cancer of the cells that give skin its colour. Dermoscopy looks at a skin "
    "lesion through a magnifying lens with its own light, which shows structures under the "
    "surface that the naked eye cannot see. A classifier trained on such images has seen nothing "
    "else: a photograph, a chart or a page of text is not something it can judge, and it should "
    "say so instead of giving a probability."
)


def text_page(font_file, size, ink, paper, width_chars):
    """A page of PAGE_TEXT, wrapped to `width_chars` characters, from the top-left margin down."""
    page = Image.new("RGB", CANVAS, paper)
    font = ImageFont.truetype(str(FONTS / font_file), size)
    text = "\n\n".join(textwrap.fill(PAGE_TEXT, width_chars) for _ in range(3))
    ImageDraw.Draw(page).multiline_text((24, 24), text, font=font, fill=ink, spacing=6)
    return page


def text_pages():
    yield "text_serif_page.png", text_page("DejaVuSerif.ttf", 15, (20, 20, 20), (255, 255, 255), 68)
    yield "text_mono_dark.png", text_page("DejaVuSansMono.ttf", 13, (210, 230, 210), (30, 30, 30), 70)
    yield "text_large_sans.png", text_page("DejaVuSans-Bold.ttf", 30, (250, 250, 250), (40, 90, 160), 34)


def chart(title, xlabel, ylabel, draw):
    """A 6x4.5 inch chart: `draw(axes)` draws the data, the labels come from here."""
    figure = Figure(figsize=(6, 4.5))
    axes = figure.subplots()
    draw(axes)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return figure_image(figure)


def charts():
    rng = np.random.default_rng(SEED)
    months = np.arange(1, 13)
    yield (
        "chart_bars.png",
        chart(
            "Visits per weekday",
            "weekday",
            "visits",
            lambda axes: axes.bar(["Mon", "Tue", "Wed", "Thu", "Fri"], [42, 35, 28, 39, 31]),
        ),
    )
    yield (
        "chart_lines.png",
        chart(
            "Two seasonal series",
            "month",
            "value",
            lambda axes: [axes.plot(months, np.sin(months / 2 + phase), marker="o") for phase in (0, 1)],
        ),
    )
    points = rng.normal(size=(2, 200))
    yield (
        "chart_scatter.png",
        chart("Scatter", "x", "y", lambda axes: axes.scatter(points[0], points[0] + points[1] / 2, s=12)),
    )
    yield (
        "chart_pie.png",
        chart("Shares", "", "", lambda axes: axes.pie([45, 30, 15, 10], labels=list("ABCD"))),
    )
    density = cbook.get_sample_data("axes_grid/bivariate_normal.npy")  # numpy loads .npy files itself
    yield "chart_heatmap.png", chart("Density", "x", "y", lambda axes: axes.imshow(density, cmap="viridis"))


def synthetic_skin(tone, rng):
    """Skin as an ordinary camera sees it under a lamp: the tone lit more on one side, soft
    blotches, pores, sensor grain; nothing that looks like a lesion."""
    width, height = CANVAS
    y, x = np.mgrid[0:height, 0:width] / width
    lighting = 1.1 - 0.25 * x - 0.1 * y
    blotches = scipy.ndimage.gaussian_filter(rng.normal(size=(height, width)), sigma=30)
    blotches *= 0.035 / blotches.std()
    pores = scipy.ndimage.gaussian_filter((rng.random((height, width)) < 0.003).astype(float), sigma=1.2)
    pores *= 0.15 / pores.max()
    grain = rng.normal(0, 0.02, (height, width))
    shade = lighting * (1 + blotches - pores + grain)
    return Image.fromarray(np.clip(np.array(tone) * shade[..., None], 0, 255).astype(np.uint8))


def skin():
    rng = np.random.default_rng(SEED)
    for name in ("light", "medium", "dark"):
        yield f"skin_{name}.jpg", synthetic_skin(FLAT_COLOURS[f"skin_{name}"], rng)


WEB_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Clinic opening hours</title>
<style>body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; } td, th { border: 1px solid #999; padding: 0.3em 0.8em; }
th { background: #dde6f0; } h1 { color: #24507a; }</style></head>
<body><h1>Dermatology clinic</h1>
<p>Appointments for skin checks are booked online or by phone. Bring a list of your medicines
and any earlier results. A visit takes about twenty minutes.</p>
<h2>Opening hours</h2>
<table><tr><th>Day</th><th>Morning</th><th>Afternoon</th></tr>
<tr><td>Monday</td><td>8:00-12:00</td><td>13:00-17:00</td></tr>
<tr><td>Wednesday</td><td>8:00-12:00</td><td>closed</td></tr>
<tr><td>Friday</td><td>9:00-12:00</td><td>13:00-16:00</td></tr></table>
<h2>Before your visit</h2>
<p>Do not wear nail polish or make-up on the areas to be examined. Tell us about any mole that
has changed in size, shape or colour.</p></body></html>"""
VIEWPORTS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}


def web_page_screenshots(chromium):
    if not Path(chromium).is_file():
        print(f"note: {chromium} not found: no web-page screenshots (`make browser` installs Chromium)")
        return
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            for name, viewport in VIEWPORTS.items():
                page = browser.new_page(viewport=viewport)
                page.set_content(WEB_PAGE)
                yield f"webpage_{name}.png", Image.open(io.BytesIO(page.screenshot()))
        finally:
            browser.close()


def non_lesion_images(chromium):
    """Every (file name, PIL image) of the non-lesion set, in a fixed order."""
    for source in (
        photos,
        graphics,
        medical_scan,
        maps,
        flat_colours,
        gradients,
        noise,
        text_pages,
        charts,
        skin,
    ):
        yield from source()
    yield from web_page_screenshots(chromium)


def build_non_lesion_set(folder, chromium=CHROMIUM):
    """Write the non-lesion set into `folder`; its paths, in order. Other files there stay, unscored."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in non_lesion_images(chromium):
        path = folder / name
        image.save(path, **SAVE_OPTIONS[path.suffix])
        paths.append(path)
    return paths


def kind_of(path):
    return Path(path).name.split("_")[0]


# --- scoring as the app scores an upload --------------------------------------------------------


def score_files(network, rules, paths, description, batch_size):
    """(engine.ScoredImages, the app's answer for each image) of image files, decoded and scored
    by the engine's one loop, as app.py scores an upload."""
    scored = engine.score_files(network, paths, batch_size=batch_size, description=description)
    return scored, rules.answers(scored.logits, scored.stage_means, scored.facts)


def compare_stage_sets(network, scored, tree, flag_rate, stage_sets, batch_size):
    """For each candidate set of stages, the out-of-distribution score fitted as model.py fits it
    (original train/ images; threshold flagging `flag_rate` of val/), and the share of each
    scored set of images (`scored`: name -> ScoredImages) it flags. Chosen on validation lesions
    and the non-lesion pictures only: test images are not part of the choice."""
    samples = {
        split: [sample for sample in prepared.list_prepared_images(tree / split)
                if not prepared.is_augmented_filename(sample[0])]
        for split in ("train", "val")
    }  # fmt: skip
    fitted_on = {
        split: engine.score_files(
            network, *zip(*pairs, strict=True), batch_size=batch_size, description=split
        )
        for split, pairs in samples.items()
    }
    rows = []
    for stages in stage_sets:
        ood = scoring_fit.fit_ood(fitted_on["train"], fitted_on["val"].stage_means, flag_rate, stages)
        as_scored = {"stages": [scoring.as_arrays(stage) for stage in ood["stages"]]}
        shares = {
            name: float(np.mean(scoring.ood_scores(images.stage_means, as_scored) > ood["threshold"]))
            for name, images in scored.items()
        }
        rows.append({"stages": list(stages), **shares})
    return rows


def missing_scoring_rules(path, meta, rules):
    """Why this checkpoint cannot be benchmarked here (None when it can)."""
    if not rules.can_flag:
        return (
            f"{path}: this checkpoint has no out-of-distribution score (saved before it existed); "
            "add it with model.py --fit-scoring-only"
        )
    if rules.calibration is None:
        return f"{path}: {meta.get('not_calibrated') or 'not calibrated (saved before calibration existed)'}"
    return None


# --- the figures -----------------------------------------------------------------------------------


def flagged(answers):
    return np.array([not answer["reliable"] for answer in answers])


def flagging_report(rules, lesion_answers, non_lesion_answers, non_lesion_paths):
    """How the out-of-distribution score separates test lesions from non-lesion images."""
    scores = [answer["ood_score"] for answer in lesion_answers + non_lesion_answers]
    is_non_lesion = np.r_[np.zeros(len(lesion_answers)), np.ones(len(non_lesion_answers))]
    non_lesion_flagged = flagged(non_lesion_answers)
    kinds = [kind_of(path) for path in non_lesion_paths]
    return {
        "ood_threshold": rules.ood["threshold"],
        "ood_validation_flag_rate": rules.ood["flag_rate"],
        "ood_roc_auc_non_lesion_vs_test": metrics.roc_auc(is_non_lesion, scores),
        "non_lesion_images": len(non_lesion_answers),
        "non_lesion_flagged_share": float(non_lesion_flagged.mean()),
        "non_lesion_not_flagged": [
            {"file": Path(path).name, "ood_score": answer["ood_score"]}
            for path, answer in zip(non_lesion_paths, non_lesion_answers, strict=True)
            if answer["reliable"]
        ],
        "test_images": len(lesion_answers),
        "test_flagged_share": float(flagged(lesion_answers).mean()),
        "by_kind": {
            kind: {"n": kinds.count(kind), "flagged": int(non_lesion_flagged[np.array(kinds) == kind].sum())}
            for kind in dict.fromkeys(kinds)
        },
    }


def before_and_after(metric, labels, uncalibrated, calibrated):
    return {"uncalibrated": metric(labels, uncalibrated), "calibrated": metric(labels, calibrated)}


def calibration_report(meta, rules, labels, logits):
    """What calibration changes on the test split, and what it must leave alone."""
    uncalibrated = scoring.melanoma_probability(logits, melanoma_index=rules.melanoma_index)
    calibrated = rules.probabilities(logits)
    roc_auc = before_and_after(metrics.roc_auc, labels, uncalibrated, calibrated)
    melanoma_before = metrics.predict_labels(uncalibrated, meta["threshold_uncalibrated"])
    melanoma_after = metrics.predict_labels(calibrated, meta["threshold"])
    return {
        "test_melanoma_share": float(np.mean(labels == lesion_labels.MELANOMA)),
        "expected_calibration_error": before_and_after(
            metrics.expected_calibration_error, labels, uncalibrated, calibrated
        ),
        "brier_score": before_and_after(metrics.brier_score, labels, uncalibrated, calibrated),
        "roc_auc": roc_auc,
        "roc_auc_equal": roc_auc["uncalibrated"] == roc_auc["calibrated"],
        "thresholds": {"uncalibrated": meta["threshold_uncalibrated"], "calibrated": meta["threshold"]},
        "melanoma_labels_identical": bool(np.array_equal(melanoma_before, melanoma_after)),
        "images_labelled_differently": int(np.sum(melanoma_before != melanoma_after)),
    }


def print_stage_sets(rows, flag_rate):
    print(f"\nStages the out-of-distribution score reads, each fitted to flag {flag_rate:.0%} of val/:")
    for row in rows:
        stages = ",".join(map(str, row["stages"]))
        print(f"  stages {stages:<12} non-lesion images flagged {row['non_lesion']:.1%}")


def number(value):
    """A figure for the terminal; None (a metric the images cannot define) as 'undefined'."""
    return "undefined" if value is None else f"{value:.4f}"


def share(fraction, count):
    return f"{round(fraction * count)}/{count} = {fraction:.1%}"


def target(met, text):
    return f"(target {text}: {'met' if met else 'NOT met'})"


def print_flagging(report):
    non_lesion, test = report["non_lesion_flagged_share"], report["test_flagged_share"]
    flag_rate = report["ood_validation_flag_rate"]
    print(
        f"\nOut-of-distribution flag (score above {report['ood_threshold']:.1f}, set to flag "
        f"{flag_rate:.0%} of validation images):"
    )
    print(f"  ROC AUC, test lesions vs non-lesion images: {number(report['ood_roc_auc_non_lesion_vs_test'])}")
    non_lesion_target = target(non_lesion >= NON_LESION_FLAGGED_TARGET, f">= {NON_LESION_FLAGGED_TARGET:.0%}")
    print(
        f"  non-lesion images flagged: {share(non_lesion, report['non_lesion_images'])} {non_lesion_target}"
    )
    test_target = target(test <= flag_rate, f"<= {flag_rate:.0%}")
    print(f"  test lesions flagged:      {share(test, report['test_images'])} {test_target}")
    for image in report["non_lesion_not_flagged"]:
        print(f"  not flagged: {image['file']} (score {image['ood_score']:.1f})")
    print(f"\n  {'kind':<10} {'n':>3} {'flagged':>8}")
    for kind, counts in report["by_kind"].items():
        print(f"  {kind:<10} {counts['n']:>3} {counts['flagged']:>8}")


def print_row(name, values, note=""):
    row = f"  {name:<28} {number(values['uncalibrated']):>12} {number(values['calibrated']):>12}   {note}"
    print(row.rstrip())


def print_calibration(report, n_test):
    print(f"\nCalibration on the test split ({n_test} images, {report['test_melanoma_share']:.1%} melanoma):")
    print(f"  {'':<28} {'uncalibrated':>12} {'calibrated':>12}")
    ece = report["expected_calibration_error"]
    ece_target = target(ece["calibrated"] <= CALIBRATION_ERROR_TARGET, f"<= {CALIBRATION_ERROR_TARGET}")
    print_row("expected calibration error", ece, ece_target)
    print_row("Brier score", report["brier_score"])
    print_row("ROC AUC", report["roc_auc"], f"equal: {'yes' if report['roc_auc_equal'] else 'NO'}")
    thresholds = report["thresholds"]
    differ = report["images_labelled_differently"]
    print(
        f"  images labelled melanoma at the stored thresholds ({thresholds['uncalibrated']:.4f} "
        f"uncalibrated, {thresholds['calibrated']:.4f} calibrated): "
        f"{'identical' if report['melanoma_labels_identical'] else f'{differ} differ'}"
    )


# --- the command line ------------------------------------------------------------------------------


def get_args_parser():
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add(
        "--model",
        type=Path,
        default=WORK / "best_model.pth",
        help="checkpoint written by model.py (default: %(default)s)",
    )
    add(
        "--data",
        type=Path,
        default=WORK / "prepared_dataset" / "test",
        help="folder of real mel_*/nomel_* test images (default: %(default)s)",
    )
    add(
        "--non-lesion",
        type=Path,
        default=WORK / "non_lesion",
        help="folder the non-lesion set is written to, then scored from (default: %(default)s)",
    )
    add(
        "--json",
        type=Path,
        default=WORK / "bench_trust.json",
        help="where to write the figures (default: %(default)s)",
    )
    add(
        "--chromium",
        default=CHROMIUM,
        help="Chromium for the web-page screenshots; when missing they are skipped (default: %(default)s)",
    )
    add("--batch-size", type=cli.positive_int, default=32, help="images per forward pass (default: 32)")
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    add(
        "--compare-stages",
        type=stage_set,
        nargs="+",
        metavar="STAGES",
        help="also refit the out-of-distribution score on these sets of stages (e.g. 1,2,3 0,1,2) "
        "from --data's train/ and val/, and print the share of non-lesion images each flags",
    )
    return parser


def stage_set(text):
    try:
        return tuple(int(stage) for stage in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"stages as comma-separated numbers, not {text!r}") from None


@cli.exits_on_user_error
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = get_args_parser().parse_args(argv)
    device = devices.choose_device(args.device)
    network = checkpoints.TorchNetwork(args.model, device)
    meta = network.meta
    rules = scoring.ScoringRules(meta)
    problem = missing_scoring_rules(args.model, meta, rules)
    if problem:
        raise errors.UserError(problem)
    test = prepared.list_prepared_images(args.data)
    if not test:
        raise errors.UserError(f"{args.data}: no mel_*/nomel_* images in this folder")
    print(f"{cpu_name()}, torch {torch.__version__}, {device}; {args.model}: {meta['image_size']} px")
    non_lesion_paths = build_non_lesion_set(args.non_lesion, args.chromium)
    print(f"Non-lesion set: {len(non_lesion_paths)} images in {args.non_lesion}")
    score = functools.partial(score_files, network, rules, batch_size=args.batch_size)
    test_scored, test_answers = score([path for path, _ in test], "Test lesions")
    non_lesion_scored, non_lesion_answers = score(non_lesion_paths, "Non-lesion images")
    test_logits = test_scored.logits
    labels = np.array([label for _, label in test])
    report = {
        "command": shlex.join([str(Path(__file__).relative_to(ROOT)), *argv]),
        "cpu": cpu_name(),
        "checkpoint": str(args.model),
        "image_size": meta["image_size"],
        "torch": torch.__version__,
        "targets": {
            "non_lesion_flagged_share_at_least": NON_LESION_FLAGGED_TARGET,
            "test_flagged_share_at_most": rules.ood["flag_rate"],
            "calibrated_expected_calibration_error_at_most": CALIBRATION_ERROR_TARGET,
        },
        "flagging": flagging_report(rules, test_answers, non_lesion_answers, non_lesion_paths),
        "calibration": calibration_report(meta, rules, labels, test_logits),
    }
    print_flagging(report["flagging"])
    print_calibration(report["calibration"], len(test))
    if args.compare_stages:
        report["stage_sets"] = compare_stage_sets(
            network, {"non_lesion": non_lesion_scored}, args.data.parent, rules.ood["flag_rate"],
            args.compare_stages, args.batch_size,
        )  # fmt: skip
        print_stage_sets(report["stage_sets"], rules.ood["flag_rate"])
    files.atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    print(f"\nWrote {args.json}")


if __name__ == "__main__":
    main()
