"""data layer: the final Resize, with less work for images that are mostly black.

A ZoomOut canvas is up to 16 times the image's area, mostly black fill, and resizing it to the training size
was the costliest step after Mosaic. A bilinear (antialiased) shrink computes each output pixel from the
source pixels under its filter, so an output pixel whose filter lies wholly in black stays black. `Resize`
finds the non-black part (`Image.getbbox`), resamples only the output rectangle that can see it (PIL's
`resize(box=...)` uses the same filter positions and weights as the whole-image resize) and pastes that into a
black image: the same pixels as resizing the whole canvas, up to one level of rounding where the filter
positions computed from the box differ in their last bits.
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image
from torchvision.transforms import v2

MARGIN = 3
"""Output pixels kept around the content: a shrink's filter reaches 1.5 output pixels; the rest is slack."""


def resize_bilinear(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image.resize((width, height), BILINEAR)`, computed only where the result can be non-black."""
    sx, sy = image.width / width, image.height / height
    if (image.width, image.height) == (width, height):
        return image
    if sx < 1 or sy < 1 or sx * sy < 2:  # enlarging, or too little black to be worth a scan
        return image.resize((width, height), Image.Resampling.BILINEAR)
    content = image.getbbox()
    if content is None:
        return Image.new(image.mode, (width, height))
    x0, y0 = max(0, math.floor(content[0] / sx) - MARGIN), max(0, math.floor(content[1] / sy) - MARGIN)
    x1, y1 = min(width, math.ceil(content[2] / sx) + MARGIN), min(height, math.ceil(content[3] / sy) + MARGIN)
    if (x0, y0, x1, y1) == (0, 0, width, height):
        return image.resize((width, height), Image.Resampling.BILINEAR)
    part = image.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    out = Image.new(image.mode, (width, height))
    out.paste(part, (x0, y0))
    return out


class Resize(v2.Resize):
    """`v2.Resize([height, width])` (bilinear, antialiased) with `resize_bilinear` for RGB PIL images."""

    def __init__(self, size: tuple[int, int]):
        super().__init__(list(size))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, Image.Image) and inpt.mode == "RGB":
            return resize_bilinear(inpt, self.size[1], self.size[0])
        return super().transform(inpt, params)
