"""The colour guided filter and the refinement of pseudo masks with it."""

import pytest
import torch

from boxteacher.modeling.guided_filter import (
    MaskRefinement,
    guided_filter,
    inverse_regularised_covariance,
    unpack_symmetric,
)
from boxteacher.modeling.layers import boxes_to_masks
from boxteacher.modeling.pseudo_labels import PseudoLabeler


def guided_filter_by_windows(guide, src, radius, eps):
    """The filter's definition, window by window: a ridge fit of the source on the colours of
    each window (inside the image), then every pixel averages the fits of its windows."""
    channels, h, w = guide.shape
    g, s = guide.double(), src.double()
    out = torch.zeros(src.shape, dtype=torch.float64)
    count = torch.zeros(h, w, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            rows = slice(max(0, y - radius), min(h, y + radius + 1))
            cols = slice(max(0, x - radius), min(w, x + radius + 1))
            colours = g[:, rows, cols].reshape(channels, -1).T  # (P, C)
            centred = colours - colours.mean(0)
            covariance = centred.T @ centred / colours.shape[0] + eps * torch.eye(
                channels, dtype=torch.float64
            )
            for n in range(src.shape[0]):
                values = s[n, rows, cols].reshape(-1)
                a = torch.linalg.solve(
                    covariance, centred.T @ (values - values.mean()) / colours.shape[0]
                )
                b = values.mean() - a @ colours.mean(0)
                out[n, rows, cols] += torch.einsum("c,chw->hw", a, g[:, rows, cols]) + b
            count[rows, cols] += 1
    return out / count


@pytest.mark.parametrize("channels, radius, eps", [(3, 1, 0.01), (3, 2, 0.001), (1, 2, 0.1)])
def test_guided_filter_equals_its_window_by_window_definition(channels, radius, eps):
    g = torch.Generator().manual_seed(channels + radius)
    guide = torch.rand(channels, 9, 11, generator=g)
    src = torch.rand(2, 9, 11, generator=g)
    expected = guided_filter_by_windows(guide, src, radius, eps).float()
    torch.testing.assert_close(
        guided_filter(guide, src, radius, eps), expected, rtol=1e-4, atol=1e-4
    )


def test_guided_filter_keeps_constant_maps_and_empty_batches():
    guide = torch.rand(3, 12, 12)
    assert guided_filter(guide, torch.zeros(0, 12, 12), 2, 0.01).shape == (0, 12, 12)
    torch.testing.assert_close(
        guided_filter(guide, torch.full((1, 12, 12), 0.3), 2, 0.01),
        torch.full((1, 12, 12), 0.3),
        atol=1e-5,
        rtol=0,
    )


def flat_object_image():
    """A 40x48 image: a flat 12x16 rectangle on a flat background of another colour."""
    image = torch.zeros(3, 40, 48, dtype=torch.uint8)
    image[0], image[1], image[2] = 30, 90, 200
    image[:, 10:22, 12:28] = torch.tensor([220, 40, 60], dtype=torch.uint8)[:, None, None]
    truth = torch.zeros(40, 48, dtype=torch.bool)
    truth[10:22, 12:28] = True
    return image, truth


@pytest.mark.parametrize("grow", [-1, 1])
def test_refinement_moves_a_shifted_mask_boundary_onto_the_colour_edge(grow):
    image, truth = flat_object_image()
    blurred = torch.zeros(1, 40, 48)
    blurred[0, 10 - grow : 22 + grow, 12 - grow : 28 + grow] = 1.0
    refined = MaskRefinement(radius=4, eps=0.01)(
        image, blurred, torch.tensor([[10.0, 8.0, 30.0, 24.0]])
    )
    assert refined.dtype == torch.float32 and refined.min() >= 0 and refined.max() <= 1
    errors_before, errors_after = (
        int((blurred[0].bool() != truth).sum()),
        int(((refined[0] > 0.5) != truth).sum()),
    )
    assert errors_before >= 48 and errors_after <= 4  # (shrunk: the four corner pixels stay out)


def test_refinement_of_a_box_equals_filtering_the_whole_image_inside_it():
    g = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (3, 50, 60), dtype=torch.uint8, generator=g)
    masks = torch.rand(3, 50, 60, generator=g)
    boxes = torch.tensor([[5.0, 7.0, 30.5, 20.0], [0.0, 0.0, 60.0, 50.0], [41.2, 30.0, 58.0, 49.0]])
    refinement = MaskRefinement(radius=3, eps=0.02)
    whole = guided_filter(image.float() / 255, masks, 3, 0.02).clamp(0, 1)
    inside = boxes_to_masks(boxes, (50, 60))
    torch.testing.assert_close(refinement(image, masks, boxes), whole * inside, rtol=0, atol=1e-5)


