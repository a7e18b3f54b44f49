"""Seeded stand-in weights for an upstream state dict, so that parity fixtures need not store them.

`seeded_state(shapes, seed, fixed)` gives every upstream tensor a value that depends only on its name, shape and
`seed` (torch's CPU generator), at the scale of a trained network: weights ~ N(0, 1/fan_in), biases and BatchNorm
means small, norm scales near 1, BatchNorm variances in [0.5, 1.5], class-head biases near upstream's prior
(0.01). Tensors listed in `fixed` (upstream's own values for buffers that are not learned, such as the decoder's
anchors, `up` and `reg_scale`) are taken from there.

The fixture script (`fixtures/upstream/make_family_fixtures.py`) loads these weights into upstream's own model and
records its outputs; the tests load the same weights through `deim-ray convert-weights`.
"""

from __future__ import annotations

import zlib

import torch


def seeded_tensor(name: str, shape: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    if len(shape) >= 2:
        return noise * (noise[0].numel() ** -0.5)  # 1/sqrt(fan_in)
    if name.endswith(("weight", "scale")):
        return 1.0 + 0.1 * noise  # norm scales and HGNetv2's learnable affine scale
    if "score_head." in name:
        return -4.6 + 0.1 * noise  # class heads: upstream's prior of 0.01, so that no loss term swamps the rest
    return 0.1 * noise


def seeded_state(shapes: dict[str, list[int]], seed: int, fixed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream state dict `{name: tensor}` for `shapes` (upstream names), `fixed` values kept."""
    return {name: fixed[name].clone() if name in fixed else seeded_tensor(name, shape, seed)
            for name, shape in shapes.items()}


def seeded_image(size: int, seed: int) -> torch.Tensor:
    """A uint8 1x3xSxS test image (the models see `image / 255` in float32)."""
    return torch.randint(0, 256, (1, 3, size, size), generator=torch.Generator().manual_seed(seed + 1),
                         dtype=torch.uint8)


def seeded_batch(size: int, seed: int, num_classes: int = 80) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """A float 2x3xSxS batch in [0, 1] and its targets (3 and 1 boxes; normalised cxcywh, `class_labels`)."""
    g = torch.Generator().manual_seed(seed + 2)
    images = torch.rand(2, 3, size, size, generator=g)
    targets = []
    for n in (3, 1):
        centre = 0.25 + 0.5 * torch.rand(n, 2, generator=g)
        wh = 0.05 + 0.4 * torch.rand(n, 2, generator=g)
        targets.append({"boxes": torch.cat([centre, wh], 1),
                        "class_labels": torch.randint(0, num_classes, (n,), generator=g)})
    return images, targets
