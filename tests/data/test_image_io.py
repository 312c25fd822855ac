"""The one image reader (``boxteacher.data.image_io``) and its callers: the training and test
mapper (the evaluation loader's path), the pseudo-mask export and the demo. Images are read in
the frame their json entry describes (EXIF orientation ignored or applied, never transposed),
and a truncated JPEG or PNG is unreadable, named in a warning or an error."""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest

from boxteacher.data import DatasetMapper
from boxteacher.data.image_io import (
    ImageSizeError,
    UnreadableImageError,
    read_image,
    read_image_or_warn,
    truncation_problem,
)

STORED_H, STORED_W = 40, 64
ROTATE_90_CW = 6  # EXIF orientation: the stored picture is shown rotated 90 degrees clockwise


def _picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random colour picture (JPEG keeps it close, and it needs many bytes)."""
    noise = np.random.default_rng(seed).random((height, width, 3)) * 255
    return cv2.GaussianBlur(noise.astype(np.uint8), (0, 0), 2)


def _encode(image: np.ndarray, ext: str) -> bytes:
    ok, buffer = cv2.imencode(ext, image)
    assert ok
    return buffer.tobytes()


def _exif_segment(orientation: int) -> bytes:
    """An APP1 segment holding an EXIF block with one tag: Orientation (0x0112, SHORT)."""
    ifd = (
        struct.pack(">H", 1)
        + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
        + struct.pack(">I", 0)
    )
    payload = b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def _with_segment(jpeg: bytes, segment: bytes) -> bytes:
    """The JPEG with ``segment`` inserted right after its start-of-image marker."""
    return jpeg[:2] + segment + jpeg[2:]


@pytest.fixture()
def rotated_jpeg(tmp_path) -> tuple[Path, np.ndarray]:
    """A 64x40 (WxH) JPEG whose EXIF orientation rotates it to 40x64; and its stored pixels."""
    path = tmp_path / "exif.jpg"
    path.write_bytes(
        _with_segment(_encode(_picture(STORED_H, STORED_W), ".jpg"), _exif_segment(ROTATE_90_CW))
    )
    stored = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert stored.shape[:2] == (STORED_H, STORED_W)
    assert cv2.imread(str(path)).shape[:2] == (STORED_W, STORED_H)  # OpenCV applies EXIF
    return path, stored


def _record(path: Path, height: int, width: int) -> dict:
    return {
        "file_name": str(path),
        "image_id": 3,
        "height": height,
        "width": width,
        "annotations": [],
    }


def _via_mapper(is_train: bool) -> Callable[[Path, int, int], np.ndarray | None]:
    """Reads through the mapper at the record's own size (no resize, no flip): BGR (H, W, 3)."""

    def read(path: Path, height: int, width: int) -> np.ndarray | None:
        mapper = DatasetMapper(
            is_train,
            min_sizes=(min(height, width),),
            max_size=10_000,
            hflip=False,
            with_masks=False,
        )
        out = mapper(_record(path, height, width), np.random.default_rng(0))
        return None if out is None else out["image"].permute(1, 2, 0).numpy()

    return read


def _via_export(path: Path, height: int, width: int) -> np.ndarray | None:
    return read_image_or_warn(
        str(path), (height, width), consequence="its boxes get no pseudo mask"
    )


