"""Files written whole or not at all, and a file's fingerprint. Torch-free."""

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_output(path, mode="wb"):
    """A file object on a temporary file beside `path`, renamed to `path` only when the block
    succeeds: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~current_umask())  # mkstemp's 0600 would hide outputs from other users
        with os.fdopen(handle, mode) as file:
            yield file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def current_umask():
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def atomic_write_text(path, text):
    """Write a text file (JSON, CSV, a report) atomically, like `atomic_torch_save`."""
    with atomic_output(path, "w") as file:
        file.write(text)