def test_pseudo_masks_are_refined_after_the_assignment_and_before_binarising():
    image, truth = flat_object_image()
    probs = torch.zeros(2, 40, 48)
    probs[0, 9:24, 11:30] = 0.8  # the object's detection, a little too large
    probs[1, 30:38, 2:10] = 0.9  # a detection no box gets
    prediction = {
        "boxes": torch.tensor([[11.0, 9.0, 30.0, 24.0], [2.0, 30.0, 10.0, 38.0]]),
        "scores": torch.tensor([0.9, 0.8]),
        "mask_scores": torch.tensor([0.7, 0.6]),
        "mask_probs": probs,
    }
    boxes = torch.tensor(
        [[12.0, 10.0, 28.0, 22.0], [30.0, 28.0, 46.0, 38.0]]
    )  # the second matches nothing
    refinement = MaskRefinement(radius=4, eps=0.01)
    plain = PseudoLabeler(0.5, mask_threshold=0.5).label([prediction], [boxes])[0]
    refined = PseudoLabeler(0.5, mask_threshold=0.5, refinement=refinement).label(
        [prediction], [boxes], [image]
    )[0]
    assert torch.equal(plain["masks"][0], probs[0] > 0.5) and not torch.equal(
        plain["masks"][0], truth
    )
    assert torch.equal(refined["masks"][0], truth)
    assert refined["masks"].dtype == torch.bool and not refined["masks"][1].any()
    assert torch.equal(refined["weights"], plain["weights"]) and torch.equal(
        refined["assigned"], plain["assigned"]
    )
    soft = PseudoLabeler(0.5, mask_threshold=None, refinement=refinement).label(
        [prediction], [boxes], [image]
    )[0]
    inside = torch.zeros(40, 48)
    inside[10:22, 12:28] = 1  # the pixels whose centre is inside box 0
    filtered = guided_filter(image.float() / 255, probs[:1], 4, 0.01).clamp(0, 1)[0]
    torch.testing.assert_close(
        soft["masks"][0], filtered * inside
    )  # the box's crop, as the whole image
    assert soft["masks"][1].abs().sum() == 0


def window_mean(x, radius):
    return torch.nn.functional.avg_pool2d(
        x, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False
    )


def refine_box_by_box(image, masks, boxes, radius, eps):
    """The straightforward refinement: each box's crop (grown by twice the radius, clipped to
    the image) filtered on its own with a matrix inverse per pixel, zero outside the box."""
    guide = image.double() / 255
    out = torch.zeros(masks.shape, dtype=torch.float64)
    height, width = masks.shape[-2:]
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        top, left = max(int(y0) - 2 * radius, 0), max(int(x0) - 2 * radius, 0)
        bottom, right = min(int(y1) + 1 + 2 * radius, height), min(int(x1) + 1 + 2 * radius, width)
        if bottom <= top or right <= left:
            continue
        g, p = guide[:, top:bottom, left:right], masks[i, top:bottom, left:right].double()
        mean_i = window_mean(g[None], radius)[0]
        second = window_mean((g[:, None] * g[None]).flatten(0, 1)[None], radius)[0].unflatten(
            0, (3, 3)
        )
        covariance = (second - mean_i[:, None] * mean_i[None]).permute(2, 3, 0, 1)
        inverse = torch.linalg.inv(covariance + eps * torch.eye(3, dtype=torch.float64))
        mean_p = window_mean(p[None, None], radius)[0]
        cross = window_mean((g * p)[None], radius)[0] - mean_i * mean_p
        a = torch.einsum("hwij,jhw->ihw", inverse, cross)
        b = mean_p - (a * mean_i).sum(0, keepdim=True)
        fitted = window_mean(torch.cat([a, b])[None], radius)[0]
        out[i, top:bottom, left:right] = ((fitted[:3] * g).sum(0) + fitted[3]).clamp(0, 1)
    return out * boxes_to_masks(boxes.double(), (height, width))