READERS = {
    "train mapper": _via_mapper(True),
    "test mapper": _via_mapper(False),
    "export": _via_export,
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_exif_orientation_is_ignored_when_the_stored_size_is_the_json_size(
    rotated_jpeg, reader, caplog
):
    path, stored = rotated_jpeg
    with caplog.at_level(logging.WARNING):
        image = READERS[reader](path, STORED_H, STORED_W)
    np.testing.assert_array_equal(image, stored)
    assert not caplog.records


@pytest.mark.parametrize("reader", sorted(READERS))
def test_exif_orientation_is_applied_when_the_rotated_size_is_the_json_size(rotated_jpeg, reader):
    path, stored = rotated_jpeg
    image = READERS[reader](path, STORED_W, STORED_H)
    np.testing.assert_array_equal(image, cv2.rotate(stored, cv2.ROTATE_90_CLOCKWISE))


def test_a_json_with_swapped_height_and_width_is_a_size_error_not_a_transpose(tmp_path, caplog):
    path = tmp_path / "plain.png"
    cv2.imwrite(str(path), _picture(STORED_H, STORED_W))
    with pytest.raises(
        ImageSizeError, match=r"plain.png' is 64x40 \(WxH\) but its json entry says 40x64"
    ):
        read_image(str(path), (STORED_W, STORED_H))
    with caplog.at_level(logging.WARNING, logger="boxteacher.pseudo_export"):
        assert _via_export(path, STORED_W, STORED_H) is None
    assert (
        "plain.png" in caplog.text
        and "not transposed" in caplog.text
        and "transposing" not in caplog.text
    )


@pytest.fixture(
    params=[(".jpg", 0.5), (".jpg", 0.7), (".jpg", 0.9), (".png", 0.5), (".png", 0.9)],
    ids=lambda p: f"{p[0][1:]}-cut-at-{p[1]}",
)
def truncated(request, tmp_path) -> Path:
    """A 640x480 JPEG or PNG cut at a fraction of its bytes (libjpeg decodes such a JPEG)."""
    ext, fraction = request.param
    data = _encode(_picture(480, 640), ext)
    path = tmp_path / f"cut{ext}"
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def test_a_truncated_image_is_skipped_with_a_warning_in_training(truncated, caplog):
    with caplog.at_level(logging.WARNING, logger="boxteacher.data.mapper"):
        assert _via_mapper(True)(truncated, 480, 640) is None
    assert f"{truncated.name}' is truncated" in caplog.text


def test_a_truncated_image_is_an_error_in_evaluation(truncated):
    with pytest.raises(OSError, match=rf"{truncated.name}' is truncated .*image_id 3"):
        _via_mapper(False)(truncated, 480, 640)


def test_a_truncated_image_gets_no_pseudo_mask_and_the_demo_skips_it(truncated, caplog):
    with caplog.at_level(logging.WARNING):
        assert _via_export(truncated, 480, 640) is None
        assert read_image_or_warn(str(truncated)) is None
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and all(f"{truncated.name}' is truncated" in m for m in messages)


def test_the_format_comes_from_the_magic_bytes_not_the_extension(tmp_path):
    data = _encode(_picture(480, 640), ".jpg")
    path = tmp_path / "really_a_jpeg.png"
    path.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(
        UnreadableImageError, match="really_a_jpeg.png' is truncated .*JPEG end-of-image"
    ):
        read_image(str(path), (480, 640))


def test_bytes_after_the_end_of_image_marker_are_allowed(tmp_path):
    image = _picture(120, 160)
    data = _encode(image, ".jpg")
    path = tmp_path / "trailer.jpg"
    path.write_bytes(data + b"\x00" * 5000 + b"trailing data\xff\xda")
    np.testing.assert_array_equal(
        read_image(str(path), (120, 160)), cv2.imdecode(np.frombuffer(data, np.uint8), 1)
    )


def test_an_end_marker_inside_a_header_segment_does_not_hide_a_truncation():
    """An EXIF thumbnail is a whole JPEG, end marker included, inside an APP1 segment."""
    thumbnail = _encode(_picture(8, 8), ".jpg")
    app1 = b"\xff\xe1" + struct.pack(">H", len(thumbnail) + 8) + b"Exif\x00\x00" + thumbnail
    data = _with_segment(_encode(_picture(120, 160), ".jpg"), app1)
    assert truncation_problem(data) is None
    assert (
        truncation_problem(data[: len(data) - 200])
        == "no JPEG end-of-image marker after its image data"
    )
    assert truncation_problem(data[: len(app1) + 10]) == "it ends before its image data"


def test_the_demo_applies_the_exif_orientation_as_viewers_do(rotated_jpeg):
    path, stored = rotated_jpeg
    np.testing.assert_array_equal(
        read_image_or_warn(str(path)), cv2.rotate(stored, cv2.ROTATE_90_CLOCKWISE)
    )


@pytest.mark.parametrize("kind", ["grey", "rgba", "16-bit"])
def test_grey_alpha_and_16_bit_images_come_out_as_8_bit_bgr(tmp_path, kind):
    """One rule for every reader: uint8, three channels, alpha dropped, 16 bits scaled to 8."""
    grey = np.arange(30, dtype=np.uint8).reshape(5, 6) * 8
    stored, expected = {
        "grey": (grey, np.repeat(grey[:, :, None], 3, axis=2)),
        "rgba": (
            np.dstack([grey, grey + 1, grey + 2, np.full_like(grey, 7)]),
            np.dstack([grey, grey + 1, grey + 2]),
        ),
        "16-bit": (
            np.repeat(grey[:, :, None].astype(np.uint16) * 256 + 255, 3, axis=2),
            np.repeat(grey[:, :, None], 3, axis=2),
        ),
    }[kind]
    path = tmp_path / f"{kind}.png"
    cv2.imwrite(str(path), stored)
    np.testing.assert_array_equal(read_image(str(path), (5, 6)), expected)
    np.testing.assert_array_equal(read_image(str(path), image_format="RGB"), expected[:, :, ::-1])
