"""data layer: the photometric distortion with cheaper kernels for PIL images.

`PhotometricDistort` draws exactly what torchvision's `RandomPhotometricDistort` draws (it reuses its
`make_params`: brightness, contrast before or after, saturation, hue, channel permutation, each with p), and
applies brightness, contrast and saturation with torchvision's PIL kernels. Two kernels are replaced:

- hue: torchvision converts RGB -> HSV -> RGB through PIL (the slowest step of the whole train pipeline).
  Here the exact HSV hue rotation is evaluated on a 17^3 RGB grid and applied with PIL's trilinear
  `Color3DLUT` in one pass. Against the exact float rotation the result differs by 0.2-0.8 levels on average
  (PIL's own 8-bit HSV round trip differs by 0.3-0.7);
- channel permutation: `Image.merge` of the bands instead of a PIL -> tensor -> PIL round trip.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageFilter
from torchvision.transforms import v2

LUT_SIZE = 17
_GRID = np.stack(np.meshgrid(*[np.linspace(0.0, 1.0, LUT_SIZE)] * 3, indexing="ij")[::-1], -1).reshape(-1, 3)
"""The LUT's RGB grid points, red varying fastest (the table order `Color3DLUT` expects)."""


def rotate_hue(rgb: np.ndarray, hue_factor: float) -> np.ndarray:
    """Exact HSV hue rotation of float RGB values in [0, 1] (shape [..., 3]) by `hue_factor` of a turn;
    value (max) and saturation ((max - min) / max) are kept."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    high, low = rgb.max(-1), rgb.min(-1)
    chroma = high - low
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(high == r, (g - b) / safe, np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = np.mod(hue + 6.0 * hue_factor, 6.0)
    sector = np.floor(hue).astype(np.int64) % 6
    rising = low + chroma * (hue - np.floor(hue))
    falling = high - chroma * (hue - np.floor(hue))
    channels = ((high, falling, low, low, rising, high),  # red in sectors 0..5
                (rising, high, high, falling, low, low),  # green
                (low, low, rising, high, high, falling))  # blue
    return np.stack([np.choose(sector, c) for c in channels], -1)


def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
    """`hue_factor` in [-0.5, 0.5] of a turn, as torchvision's `adjust_hue`, on an RGB PIL image."""
    table = rotate_hue(_GRID, hue_factor).reshape(-1)
    return image.filter(ImageFilter.Color3DLUT(LUT_SIZE, table))


def permute_channels(image: Image.Image, permutation: list[int]) -> Image.Image:
    bands = image.split()
    return Image.merge(image.mode, [bands[i] for i in permutation])


class PhotometricDistort(v2.RandomPhotometricDistort):
    """torchvision's `RandomPhotometricDistort` (same draws, same order) with the kernels above for RGB PIL
    images; any other input takes torchvision's path."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not (isinstance(inpt, Image.Image) and inpt.mode == "RGB"):
            return super().transform(inpt, params)
        fast = dict(params, hue_factor=None, channel_permutation=None)
        image = super().transform(inpt, dict(fast, contrast_factor=None) if not params["contrast_before"] else fast)
        if params["hue_factor"] is not None:
            image = adjust_hue(image, params["hue_factor"])
        if params["contrast_factor"] is not None and not params["contrast_before"]:
            image = v2.functional.adjust_contrast(image, contrast_factor=params["contrast_factor"])
        if params["channel_permutation"] is not None:
            image = permute_channels(image, params["channel_permutation"].tolist())
        return image
