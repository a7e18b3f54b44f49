"""models layer: `deim-ray convert-weights CKPT -c UPSTREAM_CONFIG.yml -o OUT.pth`.

Builds deim_ray's model from the upstream config (through the config importer, so the variant and every
architecture key are read the same way `deim-ray train -c` reads them), loads the checkpoint's EMA weights
(else its model weights) with every tensor accounted for (`upstream.py`), and writes a `final.pth` that
`deim_ray.models.export.load_final` loads. The class table: a COCO config (`remap_mscoco_category: True`) maps
class i to the i-th COCO category id; otherwise class i keeps id i.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from deim_ray.config.loader import load_config
from deim_ray.config.yaml_tree import resolve_file
from deim_ray.models.build import build_from_config, build_model_config
from deim_ray.models.convert.upstream import ConversionReport, load_upstream_state, read_upstream_checkpoint
from deim_ray.models.errors import ModelError
from deim_ray.models.export import make_final_checkpoint
from deim_ray.outputs import output_file

# COCO's 80 detection category ids, in upstream's class-index order (mscoco_category2label)
COCO_IDS = [*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83),
            *range(84, 91)]


def convert_checkpoint(ckpt: str, upstream_config: str, out: str) -> tuple[Path, ConversionReport]:
    """Convert `ckpt` (trained with `upstream_config`) to a deim_ray final artifact at `out` (never overwritten)."""
    target = Path(out)
    if target.exists():
        raise FileExistsError(f"{out} exists; choose another -o or remove it first")
    cfg = load_config(upstream_config)
    tree, _ = resolve_file(upstream_config)
    num_classes = int(tree.get("num_classes", 80))
    model = build_from_config(build_model_config(cfg.model, num_classes))
    sd, which = read_upstream_checkpoint(ckpt)
    report = load_upstream_state(model, sd, os.path.basename(ckpt), which)
    ids = COCO_IDS if tree.get("remap_mscoco_category") and num_classes == len(COCO_IDS) else list(range(num_classes))
    meta = {"converted_from": os.path.basename(ckpt), "weights": which, "upstream_config": os.path.basename(
        upstream_config), "normalize": cfg.data.normalize, "num_top_queries": cfg.eval.num_top_queries}
    final = make_final_checkpoint(model.state_dict(), cfg.model, num_classes, ids, [str(i) for i in ids],
                                  cfg.data.image_size, meta)
    _save_atomically(final, target)
    return target, report


def _save_atomically(obj: dict, target: Path) -> None:
    try:
        with output_file(target) as partial:
            torch.save(obj, partial)
    except OSError as e:
        raise ModelError(f"cannot write {target} ({e.strerror or e}); check the folder") from None
