"""config layer: YAML (`__include__`, `-u` overrides, upstream DEIM files) -> one frozen, typed, validated `Config`."""

from deim_ray.config.errors import ConfigError
from deim_ray.config.loader import (
    config_from_dict,
    config_sha256,
    config_to_dict,
    diff_configs,
    dump_yaml,
    load_config,
    override_config,
)
from deim_ray.config.schema import Config
from deim_ray.config.validate import validate

__all__ = [
    "Config",
    "ConfigError",
    "config_from_dict",
    "config_sha256",
    "config_to_dict",
    "diff_configs",
    "dump_yaml",
    "load_config",
    "override_config",
    "validate",
]
