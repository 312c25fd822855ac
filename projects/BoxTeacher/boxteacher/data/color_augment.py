"""The student's colour-only perturbation of BoxTeacher (``INPUT.AUG_TYPE``).

Only colours change, never geometry, so the perturbed view stays pixel-aligned with the clean
one. The operations are torchvision's; their random parameters come from the mapper's numpy
generator, so a sample's views are a function of the data seed and iteration.

* ``strong``: with p = 0.8 a colour jitter (brightness, contrast, saturation factors in
  [0.6, 1.4], hue shift in [-0.1, 0.1], the four in random order), then grayscale with p = 0.2.
* ``strongv2``: ``strong``, then with p = 0.5 a 3x3 Gaussian blur of sigma in [0.1, 2.0].
* ``weak``: with p = 0.2 a jitter of factors in [0.8, 1.2] and hue shift in [-0.1, 0.1].
* ``none``: no perturbation (no separate student view).
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

AUG_TYPES = ("strong", "strongv2", "weak", "none")


def _jitter(
    image: torch.Tensor, strength: float, hue: float, rng: np.random.Generator
) -> torch.Tensor:
    """torchvision's ColorJitter(strength, strength, strength, hue) with numpy randomness."""
    operations = [
        (TF.adjust_brightness, rng.uniform(1 - strength, 1 + strength)),
        (TF.adjust_contrast, rng.uniform(1 - strength, 1 + strength)),
        (TF.adjust_saturation, rng.uniform(1 - strength, 1 + strength)),
        (TF.adjust_hue, rng.uniform(-hue, hue)),
    ]
    for index in rng.permutation(len(operations)):
        operation, factor = operations[index]
        image = operation(image, float(factor))
    return image


def perturb_colors(
    image: np.ndarray, aug_type: str, rng: np.random.Generator, image_format: str
) -> np.ndarray:
    """The student view of ``image`` (H, W, 3) uint8 in ``image_format`` ("BGR" / "RGB"),
    same shape, dtype and channel order."""
    if aug_type not in AUG_TYPES:
        raise ValueError(f"Unknown INPUT.AUG_TYPE '{aug_type}'; expected one of {AUG_TYPES}.")
    rgb = image[:, :, ::-1] if image_format == "BGR" else image
    tensor = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
    if aug_type in ("strong", "strongv2"):
        if rng.random() < 0.8:
            tensor = _jitter(tensor, 0.4, 0.1, rng)
        if rng.random() < 0.2:
            tensor = TF.rgb_to_grayscale(tensor, num_output_channels=3)
        if aug_type == "strongv2" and rng.random() < 0.5:
            sigma = float(rng.uniform(0.1, 2.0))
            tensor = TF.gaussian_blur(tensor, kernel_size=[3, 3], sigma=[sigma, sigma])
    elif aug_type == "weak" and rng.random() < 0.2:
        tensor = _jitter(tensor, 0.2, 0.1, rng)
    out = tensor.permute(1, 2, 0).numpy()
    return np.ascontiguousarray(out[:, :, ::-1] if image_format == "BGR" else out)
