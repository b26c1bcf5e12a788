"""Serve best_model.pth: an upload page and a JSON API that answer Melanoma / Non-Melanoma, and why.

    python app.py --model best_model.pth          # then open http://127.0.0.1:5000

Routes: `GET /` (the page), `POST /api/predict` (field `file`; `?explain=1` adds a heat map),
`POST /` (the original project's route: the same answer plus `result`), `GET /healthz`. With
best_model.onnx beside the checkpoint (model.py writes it), ONNX Runtime scores. Every error is
JSON `{"error": "..."}` with its HTTP status. Research tool, not a diagnosis.
"""

import base64
import functools
import io
import json
import queue
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import waitress
import waitress.channel
import waitress.parser
import waitress.receiver
import waitress.server
import waitress.utilities
from flask import Flask, Request, abort, current_app, jsonify, render_template, request
from PIL import Image
from werkzeug.exceptions import HTTPException

import cli
import engine
import errors
import heatmaps
import image_input
import lesion_labels
import scoring

MB = 1024 * 1024
DEFAULT_MAX_UPLOAD_MB = 20

# Most waiting uploads scored in one forward pass (in flight are at most the server's --threads).
MAX_BATCH = 8


class InMemoryRequest(Request):
    """Keeps uploaded files in memory: Werkzeug spools files over 500 KB to a temporary file,
    and uploads must never touch the disk. MAX_CONTENT_LENGTH bounds the memory."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


class Predictor:
    """The network (engine.load_network), loaded once, and the one thread that runs every model
    call on it.

    Loading, predictions and heat maps all run on a single "model" thread, one call at a time
    with all of the network's threads: the lowest latency without oversubscribing the cores,
    while the server's threads read and decode the next uploads.

    One thread matters for speed with torch too: its OpenMP keeps a pool of worker threads for
    each thread that runs a parallel operation. Once a second thread has run one, the pools
    outnumber the cores, OpenMP stops spin-waiting between operations, and the forward pass slows
    down by a third or more (figures in docs/measurements.md).
    """

    def __init__(self, model_path, device="auto", threads=None):
        self.waiting = queue.SimpleQueue()  # (network input, facts, explain, Future) of the next batch
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.network = self.executor.submit(engine.load_network, model_path, device, threads).result()
        self.meta = self.network.meta
        self.rules = scoring.ScoringRules(self.meta)

    def summary(self):
        return {
            **{key: self.meta.get(key) for key in ("arch", "image_size", "weights", "trained_at")},
            "calibrated": self.rules.calibration is not None,
            "melanoma_share": (self.rules.calibration or {}).get("melanoma_share"),
            "can_flag_images": self.rules.can_flag,
            "engine": self.network.engine,
            # the head the melanoma probability comes from (model.py --targets)
            "targets": self.meta.get("targets", "melanoma"),
        }

    def answer(self, image, explain=False):
        """(the answer for a decoded PIL image (scoring.ScoringRules.answers): calibrated melanoma
        probability, label, whether the model can judge the image, warnings; with `explain`,
        its heat map for that label from the same forward pass, else None).

        Images that arrive while the model is busy wait, and are then scored together in one
        forward pass: a batch of 4 costs about 20% less per image than 4 single passes on 2
        cores, so under load the server answers more requests per second. The network's input
        and the image's facts (size, sharpness, ...) come from one resize, here, on the
        request's thread, meanwhile (image_input.model_input_and_facts)."""
        answer = Future()
        pixels, facts = image_input.model_input_and_facts(image, self.meta)
        self.waiting.put((pixels, facts, explain, answer))
        self.executor.submit(self._score_waiting)
        return answer.result()

    def _score_waiting(self):
        """On the model thread: score every waiting image in one batch (none left: an earlier
        call took them)."""
        jobs = []
        while len(jobs) < MAX_BATCH and not self.waiting.empty():
            jobs.append(self.waiting.get())
        if not jobs:
            return
        try:
            logits, stage_means, feature_maps = self.network.outputs(np.stack([job[0] for job in jobs]))
            answers = self.rules.answers(logits, stage_means, [job[1] for job in jobs])
            heatmaps = [
                self._heatmap(feature_maps[index : index + 1], logits[index : index + 1], answer)
                if explain
                else None
                for index, ((_, _, explain, _), answer) in enumerate(zip(jobs, answers, strict=True))
            ]
        except Exception as error:  # every request of the batch gets it (a JSON 500)
            for *_, future in jobs:
                future.set_exception(error)
            return
        for (*_, future), answer, heatmap in zip(jobs, answers, heatmaps, strict=True):
            future.set_result((answer, heatmap))

    def _heatmap(self, feature_map, logits, answer):
        """The heat map of one image for its answer's label: (H, W) floats in [0, 1]."""
        label = lesion_labels.CLASS_NAMES.index(answer["label"])
        return self.network.heatmaps(feature_map, logits, [label])[0]

    def warm_up(self):
        """Pay the first-call costs (kernel selection, allocations) before the first user does."""
        size = self.meta["image_size"]
        self.answer(Image.new("RGB", (size, size), (180, 120, 100)), explain=True)


