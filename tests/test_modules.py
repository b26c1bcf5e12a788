"""The modules below the stages: labels, safe image loading, the model, checkpoints, devices."""

import argparse
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from conftest import HAM_SAMPLE, LARGE_PHOTOS, ROOT, SAMPLE, make_random_checkpoint
from PIL import Image

import backbones
import checkpoints
import cli
import devices
import errors
import image_input
import lesion_labels
import prepared
import scoring
import torch_reference
import training_data

SAMPLE_IMAGE = sorted((SAMPLE / "images").glob("*.jpg"))[0]


def encode(image, format_name, **options):
    buffer = io.BytesIO()
    image.save(buffer, format=format_name, **options)
    buffer.seek(0)
    return buffer


def test_file_name_convention_round_trips():
    assert prepared.label_from_filename(prepared.prepared_filename(1, "ISIC_1")) == lesion_labels.MELANOMA
    assert prepared.label_from_filename(prepared.prepared_filename(0, "ISIC_1")) == lesion_labels.NON_MELANOMA
    augmented = prepared.prepared_filename(1, "ISIC_1", augmented_index=3)
    assert augmented == "mel_aug_ISIC_1_3.jpg"
    assert prepared.is_augmented_filename(augmented)
    assert not prepared.is_augmented_filename("mel_ISIC_1.jpg")
    assert prepared.label_from_filename("notes.txt") is None
    assert prepared.label_from_filename("ISIC_1.jpg") is None
    assert prepared.label_from_filename("mel_ISIC_1.csv") is None


def test_manifest_is_written_in_split_order_and_reads_back(tmp_path):
    rows = [
        prepared.ManifestRow("test", "nomel_ISIC_3.jpg", 0, "ISIC_3", None, False),
        prepared.ManifestRow("train", "mel_aug_ISIC_1_0.jpg", 1, "ISIC_1", "HAM_1", True, "mel"),
        prepared.ManifestRow("train", "mel_ISIC_1.jpg", 1, "ISIC_1", "HAM_1", False, "mel", "45", "m", "ear"),
    ]
    path = tmp_path / prepared.MANIFEST_FILE
    prepared.write_manifest(path, rows)
    assert path.read_text(encoding="utf-8") == (
        "split,file,label,source_image,lesion_id,augmented,diagnosis,age,sex,localization\n"
        "train,mel_ISIC_1.jpg,1,ISIC_1,HAM_1,no,mel,45,m,ear\n"
        "train,mel_aug_ISIC_1_0.jpg,1,ISIC_1,HAM_1,yes,mel,,,\n"
        "test,nomel_ISIC_3.jpg,0,ISIC_3,,no,unknown,,,\n"
    )
    assert prepared.read_manifest(path) == [rows[2], rows[1], rows[0]._replace(lesion_id="")]


def test_a_malformed_manifest_is_a_user_error(tmp_path):
    path = tmp_path / prepared.MANIFEST_FILE
    path.write_text("split,file,label,source_image,lesion_id,augmented\ntrain,a.jpg,1,a,,maybe\n")
    with pytest.raises(errors.UserError, match="augmented yes/no"):
        prepared.read_manifest(path)


def test_load_image_applies_exif_orientation():
    upright = Image.open(SAMPLE_IMAGE)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    loaded = image_input.load_image(encode(upright, "JPEG", exif=exif.tobytes()))
    assert loaded.size == (upright.height, upright.width)


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA", "LA", "I;16"])
def test_load_image_converts_every_mode_to_rgb(mode):
    source = Image.open(SAMPLE_IMAGE).convert("RGB")
    if mode == "I;16":
        source = Image.fromarray(np.asarray(source.convert("L"), dtype=np.uint16) * 257)
    else:
        source = source.convert(mode)
    format_name = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    loaded = image_input.load_image(encode(source, format_name))
    assert loaded.mode == "RGB"
    assert loaded.size == source.size
    # 16-bit is scaled down, not clipped to white.
    assert 20 < np.asarray(loaded).mean() < 235


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert np.asarray(image_input.load_image(encode(image, "PNG")))[0, 0].tolist() == [255, 255, 255]


