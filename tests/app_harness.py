"""app.py seen from outside, shared by the tests and the benchmarks (no test imports a benchmark for it).

`running_server` starts app.py on a free port as a user would; `post_file`, `post_large_file`,
`get_json` and `post_concurrently` talk to it over HTTP; `peak_memory_mb` reads its peak memory;
`precision_gap` measures how far the network the app serves moves probabilities from the plain
fp32 network's.
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

import backbones
import checkpoints
import engine
import image_input
import scoring
import torch_reference

APP = Path(__file__).resolve().parent.parent / "app.py"


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
    start = time.perf_counter()
    status, _, payload = post(
        base_url,
        path + ("?explain=1" if explain else ""),
        body,
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout,
    )
    return status, json.loads(payload), time.perf_counter() - start


def post_large_file(base_url, size, chunked=False, path="/api/predict", timeout=120):
    """POST a file of `size` zero bytes as the multipart field `file`, streamed a megabyte at a
    time so that it is never held whole: with its Content-Length, or `chunked` without one. The
    whole body is sent before the answer is read, as urllib does. (HTTP status, Content-Type,
    decoded JSON)."""
    boundary = "large-file-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="large.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    megabyte = bytes(2**20)

    def body():
        yield head
        for start in range(0, size, len(megabyte)):
            yield megabyte[: size - start]
        yield tail

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if not chunked:
        headers["Content-Length"] = str(len(head) + size + len(tail))
    status, content_type, payload = post(base_url, path, body(), headers, timeout, encode_chunked=chunked)
    return status, content_type, json.loads(payload)


def post(base_url, path, body, headers, timeout, encode_chunked=False):
    """One POST on a new connection: (HTTP status, Content-Type, body bytes)."""
    url = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        connection.request("POST", path, body, headers, encode_chunked=encode_chunked)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


def get_json(base_url, path):
    url = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())
    finally:
        connection.close()


def peak_memory_mb(process):
    """The process's peak resident set size (Linux's VmHWM), in MB."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM line in /proc/PID/status")


def post_concurrently(base_url, uploads, requests, clients):
    """`requests` posts of `uploads` (cycled) from `clients` threads: (answers, seconds in all)."""
    with ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        answers = list(pool.map(lambda i: post_file(base_url, uploads[i % len(uploads)]), range(requests)))
        return answers, time.perf_counter() - start


def precision_gap(checkpoint, paths, served=None):
    """Largest |served probability - plain fp32 network's probability| over the images `paths`:
    what the served network changes: `served` (an .onnx file) or what the app serves for the
    checkpoint (engine.load_network: its .onnx beside it, else batch norms folded)."""
    device = torch.device("cpu")
    served = engine.load_network(served or checkpoint, "cpu")
    plain_model, meta = checkpoints.load_checkpoint(checkpoint, device)
    transform = torch_reference.checkpoint_transform(meta)
    gaps = []
    for start in range(0, len(paths), 64):  # batches of 64 keep 384-px memory modest
        images = [
            image_input.load_image(path, min_size=meta["image_size"]) for path in paths[start : start + 64]
        ]
        batch = torch.stack([transform(image) for image in images])
        melanoma_index = scoring.melanoma_output(meta)
        plain = scoring.melanoma_probability(
            backbones.network_outputs(plain_model, batch, device)[0], melanoma_index=melanoma_index
        )
        served_logits = served.outputs(served.batch(images))[0]
        served_probability = scoring.melanoma_probability(served_logits, melanoma_index=melanoma_index)
        gaps.append(np.abs(served_probability - plain).max())
    return float(max(gaps))
