"""How far reduced-scale JPEG decoding moves the pixels the model sees, per source size.

For synthetic shapes JPEGs (quality 92, per-pixel noise: more fine detail than a photo, so a hard case) of each
`--source-size`, the final uint8 image of the evaluation / stage-2 pipeline (resize to 640x640) and a Mosaic
tile (shorter side 320) are made twice: from the reduced-scale decode the pipeline uses, and from a full-size
decode. Prints the reduction libjpeg chose and the mean, 99.9th percentile and max absolute difference in 8-bit
levels over all pixels and channels.

    python bench/decode_fidelity.py --source-size 800 1280 1920 3840 --images 8
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from torchvision.transforms import v2

from deim_ray.config.schema import Config, DataConfig, SyntheticConfig
from deim_ray.data.coco import CocoDetection
from deim_ray.data.synthetic import generate_shapes
from deim_ray.data.transforms import build_val_transforms

SIZE = 640
TILE = 320


def differences(dataset: CocoDetection, cfg: Config) -> dict[str, tuple[int, np.ndarray]]:
    """Per pipeline, (reduction, absolute differences of every pixel) between reduced and full decoding."""
    final = build_val_transforms(cfg, scale=False)
    tile = v2.Resize(TILE)
    out: dict[str, list] = {f"{SIZE}x{SIZE} resize": [], f"Mosaic tile ({TILE} shorter side)": []}
    reductions = {}
    for i in range(len(dataset)):
        full = dataset.load_item(i)
        for name, at_least, run in ((f"{SIZE}x{SIZE} resize", (SIZE, SIZE), lambda im, t: final(im, t)[0]),
                                    (f"Mosaic tile ({TILE} shorter side)", (TILE, TILE),
                                     lambda im, t: v2.functional.pil_to_tensor(tile(im, t)[0]))):
            image, target = dataset.load_item(i, at_least)
            reductions[name] = round(full[0].width / image.width)
            a, b = run(image, target).numpy().astype(np.int16), run(*full).numpy().astype(np.int16)
            out[name].append(np.abs(a - b).ravel())
    return {name: (reductions[name], np.concatenate(v)) for name, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-size", type=int, nargs="+", default=[800, 1280, 1920, 3840])
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    print(f"{'source':>7} {'pipeline':<30} {'reduction':>9} {'mean':>6} {'p99.9':>6} {'max':>4}")
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.source_size:
            train, val = generate_shapes(Path(tmp) / str(side), SyntheticConfig(num_train=args.images, num_val=1,
                                                                               image_size=side, max_objects=6))
            cfg = Config(data=DataConfig(train=train, val=val, image_size=(SIZE, SIZE)))
            dataset = CocoDetection(train.img_folder, train.ann_file)
            for name, (reduction, diff) in differences(dataset, cfg).items():
                print(f"{side:>7} {name:<30} {'1/' + str(reduction):>9} {diff.mean():6.2f} "
                      f"{np.percentile(diff, 99.9):6.0f} {diff.max():4d}", flush=True)


if __name__ == "__main__":
    main()
