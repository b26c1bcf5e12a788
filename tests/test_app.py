"""app.py: every route, the JSON answers, bad uploads (OWASP rules), precision, load, the CLI."""

import base64
import http.client
import io
import json
import socket
import struct
import urllib.error
import urllib.parse
import urllib.request
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (
    HAM_JPEG,
    HAM_SAMPLE,
    LARGE_JPEG,
    LARGE_PHOTOS,
    SAMPLE,
    SMALL_JPEG,
    TINY_IMAGE_SIZE,
    assert_one_line_error,
    make_random_checkpoint,
    make_varied_checkpoint,
    run_script,
)
from PIL import Image
from werkzeug import formparser

import app
import app_harness
import backbones
import checkpoints
import heatmaps
import image_input
import lesion_labels
import scoring
import torch_reference

MODEL_FIELDS = {"arch", "image_size", "weights", "trained_at", "calibrated", "melanoma_share"}
MODEL_FIELDS |= {"can_flag_images", "engine", "targets"}
ANSWER_FIELDS = {"label", "probability", "threshold", "model", "warnings", "timing_ms", "calibrated"}
ANSWER_FIELDS |= {"reliable", "reasons", "ood_score", "ood_threshold"}


@pytest.fixture(scope="module")
def flask_app(random_checkpoint):
    return app.create_app(random_checkpoint)


@pytest.fixture
def client(flask_app):
    return flask_app.test_client()


def post(client, data, filename="lesion.jpg", route="/api/predict", field="file"):
    return client.post(route, data={field: (io.BytesIO(data), filename)}, content_type="multipart/form-data")


def encoded(image, image_format, **params):
    buffer = io.BytesIO()
    image.save(buffer, image_format, **params)
    return buffer.getvalue()


def real_image(path=SMALL_JPEG):
    with Image.open(path) as image:
        return image.convert("RGB")


def png_header_only(width, height):
    """A PNG whose header claims width x height pixels: a decompression bomb's calling card."""

    def chunk(kind, payload):
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def decoded_data_url(url):
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))


def direct_probability(checkpoint, image):
    """What torch's own scoring path (tests/torch_reference.py) says for `image`, without the app."""
    device = torch.device("cpu")
    model, meta = checkpoints.load_scoring_model(checkpoint, device)
    batch = torch_reference.checkpoint_transform(meta)(image).unsqueeze(0)
    logits, _ = backbones.network_outputs(model, batch, device)
    return float(scoring.ScoringRules(meta).probabilities(logits)[0])


# --- routes and answers ------------------------------------------------------------------------


def test_upload_page_is_self_contained_and_says_it_is_not_a_diagnosis(client):
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "Research tool, not a diagnosis." in html
    assert 'type="file"' in html and 'name="file"' in html
    assert "http://" not in html and "https://" not in html  # no CDN
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    for static in ("/static/app.js", "/static/app.css"):
        assert static in html
        assert client.get(static).status_code == 200


def test_healthz_reports_the_model(client):
    answer = client.get("/healthz").get_json()
    assert answer["status"] == "ok"
    assert set(answer["model"]) == MODEL_FIELDS
    assert answer["model"]["image_size"] == TINY_IMAGE_SIZE
    assert answer["threshold"] == 0.5
    assert answer["precision"] == "fp32"
    assert answer["model"]["engine"] == answer["engine"] == "onnxruntime"


@pytest.mark.parametrize("path", [SMALL_JPEG, HAM_JPEG, LARGE_JPEG], ids=["300x225", "600x450", "3008x2000"])
def test_predict_answers_what_torch_scoring_says(client, random_checkpoint, path):
    response = post(client, path.read_bytes())
    assert response.status_code == 200, response.get_json()
    answer = response.get_json()
    assert set(answer) == ANSWER_FIELDS
    assert set(answer["model"]) == MODEL_FIELDS
    assert set(answer["timing_ms"]) == {"decode", "model", "total"}
    expected = direct_probability(random_checkpoint, image_input.load_image(path, min_size=TINY_IMAGE_SIZE))
    assert answer["probability"] == pytest.approx(expected, abs=1e-5)
    assert answer["label"] == lesion_labels.CLASS_NAMES[int(expected >= answer["threshold"])]
    assert answer["warnings"] == []