def read_upload():
    """The bytes of the multipart field `file` (400 when there is none)."""
    upload = request.files.get("file")
    if upload is None:
        abort(400, "no file: send the image as the multipart form field 'file'")
    return upload.read()


def decode_upload(data, image_size):
    """The uploaded image, by the rule predict.py applies to files too (image_input.decode_image_bytes):
    415 for a format not decoded on purpose, 400 for any other refusal."""
    try:
        return image_input.decode_image_bytes(data, image_size)
    except image_input.UnsupportedImageFormat as error:
        abort(415, str(error))
    except errors.ImageError as error:
        abort(400, str(error))


def heatmap_data_url(image, mask):
    """The heat map laid over the upload (heatmaps.heatmap_png), as a data: URL."""
    return "data:image/png;base64," + base64.b64encode(heatmaps.heatmap_png(image, mask)).decode("ascii")


def milliseconds_since(start):
    return round((time.perf_counter() - start) * 1000, 1)


def predict_upload(predictor, explain):
    """Score the uploaded image: the JSON answer of both prediction routes."""
    start = time.perf_counter()
    image_size = predictor.meta["image_size"]
    image = decode_upload(read_upload(), image_size)
    timing = {"decode": milliseconds_since(start)}

    model_start = time.perf_counter()
    answer, heatmap = predictor.answer(image, explain)
    timing["model"] = milliseconds_since(model_start)
    answer = {**answer, "probability": round(answer["probability"], 6), "model": predictor.summary()}
    if explain:
        heatmap_start = time.perf_counter()
        answer["heatmap"] = heatmap_data_url(image, heatmap)
        timing["heatmap"] = milliseconds_since(heatmap_start)
    timing["total"] = milliseconds_since(start)
    return {**answer, "timing_ms": timing}


def upload_limit_mb():
    return current_app.config["MAX_CONTENT_LENGTH"] / MB


def json_http_error(error):
    """Flask's own errors (404, 405, 413, ...) and ours, as JSON; headers such as Allow kept."""
    response = error.get_response()
    response.data = json.dumps({"error": error.description})
    response.content_type = "application/json"
    return response


