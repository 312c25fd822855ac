"""Image geometry shared by the data pipeline and the models (plain Python: imports nothing of
the package, so that ``data/`` and ``modeling/`` both use it without depending on each other)."""

from __future__ import annotations


def resized_shape(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """(new_height, new_width): the short side becomes ``short_edge``, the long side at most
    ``max_size``, the aspect ratio kept; each side rounded half up."""
    scale = short_edge / min(height, width)
    if height < width:
        new_h, new_w = short_edge, scale * width
    else:
        new_h, new_w = scale * height, short_edge
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)