def test_closed_form_inverse_equals_the_matrix_inverse():
    g = torch.Generator().manual_seed(0)
    colours = torch.rand(3, 20, 50, generator=g, dtype=torch.float64)  # 50 windows of 20 pixels
    centred = colours - colours.mean(1, keepdim=True)
    covariance = torch.einsum("inw,jnw->ijw", centred, centred) / 20
    expected = torch.linalg.inv(
        covariance.permute(2, 0, 1) + 0.01 * torch.eye(3, dtype=torch.float64)
    )
    rows, cols = torch.triu_indices(3, 3)
    got = inverse_regularised_covariance(
        covariance[rows, cols][:, :, None], 0.01
    )  # packed (6, 50, 1)
    torch.testing.assert_close(unpack_symmetric(got[None], 3)[0, ..., 0], expected.permute(1, 2, 0))
    variance = covariance[:1, 0, :, None]  # one channel: (1, 50, 1)
    torch.testing.assert_close(inverse_regularised_covariance(variance, 0.1), 1 / (variance + 0.1))


def test_unpack_symmetric_places_each_entry_on_both_sides_of_the_diagonal():
    packed = torch.arange(6.0).reshape(1, 6, 1, 1)
    expected = torch.tensor([[0.0, 1, 2], [1, 3, 4], [2, 4, 5]])
    torch.testing.assert_close(unpack_symmetric(packed, 3)[0, :, :, 0, 0], expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_refinement_equals_refining_box_by_box(seed):
    """Random boxes: inside, across the border, a whole-image box, an empty one, one outside."""
    g = torch.Generator().manual_seed(seed)
    height, width = 45, 70
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
    xy = torch.rand(6, 2, generator=g) * torch.tensor([width, height])
    wh = torch.rand(6, 2, generator=g) * torch.tensor([width / 2, height / 2])
    boxes = torch.cat(
        [
            torch.cat([xy - 3, xy + wh], 1).clamp(min=0),
            torch.tensor(
                [[0.0, 0.0, width, height], [10.0, 10.0, 10.0, 10.0], [80.0, 50.0, 90.0, 60.0]]
            ),
        ]
    )
    masks = torch.rand(len(boxes), height, width, generator=g)
    refinement = MaskRefinement(radius=3, eps=0.01)
    expected = refine_box_by_box(image, masks, boxes, 3, 0.01).float()
    torch.testing.assert_close(refinement(image, masks, boxes), expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(
        refinement(image, masks[:2], boxes[:2]), expected[:2], rtol=0, atol=2e-5
    )
    assert refinement(image, masks[:0], boxes[:0]).shape == (0, height, width)


def test_refinement_runs_without_host_synchronisation():
    """The windows come from host boxes: no item(), nonzero() or copy back from the device."""
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=g)
    masks, boxes = torch.rand(5, 40, 50, generator=g), torch.tensor([[2.0, 3.0, 20.0, 30.0]] * 5)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        MaskRefinement(radius=2)(image, masks, boxes)
    names = {event.name for event in profile.events()}
    assert not names & {"aten::_local_scalar_dense", "aten::item", "aten::nonzero"}, names


def test_refining_a_batch_of_images_of_different_sizes_equals_refining_each():
    """Tiles of one size for all images: near the border of a smaller image a tile reaches
    into the padding, which must not count."""
    g = torch.Generator().manual_seed(5)
    sizes, counts = [(45, 70), (30, 38), (52, 20), (40, 40)], [3, 2, 0, 1]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    masks = [torch.rand(n, h, w, generator=g) for n, (h, w) in zip(counts, sizes)]
    boxes = [
        torch.tensor([[30.0, 10.0, 69.0, 44.0], [0.0, 0.0, 20.0, 8.0], [5.0, 20.0, 40.0, 30.0]]),
        torch.tensor([[20.0, 15.0, 38.0, 30.0], [2.0, 3.0, 9.0, 7.5]]),
        torch.zeros(0, 4),
        torch.tensor([[36.0, 36.0, 40.0, 40.0]]),
    ]
    refinement = MaskRefinement(radius=3, eps=0.01)
    batched = refinement.refine_batch(images, masks, boxes)
    assert [tuple(b.shape) for b in batched] == [(n, h, w) for n, (h, w) in zip(counts, sizes)]
    for out, image, m, b in zip(batched, images, masks, boxes):
        torch.testing.assert_close(
            out, refine_box_by_box(image, m, b, 3, 0.01).float(), rtol=0, atol=2e-5
        )
