"""models layer, DEIMv2 family: transformers' DEIMv2 detector configured to compute what upstream computes.

- `apply_upstream_arch(model)`: when the config carries `upstream_arch` (every DEIMv2 config deim_ray builds
  does), gives a freshly built `Deimv2ForObjectDetection` upstream's architecture (see `arch.py`);
  `models.build.build_from_config` calls it.
"""

from deim_ray.models.deimv2.arch import UPSTREAM_ARCH_KEY, apply_upstream_arch

__all__ = ["UPSTREAM_ARCH_KEY", "apply_upstream_arch"]
