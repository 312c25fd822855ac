"""The geometric augmentation of training and test: resize by the shortest edge, then an optional
horizontal flip, applied alike to images, boxes, polygons and masks.

The resize rule and the interpolation are detectron2's ``ResizeShortestEdge`` (PIL bilinear for
images, nearest for masks), so that models trained there see the same inputs here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image


def sample_short_edge(min_sizes: Sequence[int], sampling: str, rng: np.random.Generator) -> int:
    """A short-edge length: one of ``min_sizes`` ("choice") or uniform in
    [min_sizes[0], min_sizes[-1]] ("range")."""
    if sampling == "choice":
        return int(min_sizes[int(rng.integers(len(min_sizes)))])
    if sampling == "range":
        return int(rng.integers(min_sizes[0], min_sizes[-1] + 1))
    raise ValueError(f"Unknown short-edge sampling '{sampling}'; expected 'choice' or 'range'.")


@dataclass(frozen=True)
class ResizeFlip:
    """Resize (height, width) -> (new_height, new_width), then mirror left-right if ``flip``.

    Coordinates are absolute pixels with the origin at the top-left image corner, so a point x
    of the resized image goes to ``new_width - x`` under the flip.
    """

    height: int
    width: int
    new_height: int
    new_width: int
    flip: bool = False

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, C] -> uint8 [new_height, new_width, C] (PIL bilinear)."""
        if (self.new_height, self.new_width) != (self.height, self.width):
            size = (self.new_width, self.new_height)
            image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        return image[:, ::-1] if self.flip else image

    def apply_mask(self, mask: np.ndarray) -> np.ndarray:
        """bool [H, W] -> bool [new_height, new_width] (nearest neighbour)."""
        if (self.new_height, self.new_width) != (self.height, self.width):
            size = (self.new_width, self.new_height)
            resized = Image.fromarray(mask.astype(np.uint8)).resize(size, Image.NEAREST)
            mask = np.asarray(resized) > 0
        return mask[:, ::-1] if self.flip else mask

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """Points [N, 2] as (x, y) -> new float64 array [N, 2]."""
        scale = (self.new_width / self.width, self.new_height / self.height)
        out = np.asarray(coords, dtype=np.float64) * scale
        if self.flip:
            out[:, 0] = self.new_width - out[:, 0]
        return out

    def apply_polygon(self, polygon: Sequence[float]) -> np.ndarray:
        """A flat polygon [x0, y0, x1, y1, ...] -> new flat float64 array."""
        return self.apply_coords(np.asarray(polygon, dtype=np.float64).reshape(-1, 2)).ravel()

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """XYXY boxes [N, 4] -> XYXY boxes [N, 4] (float64, not clipped)."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        corners = self.apply_coords(boxes.reshape(-1, 2)).reshape(-1, 2, 2)
        return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """XYXY boxes [N, 4] clipped to [0, width] x [0, height] (a new array)."""
    return np.clip(boxes, 0.0, [width, height, width, height])
