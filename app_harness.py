"""app.py seen from outside, shared by the tests and the benchmarks (no test imports a benchmark for it).

`running_server` starts app.py on a free port as a user would; `post_file`, `get_json` and
`post_concurrently` talk to it over HTTP; `precision_gap` measures how far the network the app
serves moves probabilities from the plain fp32 network's.
"""

import http.client
import io
import json
import subprocess
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from werkzeug.datastructures import FileStorage
from werkzeug.test import encode_multipart

import common

APP = Path(__file__).resolve().parent / "app.py"


@contextmanager
def running_server(checkpoint, *app_args):
    """`app.py --model checkpoint` on 127.0.0.1 with a free port: yields (base URL, process)."""
    command = [sys.executable, str(APP), "--model", str(checkpoint), "--port", "0", *app_args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # app.py prints its address once it is warmed up
        if not line.startswith("Serving on "):
            raise RuntimeError(f"app.py did not start (exit code {process.poll()}): {line!r}")
        yield line.split()[2], process
    finally:
        process.terminate()
        process.wait(timeout=30)


def post_file(base_url, data, filename="upload.jpg", explain=False, path="/api/predict", timeout=120):
    """POST `data` as the multipart field `file`: (HTTP status, decoded JSON, seconds taken)."""
    boundary, body = encode_multipart({"file": FileStorage(io.BytesIO(data), filename)})
    url = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    start = time.perf_counter()
    try:
        connection.request(
            "POST",
            path + ("?explain=1" if explain else ""),
            body,
            {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        response = connection.getresponse()
        payload = response.read()
    finally:
        connection.close()
    return response.status, json.loads(payload), time.perf_counter() - start


def get_json(base_url, path):
    url = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def post_concurrently(base_url, uploads, requests, clients):
    """`requests` posts of `uploads` (cycled) from `clients` threads: (answers, seconds in all)."""
    with ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        answers = list(pool.map(lambda i: post_file(base_url, uploads[i % len(uploads)]), range(requests)))
        return answers, time.perf_counter() - start


def precision_gap(checkpoint, paths):
    """Largest |served probability - plain fp32 network's probability| over the images `paths`:
    what the served network (batch norms folded into convolutions) changes."""
    device = torch.device("cpu")
    served_model, meta = common.load_scoring_model(checkpoint, device)
    plain_model, _ = common.load_checkpoint(checkpoint, device)
    transform = common.checkpoint_transform(meta)
    gaps = []
    for start in range(0, len(paths), 64):  # batches of 64 keep 384-px memory modest
        images = [common.load_image(path, min_size=meta["image_size"]) for path in paths[start : start + 64]]
        batch = torch.stack([transform(image) for image in images])
        plain, served = (
            common.melanoma_probability(common.network_outputs(model, batch, device)[0])
            for model in (plain_model, served_model)
        )
        gaps.append(np.abs(served - plain).max())
    return float(max(gaps))
