"""The teacher's post-processing of a batch against the image-by-image reference."""
import pytest
import torch

from boxteacher.modeling.teacher import TeacherPass, teacher_outputs
from reference_implementations import teacher_outputs_per_image


def batch_detections(seed: int, input_sizes, counts, stride=4, divisibility=32) -> dict[str, torch.Tensor]:
    """Random detections of images of ``input_sizes`` (teacher frame) padded together, with
    smooth mask probabilities at ``stride`` and a few boxes that leave the frame."""
    g = torch.Generator().manual_seed(seed)
    padded = [-(-max(s[k] for s in input_sizes) // divisibility) * divisibility for k in (0, 1)]
    m = sum(counts)
    limits = torch.tensor([[w, h] for h, w in input_sizes]).repeat_interleave(torch.tensor(counts), dim=0).float()
    corner = torch.rand(m, 2, generator=g) * limits * 1.1 - 4
    logits = torch.randn(m, 1, padded[0] // (4 * stride), padded[1] // (4 * stride), generator=g) * 4
    return {
        "boxes": torch.cat([corner, corner + 2 + torch.rand(m, 2, generator=g) * limits / 2], dim=1),
        "scores": torch.rand(m, generator=g), "labels": torch.randint(0, 5, (m,), generator=g),
        "im_inds": torch.arange(len(counts)).repeat_interleave(torch.tensor(counts)),
        "mask_probs": torch.nn.functional.interpolate(logits, scale_factor=4, mode="bilinear").sigmoid(),
        "fpn_levels": torch.randint(0, 5, (m,), generator=g), "locations": torch.rand(m, 2, generator=g) * 64,
        "top_feat": torch.randn(m, 8, generator=g),
    }


@pytest.mark.parametrize("settings", [
    TeacherPass(), TeacherPass(clip_masks_to_boxes=True), TeacherPass(score_in_box=True),
    TeacherPass(float_masks=True, clip_masks_to_boxes=True), TeacherPass(float_masks=True, score_in_box=True),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_teacher_outputs_equal_the_per_image_reference(settings, seed):
    """Images of different teacher and student sizes (larger, smaller, equal, other aspect),
    one without detections."""
    input_sizes = [(64, 96), (96, 64), (80, 80), (50, 70)]
    student_sizes = [(48, 72), (120, 80), (80, 80), (61, 87)]
    counts = [5, 3, 0, 4]
    detections = batch_detections(seed, input_sizes, counts)
    ours = teacher_outputs(detections, input_sizes, student_sizes, 4, settings)
    reference = teacher_outputs_per_image(detections, input_sizes, student_sizes, 4, settings)
    assert len(ours) == len(reference) and len(ours[2]["scores"]) == 0 and len(ours[0]["scores"]) > 0
    for o, r in zip(ours, reference):
        assert o.keys() == r.keys()
        for key in r:
            torch.testing.assert_close(o[key], r[key], rtol=1e-5, atol=1e-6, msg=key)


def test_teacher_outputs_of_a_batch_without_detections():
    detections = batch_detections(0, [(64, 64), (48, 64)], [0, 0])
    outputs = teacher_outputs(detections, [(64, 64), (48, 64)], [(32, 32), (48, 64)], 4, TeacherPass(clip_masks_to_boxes=True))
    assert [tuple(o["mask_probs"].shape) for o in outputs] == [(0, 32, 32), (0, 48, 64)]
    assert all(o["scores"].shape == (0,) for o in outputs)
