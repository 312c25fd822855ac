"""Pictures of instance predictions: mask fill and outline, box, "label score" tag (numpy/OpenCV).

Every function takes and returns RGB ``uint8`` images of shape (H, W, 3) and never modifies its
inputs. The module imports no torch (only numpy, OpenCV and ``utils.io``), so a training hook, a
demo or a notebook can use it alike.
"""

from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np

from .io import atomic_open

__all__ = ["draw_instances", "instance_colors", "save_png", "side_by_side"]

_GOLDEN_RATIO_CONJUGATE = 0.618033988749895
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_TITLE_BACKGROUND = (255, 255, 255)
_TITLE_TEXT = (0, 0, 0)
_PADDING = (255, 255, 255)


def instance_colors(n: int) -> np.ndarray:
    """``n`` distinct, saturated colours, the same for the same ``n``: uint8 (n, 3) RGB.

    Hues follow the golden-ratio sequence, so any prefix of the list is spread over the colour
    wheel; the brightness alternates between rounds of the wheel to keep many colours apart.
    """
    if n < 0:
        raise ValueError(f"instance_colors needs n >= 0; got {n}.")
    index = np.arange(n, dtype=np.float32)
    hue = (index * _GOLDEN_RATIO_CONJUGATE) % 1.0 * 360.0
    value = np.where((index // 7) % 2 == 0, 0.95, 0.7).astype(np.float32)
    saturation = np.full(n, 0.8, dtype=np.float32)
    hsv = np.stack([hue, saturation, value], axis=1)[None]  # (1, n, 3), OpenCV float HSV ranges
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0] if n else np.zeros((0, 3), np.float32)
    return np.round(rgb * 255.0).astype(np.uint8)


def draw_instances(
    image: np.ndarray,
    masks: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    labels: Sequence[str] | None = None,
    scores: Sequence[float] | None = None,
    colors: np.ndarray | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Draw N instances on a copy of ``image``.

    Args:
        image: uint8 (H, W, 3) RGB.
        masks: bool (N, H, W): translucent fill with weight ``alpha`` and an outline.
        boxes: float (N, 4) XYXY in pixels: a rectangle.
        labels, scores: N class names and N confidences, written as a "label score" tag at the
            top-left corner of the box, else of the mask; either may be missing.
        colors: uint8 (N, 3) RGB, one per instance; ``instance_colors(N)`` by default.
        alpha: opacity of the mask fill, in [0, 1].
    Returns:
        uint8 (H, W, 3) RGB, a new array (a plain copy when N = 0).
    """
    _check_image(image, "image")
    height, width = image.shape[:2]
    num = _num_instances(masks, boxes, labels, scores)
    if masks is not None and tuple(masks.shape[1:]) != (height, width):
        raise ValueError(f"masks must be (N, {height}, {width}); got {tuple(masks.shape)}.")
    if boxes is not None and tuple(np.shape(boxes)) != (num, 4):
        raise ValueError(f"boxes must be (N, 4); got {tuple(np.shape(boxes))}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1]; got {alpha}.")
    colors = instance_colors(num) if colors is None else np.asarray(colors, dtype=np.uint8)
    if colors.shape != (num, 3):
        raise ValueError(f"colors must be (N, 3) = ({num}, 3); got {colors.shape}.")

    canvas = np.ascontiguousarray(image).copy()
    thickness = max(1, round(min(height, width) / 250))
    if masks is not None:
        masks = np.asarray(masks, dtype=bool)
        for mask, color in zip(masks, colors):
            _fill_and_outline(canvas, mask, color, alpha, thickness)
    if boxes is not None:
        for box, color in zip(np.asarray(boxes, dtype=np.float64), colors):
            x0, y0, x1, y1 = np.round(box).astype(int)
            cv2.rectangle(canvas, (x0, y0), (x1, y1), _as_tuple(color), thickness, cv2.LINE_AA)
    for i in range(num):
        text = _tag_text(
            labels[i] if labels is not None else None, scores[i] if scores is not None else None
        )
        anchor = _tag_anchor(
            masks[i] if masks is not None else None, boxes[i] if boxes is not None else None
        )
        if text and anchor is not None:
            _draw_tag(canvas, text, anchor, colors[i])
    return canvas


def side_by_side(panels: Sequence[np.ndarray], titles: Sequence[str] | None = None) -> np.ndarray:
    """Put uint8 (H_i, W_i, 3) panels next to each other, left to right.

    Shorter panels are padded at the bottom to the tallest height. With ``titles`` (one per
    panel) a white strip with the titles is added on top. Returns uint8 (H, sum W_i, 3).
    """
    if not panels:
        raise ValueError("side_by_side needs at least one panel.")
    for i, panel in enumerate(panels):
        _check_image(panel, f"panels[{i}]")
    if titles is not None and len(titles) != len(panels):
        raise ValueError(f"Got {len(titles)} titles for {len(panels)} panels.")
    height = max(panel.shape[0] for panel in panels)
    padded = [
        cv2.copyMakeBorder(
            panel, 0, height - panel.shape[0], 0, 0, cv2.BORDER_CONSTANT, value=_PADDING
        )
        for panel in panels
    ]
    row = np.concatenate(padded, axis=1)
    if titles is None:
        return row
    strips = _title_strips(titles, [panel.shape[1] for panel in panels], height)
    return np.concatenate([strips, row], axis=0)


def save_png(path: str, image_rgb: np.ndarray) -> None:
    """Write an RGB uint8 (H, W, 3) image as PNG, atomically; parent folders are created."""
    _check_image(image_rgb, "image_rgb")
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"OpenCV could not encode the picture for {path}.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, "wb") as f:
        f.write(encoded.tobytes())


def _check_image(image: np.ndarray, name: str) -> None:
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or image.ndim != 3
        or image.shape[2] != 3
    ):
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"{name} must be a uint8 (H, W, 3) array; got {dtype} {shape}.")


def _num_instances(
    masks: np.ndarray | None,
    boxes: np.ndarray | None,
    labels: Sequence[str] | None,
    scores: Sequence[float] | None,
) -> int:
    """N, the common length of the given per-instance arguments."""
    lengths = {
        name: len(value)
        for name, value in (
            ("masks", masks),
            ("boxes", boxes),
            ("labels", labels),
            ("scores", scores),
        )
        if value is not None
    }
    if len(set(lengths.values())) > 1:
        raise ValueError(f"Per-instance arguments differ in length: {lengths}.")
    num = next(iter(lengths.values()), 0)
    if num and masks is None and boxes is None:
        raise ValueError("labels or scores need masks or boxes to be placed on the image.")
    return num


def _as_tuple(color: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(c) for c in color)


# Masks are blended this many rows at a time: the float64 copy of the pixels inside a mask of a
# 12000x9000 image would take up to 2.6 GB at once.
_BLEND_ROWS = 256


def _fill_and_outline(
    canvas: np.ndarray, mask: np.ndarray, color: np.ndarray, alpha: float, thickness: int
) -> None:
    """Blend ``color`` into ``canvas`` (H, W, 3) inside ``mask`` (H, W) and trace its border."""
    if not mask.any():
        return
    for top in range(0, mask.shape[0], _BLEND_ROWS):
        rows, inside = canvas[top : top + _BLEND_ROWS], mask[top : top + _BLEND_ROWS]
        blended = (1.0 - alpha) * rows[inside] + alpha * color.astype(np.float32)
        rows[inside] = np.round(blended).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(canvas, contours, -1, _as_tuple(color), thickness, cv2.LINE_AA)


def _tag_text(label: str | None, score: float | None) -> str:
    parts = [] if label is None else [str(label)]
    if score is not None:
        parts.append(f"{float(score):.2f}")
    return " ".join(parts)


def _tag_anchor(mask: np.ndarray | None, box: np.ndarray | None) -> tuple[int, int] | None:
    """Top-left (x, y) of the box, else of the mask's bounding rectangle; None if both empty."""
    if box is not None:
        return int(round(float(box[0]))), int(round(float(box[1])))
    if mask is not None and mask.any():
        x, y, _, _ = cv2.boundingRect(mask.astype(np.uint8))
        return x, y
    return None


def _text_style(image_height: int, image_width: int) -> tuple[float, int]:
    """Font scale and stroke width that stay readable from 64-pixel to 2000-pixel images."""
    scale = float(np.clip(min(image_height, image_width) / 700.0, 0.3, 1.0))
    return scale, 1 if scale < 0.6 else 2


def _draw_tag(canvas: np.ndarray, text: str, anchor: tuple[int, int], color: np.ndarray) -> None:
    """A filled rectangle in ``color`` with ``text`` above ``anchor``, kept inside the image."""
    height, width = canvas.shape[:2]
    scale, stroke = _text_style(height, width)
    (text_w, text_h), baseline = cv2.getTextSize(text, _FONT, scale, stroke)
    tag_h = text_h + baseline + 2
    x = int(np.clip(anchor[0], 0, max(0, width - text_w - 2)))
    y = anchor[1] - tag_h if anchor[1] - tag_h >= 0 else anchor[1]  # below the corner at the top
    y = int(np.clip(y, 0, max(0, height - tag_h)))
    cv2.rectangle(canvas, (x, y), (x + text_w + 2, y + tag_h), _as_tuple(color), cv2.FILLED)
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    text_color = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    cv2.putText(
        canvas, text, (x + 1, y + text_h + 1), _FONT, scale, text_color, stroke, cv2.LINE_AA
    )


def _title_strips(titles: Sequence[str], widths: Sequence[int], panel_height: int) -> np.ndarray:
    """White strips of the given widths side by side, each holding its title: uint8 (h, sum, 3)."""
    size = max(panel_height, 200)
    scale, stroke = _text_style(size, size)
    text_h = max(cv2.getTextSize(title or "Ag", _FONT, scale, stroke)[0][1] for title in titles)
    baseline = cv2.getTextSize("Ag", _FONT, scale, stroke)[1]
    strips = []
    for title, width in zip(titles, widths):
        strip = np.empty((text_h + baseline + 8, width, 3), dtype=np.uint8)
        strip[:] = _TITLE_BACKGROUND
        cv2.putText(strip, title, (4, 4 + text_h), _FONT, scale, _TITLE_TEXT, stroke, cv2.LINE_AA)
        strips.append(strip)
    return np.concatenate(strips, axis=1)