@pytest.mark.parametrize("threshold, label", [(0.0, "Melanoma"), (1.0, "Non-Melanoma")])
def test_the_decision_uses_the_checkpoint_threshold(tmp_path, threshold, label):
    checkpoint = make_random_checkpoint(tmp_path / "model.pth", threshold=threshold)
    answer = post(app.create_app(checkpoint).test_client(), SMALL_JPEG.read_bytes()).get_json()
    assert (answer["threshold"], answer["label"]) == (threshold, label)


def test_explain_adds_a_heatmap_png_with_the_upload_aspect(client):
    plain = post(client, HAM_JPEG.read_bytes()).get_json()
    explained = post(client, HAM_JPEG.read_bytes(), route="/api/predict?explain=1").get_json()
    assert "heatmap" not in plain
    width, height = decoded_data_url(explained["heatmap"]).size
    assert max(width, height) <= heatmaps.HEATMAP_MAX_SIDE
    assert width / height == pytest.approx(600 / 450, rel=0.02)
    assert "heatmap" in explained["timing_ms"]
    # Grad-CAM's hooks are gone afterwards: the next plain answer is unchanged.
    assert post(client, HAM_JPEG.read_bytes()).get_json()["probability"] == plain["probability"]


def test_original_route_answers_result_too(client):
    answer = post(client, SMALL_JPEG.read_bytes(), route="/").get_json()
    assert answer["result"] == answer["label"] in lesion_labels.CLASS_NAMES
    assert set(answer) >= ANSWER_FIELDS


