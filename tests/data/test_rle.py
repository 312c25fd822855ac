"""``boxteacher.data.rle``: the one mask-to-RLE encoder and the one segmentation-to-RLE helper."""

import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from boxteacher.data.rle import encode_rle, segmentation_to_rle


def test_encode_rle_round_trips_numpy_and_tensor_masks_as_json():
    masks = np.zeros((3, 7, 5), dtype=bool)
    masks[0, 1:4, 2:5] = True
    masks[2] = True
    for given in (masks, torch.from_numpy(masks)):
        rles = encode_rle(given)
        assert json.loads(json.dumps(rles)) == rles  # counts as str, sizes as ints
        assert [r["size"] for r in rles] == [[7, 5]] * 3
        np.testing.assert_array_equal(mask_util.decode(rles).transpose(2, 0, 1), masks)
    assert encode_rle(np.zeros((0, 7, 5), dtype=bool)) == []
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        encode_rle(masks[0])


def test_encode_rle_of_non_bool_masks_encodes_their_non_zero_pixels():
    masks = np.zeros((1, 4, 4), dtype=np.uint8)
    masks[0, :2] = 7
    assert encode_rle(masks) == encode_rle(masks.astype(bool))


def test_segmentation_to_rle_of_polygons_uncompressed_and_compressed_rles():
    h, w = 10, 12
    square = [[2.0, 2.0, 6.0, 2.0, 6.0, 6.0, 2.0, 6.0]]
    from_polygons = segmentation_to_rle(
        square + [[1, 1, 2, 2]], h, w
    )  # the 2-point polygon is left out
    assert from_polygons == mask_util.merge(mask_util.frPyObjects(square, h, w))
    mask = mask_util.decode(from_polygons).astype(bool)
    assert mask.sum() > 0
    compressed = encode_rle(mask[None])[0]
    assert segmentation_to_rle(compressed, h, w) is compressed
    uncompressed = {"size": [h, w], "counts": [int(c) for c in _run_lengths(mask)]}
    np.testing.assert_array_equal(
        mask_util.decode(segmentation_to_rle(uncompressed, h, w)).astype(bool), mask
    )
    assert (
        segmentation_to_rle([[1, 1, 2, 2]], h, w) is None
        and segmentation_to_rle(None, h, w) is None
    )


def _run_lengths(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed counts: alternating runs of 0 and 1 in column-major order."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return np.diff(np.concatenate([[0], changes])).tolist()
