"""config layer: the model families deim_ray builds and the sizes (`model.variant`) of each — the one list.

`validate` checks `model.family` and `model.variant` against this table before anything starts; the models layer
builds its registry from it (`models/families.py` takes, for each name here, the family module's function of that
name), so a size cannot be accepted here and unknown there, or the other way round. It lives in the config layer
because that layer sits below `models` and must not import it.
"""

from __future__ import annotations

FAMILY_VARIANTS: dict[str, tuple[str, ...]] = {
    # atto..n: HGNetv2; s..x: DINOv3; hgnetv2_s..x: upstream's deimv2_hgnetv2_{s,m,l,x} (HGNetv2 B0/B2/B4/B5)
    "deimv2": ("tiny", "atto", "femto", "pico", "n", "s", "m", "l", "x",
               "hgnetv2_s", "hgnetv2_m", "hgnetv2_l", "hgnetv2_x"),
    "dfine": ("tiny", "n", "s", "m", "l", "x"),
    "rtdetrv2": ("tiny", "r18", "r34", "r50", "r50m", "r101"),
}
"""Family -> its sizes, in the order messages list them; every family has `tiny` (tests, CPU smoke runs)."""
