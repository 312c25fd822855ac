"""Masks pasted into the output frame a chunk of detections at a time: the same masks and
mask-aware scores as upsampling every detection at once, with memory bounded by a chunk, not by
the detections."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from boxteacher.build import build_model
from boxteacher.modeling import postprocess
from boxteacher.modeling.mask_scores import (
    mask_aware_scores,
    mean_foreground_probability,
)
from boxteacher.modeling.postprocess import (
    detections_to_output_frame,
    paste_masks,
    rescale_boxes,
    upsample_mask_probs,
    upsampling_matrix,
)

from reference_implementations import detections_to_output_frame_full_resolution
from tiny_models import tiny_cfg


def random_detections(
    num: int, input_size: tuple[int, int], stride: int = 4, seed: int = 0
) -> tuple[dict, torch.Tensor]:
    """``num`` detections with random boxes in an ``input_size`` image (some empty or outside it)
    and smooth random stride-``stride`` mask probabilities over the input padded to 32."""
    g = torch.Generator().manual_seed(seed)
    h, w = input_size
    xy = torch.rand(num, 2, generator=g) * torch.tensor([w, h])
    wh = torch.rand(num, 2, generator=g) * torch.tensor([w, h]) / 2
    boxes = torch.cat([xy - wh / 4, xy + wh], dim=1)
    boxes[0] = torch.tensor([w + 5.0, 0.0, w + 9.0, 4.0])  # outside the image: dropped
    padded = (-(-h // 32) * 32 // stride, -(-w // 32) * 32 // stride)
    logits = torch.nn.functional.interpolate(
        torch.randn(num, 1, padded[0] // 2, padded[1] // 2, generator=g) * 3,
        size=padded,
        mode="bilinear",
    )
    detections = {
        "boxes": boxes,
        "scores": torch.rand(num, generator=g),
        "labels": torch.randint(0, 3, (num,), generator=g),
    }
    return detections, logits.sigmoid()


@pytest.mark.parametrize("output_size", [(100, 150), (37, 61), (251, 333), (50, 75)])
@pytest.mark.parametrize("chunk_pixels", [1, 2 * 251 * 333, 1 << 24])
def test_pasting_in_chunks_equals_full_resolution_upsampling(output_size, chunk_pixels):
    input_size = (50, 75)
    detections, probs = random_detections(9, input_size)
    ours = detections_to_output_frame(
        detections, probs, 4, input_size, output_size, 0.5, chunk_pixels
    )
    reference = detections_to_output_frame_full_resolution(
        detections, probs, 4, input_size, output_size, 0.5
    )
    assert 0 < ours["masks"].shape[0] < 9 and ours["masks"].dtype == torch.bool
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(ours[key], reference[key]), key
    expected = mean_foreground_probability(reference["mask_probs"], 0.5)
    torch.testing.assert_close(ours["mask_means"], expected, rtol=1e-6, atol=0)


def test_no_detection_gives_empty_masks_and_means():
    masks, means = paste_masks(torch.zeros(0, 1, 8, 8), 4, (30, 30), (60, 60), 0.5)
    assert masks.shape == (0, 60, 60) and masks.dtype == torch.bool and means.shape == (0,)


def test_float_probabilities_at_the_output_resolution_are_bounded_by_the_chunk(monkeypatch):
    """50 detections pasted in a 400x600 frame never hold more than ``chunk_pixels`` float
    probabilities (the old code upsampled all 50 at once: 12M floats)."""
    largest = []
    upsample = postprocess.upsample_mask_probs

    def recording(*args, **kwargs):
        out = upsample(*args, **kwargs)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(postprocess, "upsample_mask_probs", recording)
    detections, probs = random_detections(50, (100, 150), seed=1)
    detections["boxes"][0] = torch.tensor([1.0, 1.0, 20.0, 20.0])
    chunk_pixels = 3 * 400 * 600
    frame = postprocess.detections_to_output_frame(
        detections, probs, 4, (100, 150), (400, 600), 0.5, chunk_pixels
    )
    assert frame["masks"].shape == (50, 400, 600)
    assert max(largest) <= chunk_pixels


@pytest.mark.slow
def test_peak_memory_of_pasting_many_detections_on_a_large_frame():
    """Resident memory of pasting 20 detections into a 2000x3000 frame grows by about the bool
    output (120 MB), not by the float probabilities of all detections (480 MB, twice)."""
    script = textwrap.dedent("""
        import resource, torch
        from boxteacher.modeling.postprocess import detections_to_output_frame
        probs = torch.rand(20, 1, 64, 96)
        detections = {"boxes": torch.tensor([[0.0, 0.0, 300.0, 200.0]]).repeat(20, 1),
                      "scores": torch.rand(20), "labels": torch.zeros(20, dtype=torch.int64)}
        detections_to_output_frame(detections, probs, 4, (200, 300), (20, 30))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        frame = detections_to_output_frame(
            detections, probs, 4, (200, 300), (2000, 3000), 0.5, 1 << 24
        )
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    growth_mib = int(out.stdout.split()[-1])
    output_mib = 20 * 2000 * 3000 // 2**20
    assert growth_mib < output_mib + 300, (growth_mib, output_mib)


