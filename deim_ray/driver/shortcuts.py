"""driver layer: the one-line training arguments (`--data`, `--model`, `--epochs`, `--image-size`, `--batch`,
`--pretrained`, `--backbone-weights`) turned into a config, and a fresh run name when `--name` is left out.

`deim-ray train --data DIR --model deimv2-atto --epochs 15 --image-size 160` is the shipped config of that model
(`config.shipped`) with the folder's splits (`data.layouts.detect_layout`: COCO, YOLO or VOC), the schedule rule
for 15 epochs, and `schedule.fit_to_data` (batch, warm-ups and EMA fitted to the dataset when preflight has read
it). Each argument is a `-u` override the loader applies before the user's own `-u`, so those win; the keys the
user gave (`-u`, `--batch`) are kept as given by the fit. When the image size leaves fewer encoder tokens than the
config's queries, the queries follow the image size (one log line), unless `model.num_queries` was given.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from deim_ray.config.errors import ConfigError
from deim_ray.config.loader import load_config_explained, override_config
from deim_ray.config.schema import Config
from deim_ray.config.shipped import model_config
from deim_ray.config.yaml_tree import parse_override
from deim_ray.storage import RunState, RunStore, open_storage

log = logging.getLogger("deim_ray.driver")


@dataclass(frozen=True)
class Shortcuts:
    """What the command line said about the config (each field None when not given)."""

    config: str | None = None
    model: str | None = None
    data: str | None = None
    epochs: int | None = None
    image_size: int | None = None
    batch: int | None = None
    pretrained: str | None = None
    backbone_weights: str | None = None
    updates: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        return self.config if self.config is not None else str(model_config(self.model))


@dataclass(frozen=True)
class Loaded:
    cfg: Config
    explicit: frozenset[str]
    """Dotted keys the user gave (`-u`, `--batch`), which fitting to the data keeps."""
    derived: list[str]
    """One note per schedule value the rule derived (for `info`)."""


def load_for_command(s: Shortcuts) -> Loaded:
    """The config the command line asks for (see the module docstring); ConfigError / DataError in one line."""
    if (s.config is None) == (s.model is None):
        raise ConfigError("give a config (-c FILE) or a model (--model NAME, e.g. deimv2-atto), not both"
                          if s.config else "give -c CONFIG, or --data DIR with --model NAME (e.g. deimv2-atto)")
    if s.model is not None and s.data is None:
        raise ConfigError(f"--model {s.model} needs --data DIR (the dataset folder to train on)")
    source = s.source  # an unknown --model is refused before the data folder is read
    overrides = _shortcut_overrides(s)
    cfg, derived = load_config_explained(source, [*overrides, *s.updates])
    explicit = frozenset(".".join(parse_override(text)[0]) for text in s.updates)
    explicit |= {"data.total_batch_size"} if s.batch is not None else set()
    if s.image_size is not None and "model.num_queries" not in explicit:
        cfg = _queries_for_size(cfg)
    return Loaded(cfg, explicit, derived)


def _shortcut_overrides(s: Shortcuts) -> list[str]:
    out = []
    if s.data is not None:
        from deim_ray.data.layouts import detect_layout  # reads the folder: only when asked

        layout = detect_layout(s.data)
        log.info("%s", layout.describe())
        for name, split in (("train", layout.train), ("val", layout.val)):
            # JSON strings are YAML strings: paths with spaces or colons stay one value
            out += [f"data.{name}.{field.name}={json.dumps(getattr(split, field.name))}"
                    for field in dataclasses.fields(split)]
        out += ["data.synthetic=null", "schedule.fit_to_data=true"]
    if s.epochs is not None:
        out.append(f"schedule.epochs={s.epochs}")
    if s.image_size is not None:
        out.append(f"data.image_size=[{s.image_size}, {s.image_size}]")
    if s.batch is not None:
        out.append(f"data.total_batch_size={s.batch}")
    if s.pretrained is not None:
        out.append(f"model.pretrained={json.dumps(s.pretrained)}")
    if s.backbone_weights is not None:
        weights = "null" if s.backbone_weights.lower() == "none" else json.dumps(s.backbone_weights)
        out.append(f"model.backbone_pretrained={weights}")
    elif s.pretrained is not None:  # the checkpoint holds the whole model, backbone included
        out.append("model.backbone_pretrained=null")
    return out


def _queries_for_size(cfg: Config) -> Config:
    """`cfg` with `model.num_queries` lowered to the encoder tokens its image size gives, when fewer."""
    from deim_ray.models.build import build_model_config, feature_strides

    config = build_model_config(cfg.model, 1)
    h, w = cfg.data.image_size
    tokens = sum((h // s) * (w // s) for s in feature_strides(config)) if h % 32 == 0 and w % 32 == 0 else 0
    if 0 < tokens < config.num_queries:
        log.info("model.num_queries = %d (the %dx%d images give %d encoder tokens, fewer than the config's %d)",
                 tokens, h, w, tokens, config.num_queries)
        return override_config(cfg, {"model.num_queries": tokens})
    return cfg


def fresh_name(storage_uri: str, cfg: Config, base: str) -> str:
    """The run name for a command without --name: the first of `base`, `base-2`, `base-3`, ... that is not
    DONE under `storage_uri`, so re-running the same command continues an unfinished run and a finished one is
    never trained over."""
    storage = open_storage(storage_uri, cfg.storage)
    for n in range(1, 10_000):
        name = base if n == 1 else f"{base}-{n}"
        manifest = RunStore(storage, name).read_manifest()
        if manifest is None or manifest.state is not RunState.DONE:
            return name
    raise ConfigError(f"no free run name {base}-N under {storage_uri}; pass --name")


def name_base(s: Shortcuts) -> str:
    """`--model`'s name, else the config file's stem."""
    return s.model if s.model is not None else Path(s.config).stem
