"""The one image reader of training, evaluation, the demo and the pseudo-mask export.

Rules of ``read_image`` (the README's "Bad input" table):

- The file is read once into memory and decoded from those bytes by OpenCV.
- A JPEG or a PNG, recognised by its magic bytes (not its extension), must be complete: a JPEG
  needs an end-of-image marker (FF D9) after the start of its first scan, a PNG its IEND chunk.
  A truncated file is unreadable: libjpeg would fill the missing part with grey and only print
  "Premature end of JPEG file" to stderr, naming no file. The check walks the segment headers
  and looks the marker up from the end, so it costs no second decode. Other formats are only
  checked by decoding.
- With the size of the json entry, the image is read in the frame the json describes: in its
  stored frame (EXIF orientation ignored) when the stored size matches; with its EXIF orientation
  applied when that rotated size matches (the only case decoded twice); any other size is an
  ``ImageSizeError``. An image is never transposed to fit.
- Without an expected size (the demo), the EXIF orientation is applied, as image viewers do.
- Every image comes out as uint8 with 3 channels: a grey image is repeated over the channels,
  an alpha channel is dropped, a 16-bit image is scaled to 8 bits (divided by 256).
"""

from __future__ import annotations

import logging
import os
import struct

import cv2
import numpy as np

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xDA)])
_SOS, _EOI = 0xDA, b"\xff\xd9"
IMAGE_FORMATS = ("BGR", "RGB")
# The files a folder of images is listed by (demo inputs, unlabelled image folders).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

logger = logging.getLogger(__name__)


class UnreadableImageError(OSError):
    """The file is missing, empty, truncated or cannot be decoded; the message names it."""


class ImageSizeError(ValueError):
    """The decoded image has neither the size of its json entry nor, rotated by its EXIF
    orientation, that size; the message names the file and both sizes."""


def read_image(
    path: str, expected_size: tuple[int, int] | None = None, image_format: str = "BGR"
) -> np.ndarray:
    """uint8 (H, W, 3) in ``image_format`` ("BGR" or "RGB"), by the rules of the module
    docstring; ``expected_size`` is the json's (height, width).

    Raises ``UnreadableImageError`` (missing, empty, truncated, undecodable) or
    ``ImageSizeError``."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, not '{image_format}'.")
    data = _read_bytes(path)
    problem = truncation_problem(data)
    if problem is not None:
        raise UnreadableImageError(f"Image '{path}' is truncated ({problem})")
    if expected_size is None:
        image = _decode(data, path, cv2.IMREAD_COLOR)
    else:
        image = _decode_in_frame(data, path, (int(expected_size[0]), int(expected_size[1])))
    if image_format == "RGB":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def read_image_or_warn(
    path: str,
    expected_size: tuple[int, int] | None = None,
    image_format: str = "BGR",
    consequence: str = "skipping it",
) -> np.ndarray | None:
    """``read_image``, but an image that cannot be read (missing, truncated, undecodable, of
    another size than ``expected_size``) is None after a warning naming the file and saying
    what follows (``consequence``)."""
    try:
        return read_image(path, expected_size, image_format)
    except (UnreadableImageError, ImageSizeError) as e:
        logger.warning("%s; %s.", e, consequence)
        return None


def truncation_problem(data: bytes) -> str | None:
    """Why the JPEG or PNG in ``data`` is incomplete; None if complete or another format."""
    if data.startswith(JPEG_MAGIC):
        return _jpeg_truncation(data)
    if data.startswith(PNG_MAGIC):
        return _png_truncation(data)
    return None


def _read_bytes(path: str) -> bytes:
    if not os.path.isfile(path):
        raise UnreadableImageError(f"Image '{path}' does not exist")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UnreadableImageError(f"Image '{path}' could not be read ({e.strerror})") from e
    if not data:
        raise UnreadableImageError(f"Image '{path}' could not be decoded (the file is empty)")
    return data


def _decode(data: bytes, path: str, flags: int) -> np.ndarray:
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as e:
        raise UnreadableImageError(f"Image '{path}' could not be decoded ({e.err})") from e
    if image is None:
        raise UnreadableImageError(f"Image '{path}' could not be decoded")
    return image


def _decode_in_frame(data: bytes, path: str, expected: tuple[int, int]) -> np.ndarray:
    """The stored frame if it has the ``expected`` (height, width), else the EXIF-rotated one
    if that has it; else ``ImageSizeError``."""
    stored = _decode(data, path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if stored.shape[:2] == expected:
        return stored
    if stored.shape[1::-1] == expected:
        rotated = _decode(data, path, cv2.IMREAD_COLOR)
        if rotated.shape[:2] == expected:
            return rotated
    height, width = stored.shape[:2]
    hint = (
        " (no EXIF orientation rotates it to that size; it is not transposed to fit)"
        if (width, height) == expected
        else ""
    )
    raise ImageSizeError(
        f"Image '{path}' is {width}x{height} (WxH) but its json entry says "
        f"{expected[1]}x{expected[0]}{hint}"
    )


def _jpeg_truncation(data: bytes) -> str | None:
    """Walks the segments up to the first scan (start-of-scan marker), then wants an
    end-of-image marker after it. Entropy-coded data cannot hold FF D9 (FF is stuffed), so any
    such pair after the scan starts is the end of the image (or a trailer after it); an embedded
    thumbnail's marker sits inside an APP segment, before the scan. A segment structure that
    cannot be walked gets no verdict here: the decoder judges it."""
    pos = 2
    while True:
        start = pos
        while pos < len(data) and data[pos] == 0xFF:
            pos += 1  # a marker, preceded by any number of fill bytes
        if pos >= len(data):
            return "it ends before its image data"
        if pos == start:
            return None  # not at a marker
        marker = data[pos]
        if marker == _SOS:
            break
        if marker in _STANDALONE_MARKERS:
            pos += 1
            continue
        if pos + 3 > len(data):
            return "it ends before its image data"
        pos += 1 + int.from_bytes(data[pos + 1 : pos + 3], "big")
    if data.rfind(_EOI, pos) < 0:
        return "no JPEG end-of-image marker after its image data"
    return None


def _png_truncation(data: bytes) -> str | None:
    """Walks the chunk headers (length, type) up to a complete IEND chunk."""
    pos = len(PNG_MAGIC)
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IEND":
            return None
        pos += 12 + length
    return "no PNG IEND chunk"
