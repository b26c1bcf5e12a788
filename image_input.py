"""Images: decoding files safely (from the prepared tree or from outside: one acceptance rule for
the app and predict.py), the network's input, and the facts the quality warnings read. Torch-free.
"""

import io
import os

import numpy as np
from PIL import Image, ImageFile, ImageOps

from errors import ImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Decompression bombs: refuse anything over 64 megapixels (a 50 MP camera fits) before it is
# decoded. Pillow raises only above twice its limit (it warns below), so load_image checks too.
MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False


def load_image(source, min_size=None):
    """Decode an image file (path or binary file object) into an upright 8-bit RGB PIL image.

    The whole image is decoded here, so truncated and corrupt files fail now, with an
    ImageError, not later inside a DataLoader worker. `min_size` lets JPEG decode at a reduced
    scale (never below min_size on either side): a 3000x2000 photo then costs about as much
    as a small one.
    """
    name = source if isinstance(source, (str, os.PathLike)) else "upload"
    try:
        with Image.open(source) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError
            if min_size and image.format == "JPEG":
                image.draft("RGB", (min_size, min_size))
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: image has more than {MAX_IMAGE_PIXELS:,} pixels") from None
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    except Image.UnidentifiedImageError:  # its own text names the file object's memory address
        raise ImageError(f"{name}: not a readable image (no image format recognised)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"{name}: not a readable image ({error})") from None


def to_rgb(image):
    """Convert any Pillow mode (CMYK, greyscale, palette, 16-bit, alpha) to 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        image = Image.fromarray((array * (255.0 / peak)).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels carry no skin; put them on white, the usual page background.
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


# --- images from outside: what the app and predict.py accept, by one rule -----------------------

# The formats decoded on purpose, recognised by their first bytes, never by the file name or
# the Content-Type a client claims. (WebP is RIFF....WEBP, checked in `detect_format`.)
MAGIC_NUMBERS = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
}
ALLOWED_FORMATS_TEXT = "JPEG, PNG, WebP, BMP or TIFF"

# Smaller than this there is no lesion to see: refused. Smaller than the model's input size,
# or very elongated, is scored with a warning (size_warnings).
MIN_IMAGE_SIDE = 32


class UnsupportedImageFormat(ImageError):
    """A file in none of the formats decoded on purpose (the app answers it with a 415)."""


def detect_format(head):
    """The allowed format named by the first bytes of a file, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for name, prefixes in MAGIC_NUMBERS.items():
        if head.startswith(prefixes):
            return name
    return None


def decode_image_bytes(data, image_size):
    """The image held in `data` (a whole file's bytes), decoded as `load_image` does (JPEGs at
    a reduced scale, never below `image_size`), if the model will score it: an allowed format by
    its first bytes, within the pixel limit, at least MIN_IMAGE_SIDE pixels a side.

    Raises UnsupportedImageFormat or ImageError with the reason in the words the app answers."""
    if not data:
        raise ImageError("the uploaded file is empty")
    if detect_format(data[:16]) is None:
        raise UnsupportedImageFormat(f"unsupported file type: send a {ALLOWED_FORMATS_TEXT} image")
    image = load_image(io.BytesIO(data), min_size=image_size)
    if min(image.size) < MIN_IMAGE_SIDE:
        raise ImageError(
            f"image too small ({image.width}x{image.height}): each side needs {MIN_IMAGE_SIDE}+ pixels"
        )
    return image


# --- the network's input -------------------------------------------------------------------


def model_input(image, meta):
    """A decoded RGB PIL image as the network's normalised input, (3, S, S) float32: what
    `training_data.eval_transform` computes with torchvision (Resize on a PIL image is Pillow's
    antialiased bilinear resize; ToTensor divides by 255; Normalize subtracts and divides in float32)."""
    return normalised(squared(image, meta["image_size"]), meta)


def model_input_and_facts(image, meta):
    """(model_input, image_facts) of a decoded image from one resize: the app and predict.py
    need both, and the resize of a large photo is the costly part of each."""
    square = squared(image, meta["image_size"])
    return normalised(square, meta), facts_of_square(image, square)


def squared(image, size):
    """The image squeezed to size x size: what the network sees and the quality statistics measure."""
    return image.resize((size, size), Image.Resampling.BILINEAR)


def normalised(square, meta):
    """(3, S, S) float32 `(pixel / 255 - mean) / std`, looked up for each 8-bit level: the same
    float32 operations on each of the 256 levels only, so the same bits, in about half the time
    of computing them for every pixel (an upload's time is spent outside a small network too)."""
    levels = np.arange(256, dtype=np.float32)[:, None]
    mean = np.asarray(meta["mean"], dtype=np.float32)
    std = np.asarray(meta["std"], dtype=np.float32)
    table = ((levels / np.float32(255) - mean) / std).T  # (channel, level)
    planes = np.asarray(square).transpose(2, 0, 1)
    return np.stack([np.take(table[channel], planes[channel]) for channel in range(3)])


# --- image facts: the size and the statistics behind the quality warnings ----------------------

# What the answer needs to know of the decoded image besides its pixels: its size, and the
# statistics behind the quality warnings, measured on the grey image at the model's input size
# (so that a camera photo and a small dermoscopic crop are judged at the scale the model sees).
QUALITY_STATISTICS = ("sharpness", "brightness", "contrast")
IMAGE_FACTS = ("width", "height", *QUALITY_STATISTICS)


def image_facts(image, size):
    """{width, height, sharpness: variance of the Laplacian, brightness: mean grey level,
    contrast: its standard deviation} of a PIL image; grey levels 0-255 at `size` x `size`."""
    return facts_of_square(image, squared(image, size))


def facts_of_square(image, square):
    """`image_facts` of `image`, measured on `square`, the image squeezed (`squared`): the grey
    image of the squeezed one, the square the network sees (greying before the resize instead
    moves the statistics by a rounding of the grey levels only)."""
    grey = np.asarray(square.convert("L"), dtype=np.float64)
    laplacian = grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * grey[1:-1, 1:-1]
    return {
        "width": image.width,
        "height": image.height,
        "sharpness": float(laplacian.var()),
        "brightness": float(grey.mean()),
        "contrast": float(grey.std()),
    }