def add_security_headers(response):
    # Everything the page needs is served from here: no CDN, no inline script.
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; frame-ancestors 'none'"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def create_app(model_path, device="cpu", max_upload_bytes=DEFAULT_MAX_UPLOAD_MB * MB, threads=None):
    """The Flask app serving `model_path`, a checkpoint or its .onnx file (engine.load_network;
    raises errors.CheckpointError if it cannot load).

    `threads`: threads for one model call (default: the network library's own setting)."""
    predictor = Predictor(model_path, device, threads)
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config["MAX_CONTENT_LENGTH"] = max_upload_bytes
    app.extensions["predictor"] = predictor
    app.after_request(add_security_headers)
    app.register_error_handler(HTTPException, json_http_error)

    @app.errorhandler(413)
    def upload_too_large(error):
        error.description = f"the upload is larger than the {upload_limit_mb():g} MB limit"
        return json_http_error(error)

    @app.errorhandler(Exception)
    def internal_error(error):
        app.logger.exception("unexpected error while answering %s %s", request.method, request.path)
        return jsonify(error="internal server error: the request could not be answered"), 500

    @app.get("/")
    def upload_page():
        return render_template(
            "upload.html",
            model=predictor.summary(),
            threshold=predictor.meta["threshold"],
            max_upload_bytes=app.config["MAX_CONTENT_LENGTH"],
            max_upload_mb=upload_limit_mb(),
            formats=image_input.ALLOWED_FORMATS_TEXT,
        )

    @app.post("/api/predict")
    def api_predict():
        return jsonify(predict_upload(predictor, explain=request.args.get("explain") in ("1", "true")))

    @app.post("/")
    def original_predict():
        """The original project's route: its `result` field, plus the API's fields."""
        answer = predict_upload(predictor, explain=False)
        return jsonify({"result": answer["label"], **answer})

    @app.get("/healthz")
    def healthz():
        return jsonify(
            status="ok",
            model=predictor.summary(),
            threshold=predictor.meta["threshold"],
            device=str(predictor.network.device),
            precision="fp32",
            engine=predictor.network.engine,
            threads=predictor.network.threads,
        )

    return app


class DiscardedBody:
    """A request-body buffer that keeps nothing: where a refused upload's bytes go."""

    def append(self, data):
        pass

    def close(self):
        pass


class UploadLimitParser(waitress.parser.HTTPRequestParser):
    """Waitress's request parser, refusing a body over the upload limit instead of buffering it.

    A request whose Content-Length is over the limit, or whose chunked body grows past it, is
    handed to the app at once without its body and with a CONTENT_LENGTH over the limit, so
    Flask answers with its JSON 413 (app.py's handler) before reading anything. The rest of the
    body goes into a DiscardedBody: the bytes that came with the headers here, the rest through
    UploadLimitChannel.
    """

    def __init__(self, adj, channel):
        super().__init__(adj)
        self.channel = channel
        self.refused_body = None  # the receiver that reads the refused body's rest into nothing

    def parse_header(self, header_plus):
        super().parse_header(header_plus)
        if self.content_length > self.channel.body_limit:
            self.refused_body = waitress.receiver.FixedStreamReceiver(self.content_length, DiscardedBody())
            self.body_rcv = None  # complete now, bodiless
            self.content_length = 0  # else waitress answers its own plain-text 413 over max_body
            self.expect_continue = False  # the answer is final: no "100 Continue"

    def received(self, data):
        consumed = super().received(data)
        body = self.body_rcv
        if self.chunked and body is not None and self.refused_body is None:
            over_limit = len(body) > self.channel.body_limit
            # Waitress's own limit, on the bytes with their chunk framing, becomes a JSON 413 too.
            if over_limit or isinstance(self.error, waitress.utilities.RequestEntityTooLarge):
                self.refuse_chunked_body(body)
        if self.refused_body is not None:
            consumed += self.refused_body.received(data[consumed:])
            if not self.refused_body.completed:
                self.channel.refused_body = self.refused_body
        return consumed

    def refuse_chunked_body(self, body):
        self.error = None
        self.completed = True
        self.headers["CONTENT_LENGTH"] = str(self.body_bytes_received)  # over the limit: Flask's 413
        body.getbuf().close()
        body.buf = DiscardedBody()  # the receiver goes on parsing the chunks, keeping none
        self.refused_body = body
        self.body_rcv = None