@pytest.mark.parametrize("chunk_pixels", [1, 4 * 251 * 333, 1 << 24])
def test_masks_encoded_chunk_by_chunk_equal_the_bool_masks_encoded(chunk_pixels):
    from boxteacher.data.rle import encode_rle as encode_masks

    detections, probs = random_detections(9, (50, 75))
    chunks = []

    def encode(masks):
        chunks.append(masks.shape[0])
        return encode_masks(masks)

    ours = detections_to_output_frame(
        detections, probs, 4, (50, 75), (251, 333), 0.5, chunk_pixels, encode
    )
    plain = detections_to_output_frame(
        detections, probs, 4, (50, 75), (251, 333), 0.5, chunk_pixels
    )
    assert ours["masks"] == encode_masks(plain["masks"]) and len(ours["masks"]) == len(
        plain["masks"]
    )
    assert torch.equal(ours["mask_means"], plain["mask_means"])
    assert max(chunks) == max(1, min(len(plain["masks"]), chunk_pixels // (251 * 333)))


@pytest.mark.slow
def test_peak_memory_of_encoded_masks_does_not_grow_with_the_detections():
    """60 detections of a 2000x3000 frame encoded chunk by chunk: resident memory grows by far
    less than their bool masks (360 MB) would take."""
    script = textwrap.dedent("""
        import resource, torch
        from boxteacher.data.rle import encode_rle as encode_masks
        from boxteacher.modeling.postprocess import detections_to_output_frame
        probs = torch.rand(60, 1, 64, 96)
        detections = {"boxes": torch.tensor([[0.0, 0.0, 300.0, 200.0]]).repeat(60, 1),
                      "scores": torch.rand(60), "labels": torch.zeros(60, dtype=torch.int64)}
        detections_to_output_frame(
            detections, probs, 4, (200, 300), (20, 30), 0.5, 1 << 24, encode_masks
        )
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        frame = detections_to_output_frame(
            detections, probs, 4, (200, 300), (2000, 3000), 0.5, 1 << 24, encode_masks
        )
        assert len(frame["masks"]) == 60
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    growth_mib = int(out.stdout.split()[-1])
    assert growth_mib < 200, growth_mib


def test_inference_scores_and_masks_match_the_full_resolution_reference():
    torch.manual_seed(0)
    model = build_model(
        tiny_cfg("MODEL.FCOS.INFERENCE_TH_TEST", "0.0", "MODEL.FCOS.POST_NMS_TOPK_TEST", "6")
    )
    model.eval()
    model.mask_aware_scores = True
    sample = {
        "image": torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8),
        "height": 150,
        "width": 223,
    }
    (out,) = model([sample])
    images, sizes = model.preprocess([sample])
    det = model.detect(images)[0]
    ref = detections_to_output_frame_full_resolution(
        det, det["mask_probs"], model.mask_out_stride, sizes[0], (150, 223), model.mask_threshold
    )
    scores = mask_aware_scores(
        ref["scores"], mean_foreground_probability(ref["mask_probs"], model.mask_threshold)
    )[0]
    assert out["instances"]["masks"].shape[0] > 0
    assert torch.equal(out["instances"]["masks"], ref["masks"])
    torch.testing.assert_close(out["instances"]["scores"], scores, rtol=1e-6, atol=0)


def test_rescale_boxes_scales_each_axis_and_clips_to_the_output():
    boxes = torch.tensor([[10.0, 20, 30, 40], [-4, -2, 120, 90]])
    out = rescale_boxes(boxes.clone(), input_size=(50, 100), output_size=(100, 50))
    torch.testing.assert_close(out, torch.tensor([[5.0, 40, 15, 80], [0, 0, 50, 100]]))


@pytest.mark.parametrize(
    "input_size, output_size", [((18, 26), (30, 40)), ((20, 28), (20, 28)), ((17, 9), (8, 5))]
)
def test_the_upsampling_matrices_equal_upsample_mask_probs(input_size, output_size):
    """One matrix per axis (``upsampling_matrix``) is the same aligned-bilinear upsampling, crop
    and resize as ``upsample_mask_probs``."""
    probs = torch.rand(2, 1, 6, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = torch.from_numpy(upsampling_matrix(6, 4, input_size[0], output_size[0]))
    cols = torch.from_numpy(upsampling_matrix(8, 4, input_size[1], output_size[1]))
    assert rows.shape == (output_size[0], 6) and cols.shape == (output_size[1], 8)
    expected = upsample_mask_probs(probs, 4, input_size, output_size)
    torch.testing.assert_close(
        rows @ probs[:, 0] @ cols.T, expected, rtol=1e-5, atol=1e-6
    )  # float32 positions