# --- formats, modes, EXIF, sizes --------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_score_like_the_same_pixels(client, image_format):
    image = real_image()
    expected = post(client, encoded(image, "PNG"), filename="a.png").get_json()["probability"]
    params = {"lossless": True} if image_format == "WEBP" else {}
    response = post(client, encoded(image, image_format, **params), filename="no_extension")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["probability"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    "mode, image_format",
    [("CMYK", "JPEG"), ("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("L", "TIFF")],
)
def test_every_pixel_mode_is_converted(client, mode, image_format):
    image = real_image()
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)  # 16-bit grey
    else:
        image = image.convert(mode)
    response = post(client, encoded(image, image_format))
    assert response.status_code == 200, response.get_json()
    assert 0.0 <= response.get_json()["probability"] <= 1.0


def test_exif_orientation_is_applied(client):
    upright = real_image()  # 300x225
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored = encoded(upright.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif)  # 225x300 pixels
    answer = post(client, stored, route="/api/predict?explain=1").get_json()
    assert decoded_data_url(answer["heatmap"]).size == upright.size
    assert answer["probability"] == pytest.approx(
        post(client, encoded(upright, "PNG")).get_json()["probability"], abs=1e-5
    )


@pytest.mark.parametrize(
    "size, warning",
    [((48, 48), "smaller than the model's input"), ((256, 64), "elongated")],
    ids=["small", "elongated"],
)
def test_small_or_elongated_images_are_scored_with_a_warning(client, size, warning):
    response = post(client, encoded(real_image().resize(size), "PNG"))
    assert response.status_code == 200
    (only_warning,) = response.get_json()["warnings"]
    assert warning in only_warning


# --- bad input: the right status, a JSON error, and the server still works ---------------------

GIF = encoded(Image.new("P", (40, 40)), "GIF")
TRUNCATED_JPEG = SMALL_JPEG.read_bytes()[:5000]
CORRUPT_PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.mark.parametrize(
    "data, filename, field, status, message",
    [
        (b"just some notes\n", "notes.txt", "file", 415, "unsupported file type"),
        (b"just some notes\n", "lesion.jpg", "file", 415, "unsupported file type"),  # the name lies
        (GIF, "lesion.gif", "file", 415, "unsupported file type"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "scan.pdf", "file", 415, "unsupported file type"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "x.svg", "file", 415, "unsupported file type"),
        (b"", "lesion.jpg", "file", 400, "empty"),
        (SMALL_JPEG.read_bytes(), "lesion.jpg", "image", 400, "field 'file'"),
        (TRUNCATED_JPEG, "lesion.jpg", "file", 400, "not a readable image"),
        (CORRUPT_PNG, "lesion.png", "file", 400, "not a readable image"),
        (png_header_only(9_000, 9_000), "bomb.png", "file", 400, "pixels"),  # 81 MP: Pillow would warn
        (png_header_only(30_000, 30_000), "bomb.png", "file", 400, "pixels"),  # 900 MP: Pillow refuses
        (encoded(real_image().resize((20, 20)), "PNG"), "tiny.png", "file", 400, "too small"),
    ],
    ids=["text", "text-named-jpg", "gif", "pdf", "svg", "empty", "wrong-field", "truncated", "corrupt",
         "bomb-81mp", "bomb-900mp", "tiny"],
)  # fmt: skip
def test_bad_upload_gets_its_status_and_the_next_request_works(
    client, data, filename, field, status, message
):
    response = post(client, data, filename=filename, field=field)
    assert response.status_code == status
    assert message in response.get_json()["error"]
    assert post(client, SMALL_JPEG.read_bytes()).status_code == 200


def test_a_request_without_a_form_is_a_400(client):
    response = client.post("/api/predict", json={"file": "lesion.jpg"})
    assert response.status_code == 400
    assert "field 'file'" in response.get_json()["error"]


def test_an_upload_over_the_limit_is_a_json_413(client, flask_app, monkeypatch):
    assert flask_app.config["MAX_CONTENT_LENGTH"] == 20 * app.MB
    monkeypatch.setitem(flask_app.config, "MAX_CONTENT_LENGTH", app.MB)
    response = post(client, LARGE_JPEG.read_bytes())
    assert response.status_code == 413
    assert response.get_json() == {"error": "the upload is larger than the 1 MB limit"}
    assert post(client, SMALL_JPEG.read_bytes()).status_code == 200


def test_uploads_never_touch_the_disk(client, monkeypatch):
    def no_temporary_files(*args, **kwargs):
        raise AssertionError("an upload was spooled to a temporary file")

    monkeypatch.setattr(formparser, "SpooledTemporaryFile", no_temporary_files)
    assert post(client, LARGE_JPEG.read_bytes()).status_code == 200  # 2.8 MB: Werkzeug would spool it


def test_flask_errors_are_json_too(client):
    missing = client.get("/no/such/page")
    assert missing.status_code == 404 and "error" in missing.get_json()
    wrong_method = client.get("/api/predict")
    assert wrong_method.status_code == 405 and "error" in wrong_method.get_json()
    assert "POST" in wrong_method.headers["Allow"]


def test_an_unexpected_failure_is_a_json_500_without_details(client, flask_app, monkeypatch):
    def broken(image, explain=False):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(flask_app.extensions["predictor"], "answer", broken)
    response = post(client, SMALL_JPEG.read_bytes())
    assert response.status_code == 500
    assert set(response.get_json()) == {"error"}
    body = response.get_data(as_text=True)
    assert "secret" not in body and "Traceback" not in body
    monkeypatch.undo()
    assert post(client, SMALL_JPEG.read_bytes()).status_code == 200


# --- the precision rule --------------------------------------------------------------------------


def test_served_network_stays_within_001_of_the_plain_fp32_network_on_real_images(tmp_path):
    # bench/bench_app.py --model prints the same gap for a trained checkpoint.
    photos = (
        sorted((HAM_SAMPLE / "images").glob("*.jpg"))[:6]
        + sorted((LARGE_PHOTOS / "images").glob("*.jpg"))[:2]
    )
    checkpoint = make_varied_checkpoint(tmp_path / "model.pth", photos, image_size=384)
    assert app_harness.precision_gap(checkpoint, photos) <= 0.01


# --- a real server: load and size limits over HTTP --------------------------------------------


SERVER_PHOTOS = sorted((SAMPLE / "images").glob("*.jpg"))[:5]


SERVER_LIMIT_MB = 2
TOO_LARGE = {"error": "the upload is larger than the 2 MB limit"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(URL, process) of app.py with a 2 MB upload limit."""
    # Probabilities that differ between the photos, so that a batch answering the wrong request
    # would show.
    checkpoint = make_varied_checkpoint(tmp_path_factory.mktemp("varied") / "model.pth", SERVER_PHOTOS)
    with app_harness.running_server(
        checkpoint, "--threads", "4", "--torch-threads", "1", "--max-upload-mb", str(SERVER_LIMIT_MB)
    ) as (url, process):
        yield url, process


@pytest.fixture
def server(served):
    return served[0]


@pytest.mark.timeout(300)
def test_100_requests_from_4_threads_all_succeed_with_their_own_answers(server):
    uploads = [path.read_bytes() for path in SERVER_PHOTOS]
    alone = [app_harness.post_file(server, upload)[1]["probability"] for upload in uploads]
    assert len({round(probability, 3) for probability in alone}) == len(uploads)
    answers, _ = app_harness.post_concurrently(server, uploads, requests=100, clients=4)
    assert [status for status, _, _ in answers] == [200] * 100
    # Each image gets its own probability, however the requests interleave and are batched.
    for index, (_, answer, _) in enumerate(answers):
        assert answer["probability"] == pytest.approx(alone[index % len(uploads)], abs=1e-5)


def test_the_server_answers_an_oversized_upload_with_json_413(server):
    status, answer, _ = app_harness.post_file(server, LARGE_JPEG.read_bytes())  # 2.8 MB > 2 MB
    assert (status, answer) == (413, TOO_LARGE)
    assert app_harness.get_json(server, "/healthz")["status"] == "ok"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("times", [3, 20, 100])
def test_an_upload_of_any_size_over_the_limit_is_a_json_413_without_holding_it(served, times, chunked):
    # The whole body is sent before the answer is read; the server reads it and discards it.
    url, process = served
    peak_before = app_harness.peak_memory_mb(process)
    answer = app_harness.post_large_file(url, times * SERVER_LIMIT_MB * app.MB, chunked=chunked)
    assert answer == (413, "application/json", TOO_LARGE)
    # A chunked body is buffered up to the limit before it is known to be too large; the 6 to
    # 200 MB bodies themselves are never held.
    assert app_harness.peak_memory_mb(process) - peak_before < 3 * SERVER_LIMIT_MB
    assert app_harness.post_file(url, SERVER_PHOTOS[0].read_bytes())[0] == 200


def test_urllib_sending_a_large_body_whole_before_reading_gets_the_json_413(server):
    body = bytes(20 * SERVER_LIMIT_MB * app.MB)
    upload = urllib.request.Request(
        server + "/api/predict", data=body, headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(upload, timeout=60)
    assert refused.value.code == 413
    assert refused.value.headers["Content-Type"] == "application/json"
    assert json.loads(refused.value.read()) == TOO_LARGE
    assert app_harness.get_json(server, "/healthz")["status"] == "ok"


def test_the_413_comes_before_the_body_is_sent(server):
    # A client that reads while it sends (a browser) gets the answer at once, not after 200 MB.
    url = urllib.parse.urlsplit(server)
    with socket.create_connection((url.hostname, url.port), timeout=10) as connection:
        connection.sendall(
            b"POST /api/predict HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: %d\r\n\r\n" % (100 * SERVER_LIMIT_MB * app.MB)
        )
        response = http.client.HTTPResponse(connection)
        response.begin()
        assert (response.status, response.getheader("Content-Type")) == (413, "application/json")
        assert json.loads(response.read()) == TOO_LARGE
    assert app_harness.get_json(server, "/healthz")["status"] == "ok"


# --- the command line ---------------------------------------------------------------------------


def test_missing_checkpoint_is_one_line_telling_to_train_first(tmp_path):
    result = run_script("app.py", "--model", tmp_path / "best_model.pth")
    assert_one_line_error(result)
    assert "train first" in result.stderr and "--model PATH" in result.stderr


def run_main(capsys, *argv):
    """app.main in this process (no torch import to wait for): its exit code and output."""
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--torch-threads", "1", *map(str, argv)])
    output = capsys.readouterr()
    return SimpleNamespace(returncode=exit_info.value.code, stdout=output.out, stderr=output.err)


def test_unreadable_checkpoint_is_one_line(tmp_path, capsys):
    garbage = tmp_path / "best_model.pth"
    garbage.write_text("not a checkpoint")
    assert_one_line_error(run_main(capsys, "--model", garbage))


def test_a_busy_port_is_one_line(random_checkpoint, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run_main(capsys, "--model", random_checkpoint, "--port", busy.getsockname()[1])
    assert_one_line_error(result)
    assert "--port" in result.stderr


@pytest.mark.parametrize(
    "flag, value",
    [("--threads", "0"), ("--torch-threads", "0"), ("--max-upload-mb", "0"), ("--port", "70000")],
)
def test_a_number_out_of_range_is_one_line(random_checkpoint, capsys, flag, value):
    result = run_main(capsys, "--model", random_checkpoint, flag, value)
    assert_one_line_error(result)
    assert flag in result.stderr


def test_help_lists_every_flag(capsys):
    result = run_main(capsys, "--help")
    assert result.returncode == 0
    for flag in (
        "--model",
        "--host",
        "--port",
        "--threads",
        "--torch-threads",
        "--device",
        "--max-upload-mb",
    ):
        assert flag in result.stdout
    assert "--debug" in result.stdout