def test_load_image_rejects_truncated_corrupt_and_missing(tmp_path):
    data = SAMPLE_IMAGE.read_bytes()
    with pytest.raises(errors.ImageError, match="not a readable image"):
        image_input.load_image(io.BytesIO(data[: len(data) // 2]))
    with pytest.raises(errors.ImageError, match="not a readable image"):
        image_input.load_image(io.BytesIO(b"this is text, not an image"))
    with pytest.raises(errors.ImageError, match="not found"):
        image_input.load_image(tmp_path / "missing.jpg")


def test_load_image_refuses_decompression_bombs():
    # A PNG that claims 10000 x 10000 pixels compresses to a few hundred kilobytes.
    bomb = encode(Image.new("L", (10_000, 10_000)), "PNG")
    with pytest.raises(errors.ImageError, match="pixels"):
        image_input.load_image(bomb)


def test_jpeg_draft_decodes_large_photos_small_but_not_below_min_size():
    photo = max(LARGE_PHOTOS.glob("images/*.jpg"), key=lambda path: path.stat().st_size)
    full = Image.open(photo).size
    drafted = image_input.load_image(photo, min_size=384).size
    assert min(drafted) >= 384
    assert drafted[0] < full[0]


def test_dataset_reads_labels_from_prefixes(tmp_path):
    from conftest import make_prepared_folder

    folder = make_prepared_folder(tmp_path / "split", count=2)
    (folder / "README.txt").write_text("not an image")
    dataset = training_data.SkinLesionDataset(folder, training_data.eval_transform(32))
    assert sorted(dataset.labels) == [0, 0, 1, 1]
    image, label = dataset[0]
    assert image.shape == (3, 32, 32)
    assert label == prepared.label_from_filename(dataset.paths[0].name)


def test_dataset_on_empty_or_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(errors.UserError, match="no mel_"):
        training_data.SkinLesionDataset(tmp_path, training_data.eval_transform(32))
    with pytest.raises(errors.UserError, match="no such folder"):
        training_data.SkinLesionDataset(tmp_path / "missing", training_data.eval_transform(32))


def test_checkpoint_round_trip_keeps_weights_and_metadata(tmp_path):
    path = make_random_checkpoint(tmp_path / "best_model.pth", image_size=64, threshold=0.31)
    raw = torch.load(path, weights_only=True)
    for key in ("arch", "class_names", "image_size", "mean", "std", "threshold", "weights", "versions"):
        assert key in raw
    model, meta = checkpoints.load_checkpoint(path)
    assert meta["threshold"] == pytest.approx(0.31)
    assert meta["image_size"] == 64
    assert meta["class_names"] == ["Non-Melanoma", "Melanoma"]
    assert not model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, raw["model_state"][name])
    assert not list(tmp_path.glob("*.tmp")), "the temporary file was left behind"


def test_original_bare_state_dict_still_loads(tmp_path):
    """The original project saved `SkinLesionModel.state_dict()` with a single Linear head."""
    original = torchvision.models.efficientnet_v2_s()
    original.classifier = torch.nn.Linear(1280, 2)
    state = {f"efficientnet.{name}": tensor for name, tensor in original.state_dict().items()}
    torch.save(state, tmp_path / "best_model.pth")
    model, meta = checkpoints.load_checkpoint(tmp_path / "best_model.pth")
    assert torch.equal(model.efficientnet.classifier[1].weight, original.classifier.weight)
    assert meta["threshold"] == 0.5
    assert "original" in meta["weights"]


@pytest.mark.parametrize(
    "content, message",
    [(b"garbage", "not a readable checkpoint"), (None, "not found")],
)
def test_bad_checkpoints_are_user_errors(tmp_path, content, message):
    path = tmp_path / "best_model.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(errors.CheckpointError, match=message):
        checkpoints.load_checkpoint(path)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    torch.save({"model_state": {"weight": torch.zeros(2)}, "image_size": 64}, tmp_path / "other.pth")
    with pytest.raises(errors.CheckpointError, match="do not fit"):
        checkpoints.load_checkpoint(tmp_path / "other.pth")


def test_failed_save_leaves_no_file(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        checkpoints.atomic_torch_save({"x": Unpicklable()}, tmp_path / "best_model.pth")
    assert list(tmp_path.iterdir()) == []


def test_imagenet_weights_from_a_missing_file_explain_the_fix(tmp_path):
    with pytest.raises(backbones.WeightsUnavailable, match="--weights"):
        backbones.SkinLesionModel(weights=str(tmp_path / "missing.pth"))


def test_imagenet_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    backbone = torchvision.models.efficientnet_v2_s()
    torch.save(backbone.state_dict(), tmp_path / "efficientnet_v2_s.pth")
    model = backbones.SkinLesionModel(weights=str(tmp_path / "efficientnet_v2_s.pth"))
    assert torch.equal(model.efficientnet.features[0][0].weight, backbone.features[0][0].weight)


def test_device_and_precision_choice():
    cpu = torch.device("cpu")
    assert devices.choose_device("cpu") == cpu
    assert devices.choose_amp_dtype(cpu, "off") is None
    assert devices.choose_amp_dtype(cpu, "bf16") == torch.bfloat16
    expected = torch.bfloat16 if devices.cpu_has_native_bf16() else None
    assert devices.choose_amp_dtype(cpu, "auto") == expected
    with pytest.raises(errors.UserError):
        devices.choose_amp_dtype(cpu, "fp16")
    if not torch.cuda.is_available():
        with pytest.raises(errors.UserError, match="no CUDA"):
            devices.choose_device("cuda")


def test_numeric_flag_types_keep_values_in_range():
    assert (cli.port_number("0"), cli.port_number("65535")) == (0, 65535)
    assert cli.non_negative_float("0") == 0 and cli.positive_float("1e-4") == 1e-4
    assert cli.fraction("1") == 1
    for parse, text in [
        (cli.positive_int, "0"),
        (cli.port_number, "65536"),
        (cli.positive_float, "0"),
        (cli.non_negative_float, "-0.5"),
        (cli.fraction, "0"),
        (cli.fraction, "1.5"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match="must be"):
            parse(text)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_are_shown_on_a_terminal_only(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file or a pipe
    assert not cli.show_progress()
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert cli.show_progress() and not cli.show_progress(wanted=False)


def test_real_sample_images_decode():
    for path in list((HAM_SAMPLE / "images").glob("*.jpg"))[:5]:
        assert image_input.load_image(path).size == (600, 450)


def test_folding_batch_norms_keeps_the_probabilities(tmp_path):
    photos = sorted((HAM_SAMPLE / "images").glob("*.jpg"))[:4]
    checkpoint = make_random_checkpoint(tmp_path / "model.pth")
    model, meta = checkpoints.load_checkpoint(checkpoint)
    for layer in model.modules():  # statistics far from the identity, so that folding matters
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
    transform = torch_reference.checkpoint_transform(meta)
    batch = torch.stack([transform(image_input.load_image(photo)) for photo in photos])
    cpu = torch.device("cpu")
    before = scoring.melanoma_probability(backbones.network_outputs(model, batch, cpu)[0])
    backbones.fold_batch_norms(model)
    assert not any(isinstance(layer, torch.nn.BatchNorm2d) for layer in model.modules())
    after = scoring.melanoma_probability(backbones.network_outputs(model, batch, cpu)[0])
    assert after == pytest.approx(before, abs=1e-5)


def test_the_torch_free_layer_and_the_scripts_above_it_load_no_torch():
    """prepdata.py, analysis.py (with report.py), predict.py and app.py need no torch to start;
    only training, exporting and torch scoring load it (docs/design.md)."""
    code = (
        "import sys\n"
        "import analysis, app, predict, prepdata, report\n"
        "print(sorted(name for name in ('torch', 'torchvision', 'timm') if name in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