class UploadLimitChannel(waitress.channel.HTTPChannel):
    """Waitress's connection, reading the rest of a refused body before anything else.

    The app's 413 goes out as soon as the headers are read; the connection then reads the rest
    of the body in receive-sized chunks and discards it, and closes (when it must) only after
    that. Closing earlier would reset the connection while the client still sends, and a
    client that sends its whole body before reading (Python's urllib) would never see the 413.
    A client that stops sending is closed after waitress's channel_timeout, as any idle one.
    """

    refused_body = None  # the receiver of a refused body still arriving
    close_after_refused_body = False

    def __init__(self, server, sock, addr, adj, map=None, *, body_limit):
        self.body_limit = body_limit
        super().__init__(server, sock, addr, adj, map)

    def parser_class(self, adj):
        return UploadLimitParser(adj, self)

    def received(self, data):
        if self.refused_body is not None:
            data = data[self.refused_body.received(data) :]
            if self.refused_body.completed:
                self.refused_body = None
                if self.close_after_refused_body:
                    self.close_when_flushed = True
        return super().received(data)

    def readable(self):
        return super().readable() or (self.refused_body is not None and not self.will_close)

    def handle_write(self):
        # Waitress closes the connection once the answer is flushed: with a refused body still
        # arriving, that waits until received() has read it.
        if self.close_when_flushed and self.refused_body is not None:
            self.close_when_flushed = False
            self.close_after_refused_body = True
        super().handle_write()


def serve(app, host, port, threads):
    """Production serving with waitress and a bounded thread pool (never Flask's dev server)."""
    body_limit = app.config["MAX_CONTENT_LENGTH"]
    # A body over the limit is never read into memory (UploadLimitParser); one within it stays
    # in memory, never spooled to disk: waitress spools past inbuf_overflow, which is above
    # anything a request buffer holds. max_request_body_size bounds a chunked body's bytes
    # with their framing (a body of many tiny chunks), answered with the same JSON 413.
    socket_map = {}
    try:
        server = waitress.create_server(
            app,
            map=socket_map,
            host=host,
            port=port,
            threads=threads,
            max_request_body_size=2 * body_limit,
            inbuf_overflow=2 * body_limit + MB,
        )
    except OSError as error:
        raise errors.UserError(
            f"cannot listen on {host}:{port} ({error.strerror}); try another --port"
        ) from None
    for listener in socket_map.values():
        if isinstance(listener, waitress.server.BaseWSGIServer):
            listener.channel_class = functools.partial(UploadLimitChannel, body_limit=body_limit)
    print(f"Serving on http://{host}:{server.effective_port} (Ctrl+C to stop)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        print("Stopped.")


def get_args_parser():
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add(
        "--model",
        default="best_model.pth",
        help="checkpoint to serve, or its .onnx file; a checkpoint with the .onnx exported from it "
        "beside it is served by ONNX Runtime (default: %(default)s)",
    )
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add(
        "--port",
        type=cli.port_number,
        default=5000,
        help="port; 0 picks a free one (default: %(default)s)",
    )
    add(
        "--threads",
        type=cli.positive_int,
        default=4,
        help="waitress worker threads, i.e. requests in flight (default: 4)",
    )
    add(
        "--model-threads",
        "--torch-threads",
        type=cli.positive_int,
        default=None,
        help="threads for one model call, ONNX Runtime's or torch's (default: the usable CPU cores; "
        "calls run one at a time)",
    )
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    add(
        "--max-upload-mb",
        type=cli.positive_float,
        default=DEFAULT_MAX_UPLOAD_MB,
        help="largest accepted request, in MB (default: %(default)s)",
    )
    add(
        "--debug",
        action="store_true",
        help="Flask's development server in debug mode (for development only, never in production)",
    )
    return parser


@cli.exits_on_user_error
def main(argv=None):
    args = get_args_parser().parse_args(argv)
    # No model call runs on this thread: the model thread owns them all (see Predictor).
    app = create_app(
        args.model, args.device, int(args.max_upload_mb * MB), args.model_threads or cli.available_cores()
    )
    app.extensions["predictor"].warm_up()
    if args.debug:
        app.run(host=args.host, port=args.port, debug=True, use_reloader=False)
    else:
        serve(app, args.host, args.port, args.threads)


if __name__ == "__main__":
    main()
